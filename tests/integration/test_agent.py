"""``fleetward-agent`` against a real ``fleetward serve``: EST over real TLS sockets.

Threats, each a case below:

- a device key that leaves the token (readable CKA_VALUE, extractable) or a renewal that
  does not really authenticate with the current certificate (mTLS through curl and
  OpenSSL's pkcs11 engine), or leaves the rotated-out key on the token;
- the same for the encrypted key file;
- a trust bootstrap that accepts a server whose CA does not match the pinned
  fingerprint (a man in the middle during first contact), or writes state anyway;
- a bootstrap token that works twice, or whose refusal reaches the user as a traceback;
- curl trusting a server outside the pinned CA, and a wrong PIN papered over;
- an expired certificate renewed with a new key or over a (failing) mTLS handshake,
  instead of without a client certificate and with the same key.

The agent runs as a separate process (``python -m fleetward.agent.cli``), as on a
device; the test process only inspects the token (SoftHSM2) and the server's records.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute

from fleetward.agent.errors import ServerRefused
from fleetward.agent.renewal import open_agent
from fleetward.agent.state import StateLayout
from fleetward.clock import FrozenClock
from fleetward.crypto.pkcs11 import Pkcs11Signer
from fleetward.errors import KeyUnavailable
from tests.conftest import RunningServer, need_service
from tests.softhsm import SOFTHSM_MODULE as MODULE
from tests.softhsm import softhsm_tokens

pytestmark = pytest.mark.softhsm

AGENT = [sys.executable, "-m", "fleetward.agent.cli"]
TOKEN_LABEL = "fw-agent-int"  # unique in the test process (sessions are cached per label)


@dataclass(frozen=True)
class SoftHsm:
    conf: Path
    pin: str
    pin_file: Path


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    if not Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so").exists() and not list(
            Path("/usr/lib").glob("*/engines-3/pkcs11.so")):
        need_service("OpenSSL's pkcs11 engine (Debian: libengine-pkcs11-openssl)")
    with softhsm_tokens(tmp_path_factory.mktemp("softhsm-agent-int"), [TOKEN_LABEL]) as tokens:
        yield SoftHsm(tokens.conf, tokens.pin, tokens.pin_file)


# --- helpers -------------------------------------------------------------------------------


def agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=120,
                          env=env or dict(os.environ))


def device_url(server: RunningServer) -> str:
    return f"https://127.0.0.1:{server.device_port}"


def root_ca(server: RunningServer) -> x509.Certificate:
    return x509.load_pem_x509_certificate((server.data_dir / "certs" / "root-ca.pem")
                                          .read_bytes())


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def bootstrap_token(server: RunningServer, device_id: str) -> str:
    with server.admin() as client:
        created = client.post("/v1/devices", json={"id": device_id, "type": "default"})
        assert created.status_code == 201, created.text
        issued = client.post(f"/v1/devices/{device_id}/bootstrap-tokens",
                             json={"ttl_hours": 24})
        assert issued.status_code == 201, issued.text
        token = issued.json()["token"]
    assert isinstance(token, str) and token.startswith("fwb_")
    return token


def token_file(directory: Path, token: str) -> Path:
    path = directory / f"token-{secrets.token_hex(3)}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def enroll_args(server: RunningServer, device_id: str, state: Path,
                fp: str | None = None) -> list[str]:
    return ["enroll", "--server", device_url(server), "--device-id", device_id,
            "--state-dir", str(state), "--ca-fingerprint", fp or fingerprint(root_ca(server))]


def chains_to_root(server: RunningServer, cert: Path, ca_file: Path | None = None) -> bool:
    """`openssl verify`: cert → issuing CA (untrusted) → root-ca.pem (the only anchor)."""
    done = subprocess.run(
        ["openssl", "verify", "-CAfile",
         str(ca_file or server.data_dir / "certs" / "root-ca.pem"),
         "-untrusted", str(server.chain), "-purpose", "sslclient", str(cert)],
        capture_output=True, text=True, timeout=30)
    return done.returncode == 0


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def agent_toml(state: Path) -> dict[str, Any]:
    return tomllib.loads((state / "agent.toml").read_text())


def enroll_methods(server: RunningServer, device_id: str) -> list[str]:
    """`method` of each successful enrollment of ``device_id`` in the audit log, oldest
    first: bootstrap-token, reenroll (mTLS) or reenroll-expired (no client cert)."""
    with server.admin() as client:
        items = client.get("/v1/audit", params={"action": "enroll.succeeded",
                                                "limit": 1000}).json()["items"]
    return [e["details"]["method"] for e in items if e["target"] == f"device:{device_id}"]


def open_token_key(hsm: SoftHsm, label: str) -> Pkcs11Signer:
    return Pkcs11Signer.open(module=MODULE, token_label=TOKEN_LABEL, key_label=label,
                             pin=hsm.pin)


def assert_non_extractable(signer: Pkcs11Signer) -> None:
    private = signer.token_private_key
    assert private[Attribute.SENSITIVE] is True
    assert private[Attribute.EXTRACTABLE] is False
    assert private[Attribute.NEVER_EXTRACTABLE] is True
    with pytest.raises(pkcs11.AttributeSensitive):
        private[Attribute.VALUE]


def assert_clean_failure(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "error:" in result.stderr and "hint:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def foreign_ca_pem(directory: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Impostor Root")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / "impostor-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# --- (a) key on a PKCS#11 token ------------------------------------------------------------


def test_pkcs11_enroll_then_renew_over_mtls_with_a_new_token_key(
        server: RunningServer, softhsm: SoftHsm, tmp_path: Path) -> None:
    device_id = "agent-hsm-1"
    state = tmp_path / "state"
    env = dict(os.environ, SOFTHSM2_CONF=str(softhsm.conf),
               FLEETWARD_BOOTSTRAP_TOKEN=bootstrap_token(server, device_id))
    enrolled = agent(*enroll_args(server, device_id, state), "--pkcs11-module", MODULE,
                     "--pkcs11-token-label", TOKEN_LABEL,
                     "--pkcs11-pin-file", str(softhsm.pin_file), env=env)
    assert enrolled.returncode == 0, enrolled.stderr
    assert "enrolled" in enrolled.stdout

    # the key is on the token, non-extractable, and certified by a cert that chains to root
    config = agent_toml(state)
    keystore = config["keystore"]
    assert keystore["kind"] == "pkcs11" and keystore["token_label"] == TOKEN_LABEL
    first_label = keystore["key_label"]
    assert softhsm.pin not in (state / "agent.toml").read_text()
    assert not (state / "device.key").exists()
    first = open_token_key(softhsm, first_label)
    assert_non_extractable(first)
    cert1 = load_cert(state / "cert.pem")
    assert spki(cert1.public_key()) == spki(first.public_key())
    assert chains_to_root(server, state / "cert.pem")
    assert not chains_to_root(server, state / "cert.pem", foreign_ca_pem(tmp_path))  # control
    assert load_cert(state / "ca.pem") in x509.load_pem_x509_certificates(
        server.chain.read_bytes())

    # renew --force: mTLS through curl + the pkcs11 engine, new key object, new certificate
    renewed = agent("renew", "--force", "--state-dir", str(state), env=env)
    assert renewed.returncode == 0, renewed.stderr
    assert "new key" in renewed.stdout
    cert2 = load_cert(state / "cert.pem")
    assert cert2.serial_number != cert1.serial_number
    second_label = agent_toml(state)["keystore"]["key_label"]
    assert second_label != first_label
    second = open_token_key(softhsm, second_label)
    assert_non_extractable(second)
    assert spki(cert2.public_key()) == spki(second.public_key()) != spki(first.public_key())
    assert chains_to_root(server, state / "cert.pem")
    with pytest.raises(KeyUnavailable, match="no unique key"):  # the old key is gone
        open_token_key(softhsm, first_label)
    assert {"pending_key_label", "retired_key_label"}.isdisjoint(agent_toml(state)["keystore"])
    # "reenroll" is the server's name for simplereenroll authenticated by the TLS client
    # certificate (an expired one would be "reenroll-expired")
    assert enroll_methods(server, device_id) == ["bootstrap-token", "reenroll"]

    status = agent("status", "--state-dir", str(state), env=env)
    assert status.returncode == 0 and format(cert2.serial_number, "x") in status.stdout

    # negative control for curl: with another CA pinned, the server is not trusted
    genuine_ca = (state / "ca.pem").read_bytes()
    (state / "ca.pem").write_bytes(foreign_ca_pem(tmp_path).read_bytes())
    refused = agent("renew", "--force", "--state-dir", str(state), env=env)
    assert_clean_failure(refused, "not trusted")
    (state / "ca.pem").write_bytes(genuine_ca)
    assert load_cert(state / "cert.pem") == cert2
    assert "pending_key_label" not in agent_toml(state)["keystore"]

    # a wrong PIN is a clear refusal, and changes nothing
    wrong_pin = tmp_path / "wrong-pin"
    wrong_pin.write_text("99999999\n")
    wrong_pin.chmod(0o600)
    toml_text = (state / "agent.toml").read_text()
    (state / "agent.toml").write_text(toml_text.replace(str(softhsm.pin_file), str(wrong_pin)))
    assert_clean_failure(agent("renew", "--force", "--state-dir", str(state), env=env),
                         "cannot log in")
    (state / "agent.toml").write_text(toml_text)
    assert load_cert(state / "cert.pem") == cert2
    assert enroll_methods(server, device_id) == ["bootstrap-token", "reenroll"]


# --- (b) encrypted key file ----------------------------------------------------------------


def test_file_keystore_enroll_then_renew_over_mtls_with_a_new_key(
        server: RunningServer, tmp_path: Path) -> None:
    device_id = "agent-file-1"
    state = tmp_path / "state"
    tfile = token_file(tmp_path, bootstrap_token(server, device_id))
    enrolled = agent(*enroll_args(server, device_id, state), "--token-file", str(tfile))
    assert enrolled.returncode == 0, enrolled.stderr

    assert (state.stat().st_mode & 0o777) == 0o700
    for secret in ("device.key", "key-passphrase", "agent.toml"):
        assert ((state / secret).stat().st_mode & 0o777) == 0o600, secret
    key_pem = (state / "device.key").read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    passphrase = (state / "key-passphrase").read_bytes().strip()
    key1 = serialization.load_pem_private_key(key_pem, password=passphrase)
    with pytest.raises(ValueError):  # negative control: the key really is encrypted
        serialization.load_pem_private_key(key_pem, password=b"not the passphrase")
    cert1 = load_cert(state / "cert.pem")
    assert spki(cert1.public_key()) == spki(key1.public_key())
    assert cert1.subject.rfc4514_string() == f"CN={device_id}"
    assert chains_to_root(server, state / "cert.pem")

    not_due = agent("renew", "--state-dir", str(state))
    assert not_due.returncode == 0 and "not due" in not_due.stdout
    assert load_cert(state / "cert.pem") == cert1

    renewed = agent("renew", "--force", "--state-dir", str(state))
    assert renewed.returncode == 0, renewed.stderr
    cert2 = load_cert(state / "cert.pem")
    key2 = serialization.load_pem_private_key((state / "device.key").read_bytes(),
                                              password=passphrase)
    assert cert2.serial_number != cert1.serial_number
    assert spki(cert2.public_key()) == spki(key2.public_key()) != spki(key1.public_key())
    assert chains_to_root(server, state / "cert.pem")
    assert enroll_methods(server, device_id) == ["bootstrap-token", "reenroll"]
    leftovers = [p.name for p in state.iterdir() if p.name.endswith((".new", ".tmp"))]
    assert leftovers == []

    # a second forced renewal authenticates with the NEW certificate and key
    again = agent("renew", "--force", "--state-dir", str(state))
    assert again.returncode == 0, again.stderr
    assert load_cert(state / "cert.pem").serial_number not in (cert1.serial_number,
                                                               cert2.serial_number)
    assert enroll_methods(server, device_id) == ["bootstrap-token", "reenroll", "reenroll"]


def test_an_expired_certificate_re_enrolls_without_client_cert_with_the_same_key(
        server: RunningServer, tmp_path: Path) -> None:
    """The server's clock cannot be moved, so the agent's is: at notAfter + 1 h the agent
    believes its certificate expired and sends simplereenroll WITHOUT a client certificate
    and with a CSR signed by the SAME key. The server, whose certificate is still valid,
    finds that certificate by the CSR's key and says so: proof of both properties."""
    device_id = "agent-expired-1"
    state = tmp_path / "state"
    tfile = token_file(tmp_path, bootstrap_token(server, device_id))
    assert agent(*enroll_args(server, device_id, state), "--token-file",
                 str(tfile)).returncode == 0
    cert = load_cert(state / "cert.pem")
    key_before = (state / "device.key").read_bytes()
    late = FrozenClock(cert.not_valid_after_utc + dt.timedelta(hours=1))
    with pytest.raises(ServerRefused, match="still valid: present it over TLS") as caught:
        open_agent(StateLayout(state), clock=late).renew()
    assert caught.value.status == 401
    assert (state / "device.key").read_bytes() == key_before  # no rotation when expired
    assert load_cert(state / "cert.pem") == cert
    # negative control: with the device's real clock the same state renews over mTLS
    assert open_agent(StateLayout(state)).renew(force=True).mode == "new-key"
    assert enroll_methods(server, device_id) == ["bootstrap-token", "reenroll"]


# --- (c) the pinned fingerprint ------------------------------------------------------------


def test_a_wrong_ca_fingerprint_is_refused_and_nothing_is_written(
        server: RunningServer, tmp_path: Path) -> None:
    device_id = "agent-pin-1"
    state = tmp_path / "state"
    tfile = token_file(tmp_path, bootstrap_token(server, device_id))
    impostor = fingerprint(load_cert(foreign_ca_pem(tmp_path)))
    refused = agent(*enroll_args(server, device_id, state, impostor),
                    "--token-file", str(tfile))
    assert_clean_failure(refused, "pinned fingerprint", "nothing was written")
    assert not state.exists()
    assert enroll_methods(server, device_id) == []  # the token was never sent

    # negative control: the right pin (here the issuing CA, as openssl prints it) works,
    # with the very same token
    issuing = next(c for c in x509.load_pem_x509_certificates(server.chain.read_bytes())
                   if c != root_ca(server))
    spelled = "SHA256 Fingerprint=" + issuing.fingerprint(hashes.SHA256()).hex(":").upper()
    accepted = agent(*enroll_args(server, device_id, state, spelled),
                     "--token-file", str(tfile))
    assert accepted.returncode == 0, accepted.stderr
    assert chains_to_root(server, state / "cert.pem")
    assert [c.subject for c in x509.load_pem_x509_certificates((state / "ca.pem").read_bytes())
            ] == [issuing.subject]  # only what was pinned is trusted, not the root above it


# --- (d) a used token ----------------------------------------------------------------------


def test_a_replayed_bootstrap_token_is_refused_with_a_clear_message(
        server: RunningServer, tmp_path: Path) -> None:
    device_id = "agent-replay-1"
    tfile = token_file(tmp_path, bootstrap_token(server, device_id))
    first = agent(*enroll_args(server, device_id, tmp_path / "first"),
                  "--token-file", str(tfile))
    assert first.returncode == 0, first.stderr  # negative control: the token is good once

    replay_state = tmp_path / "replay"
    replay = agent(*enroll_args(server, device_id, replay_state), "--token-file", str(tfile))
    assert_clean_failure(replay, "HTTP 401", "token already used", "new bootstrap token")
    assert not (replay_state / "cert.pem").exists()
    assert not (replay_state / "device.key").exists()
    assert not (replay_state / "device.key.new").exists()
    assert enroll_methods(server, device_id) == ["bootstrap-token"]
    token = tfile.read_text().strip()
    assert token not in replay.stderr + replay.stdout  # the secret is never echoed
