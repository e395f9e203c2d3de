"""The CA keys on a PKCS#11 token (SoftHSM2): they sign everything and never leave it.

Threats: a CA key that a PIN holder (or Fleetward itself) can read or wrap out of the
token; certificates, CRLs or OCSP answers that only *claim* to come from the token key;
a wrong PIN or a missing key that is papered over (or ends in a traceback) instead of a
clear refusal; ``fleetward init --ca-key-backend pkcs11`` quietly writing a CA key file
anyway.

SoftHSM2 reads ``SOFTHSM2_CONF`` and lists its tokens once, in C_Initialize, and
python-pkcs11 initialises a module once per process. So the module fixture writes the
config and initialises every token this file uses before the library is first used.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pkcs11
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from fleetward.ca import OcspResponder
from fleetward.clock import FrozenClock
from fleetward.crypto.pkcs11 import Pkcs11Signer
from fleetward.errors import ConfigurationError, KeyUnavailable
from tests.conftest import FLEETWARD, build_stack, start_server, stop_server
from tests.softhsm import SOFTHSM_MODULE as MODULE
from tests.softhsm import softhsm_tokens

pytestmark = pytest.mark.softhsm

# One token per test (labels are per process: a logged-in session is cached per token).
TOKENS = ("fw-stack", "fw-attrs", "fw-pin-fresh", "fw-pin-cached", "fw-labels", "fw-cli")


@dataclass(frozen=True)
class SoftHsm:
    conf: Path
    tokendir: Path
    pin: str

    def generate(self, token: str, key: str) -> Pkcs11Signer:
        return Pkcs11Signer.generate(module=MODULE, token_label=token, key_label=key,
                                     pin=self.pin)

    def open(self, token: str, key: str, pin: str | None = None) -> Pkcs11Signer:
        return Pkcs11Signer.open(module=MODULE, token_label=token, key_label=key,
                                 pin=self.pin if pin is None else pin)


@pytest.fixture(scope="module", autouse=True)
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A SoftHSM2 token directory for this module, with every token initialised."""
    with softhsm_tokens(tmp_path_factory.mktemp("softhsm"), TOKENS) as tokens:
        yield SoftHsm(tokens.conf, tokens.tokendir, pin=tokens.pin)


def device_csr(device_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def signed_by(key: ec.EllipticCurvePublicKey, signature: bytes, tbs: bytes,
              algorithm: hashes.HashAlgorithm | None) -> bool:
    assert isinstance(algorithm, hashes.HashAlgorithm)
    try:
        key.verify(signature, tbs, ec.ECDSA(algorithm))
    except InvalidSignature:
        return False
    return True


def same_key(a: ec.EllipticCurvePublicKey, b: object) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert isinstance(b, ec.EllipticCurvePublicKey)
    return a.public_bytes(*spki) == b.public_bytes(*spki)


# --- in process: the token key signs certificates, CRLs and OCSP responses ---------------


def ocsp_answer(stack: Any, cert: x509.Certificate,
                issuer: x509.Certificate) -> ocsp.OCSPResponse:
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    with stack.db.read() as conn:
        der = OcspResponder(stack.authority).respond(
            conn, request.public_bytes(serialization.Encoding.DER))
    response = ocsp.load_der_ocsp_response(der)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    return response


def test_certificate_crl_and_ocsp_are_signed_by_the_token_key(
        softhsm: SoftHsm, sqlite_url: str, tmp_path: Path, clock: FrozenClock) -> None:
    root = softhsm.generate("fw-stack", "root")
    issuing = softhsm.generate("fw-stack", "issuing")
    stack = build_stack(sqlite_url, tmp_path, clock, issuing_signer=issuing, root_signer=root)
    try:
        assert not list(tmp_path.glob("*.key")), "a CA key file was written after all"
        issuing_cert = stack.authority.issuing.certificate
        root_cert = stack.authority.handles["root"].certificate
        assert same_key(issuing.public_key(), issuing_cert.public_key())
        assert same_key(root.public_key(), root_cert.public_key())
        assert signed_by(root.public_key(), issuing_cert.signature,
                         issuing_cert.tbs_certificate_bytes, issuing_cert.signature_hash_algorithm)

        stack.add_device("p11-dev")
        record = stack.registry.issue_certificate("p11-dev", device_csr("p11-dev"), "device",
                                                  "operator:test")
        cert = x509.load_pem_x509_certificate(record.pem.encode())
        tbs, alg = cert.tbs_certificate_bytes, cert.signature_hash_algorithm
        assert signed_by(issuing.public_key(), cert.signature, tbs, alg)
        # Negative control: the other token key does not verify it, so the check can fail.
        assert not signed_by(root.public_key(), cert.signature, tbs, alg)
        good = ocsp_answer(stack, cert, issuing_cert)
        assert good.certificate_status is ocsp.OCSPCertStatus.GOOD

        stack.registry.revoke_certificate(record.serial, "keyCompromise", "operator:test")

        with stack.db.read() as conn:
            crl = x509.load_der_x509_crl(stack.authority.crl_der(conn, "issuing"))
        assert crl.is_signature_valid(issuing.public_key())
        assert not crl.is_signature_valid(root.public_key())
        entry = crl.get_revoked_certificate_by_serial_number(record.serial)
        assert entry is not None, "the revoked serial is missing from the CRL"
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason \
            is x509.ReasonFlags.key_compromise

        answer = ocsp_answer(stack, cert, issuing_cert)
        assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
        assert answer.revocation_reason is x509.ReasonFlags.key_compromise
        assert answer.serial_number == record.serial
        assert signed_by(issuing.public_key(), answer.signature, answer.tbs_response_bytes,
                         answer.signature_hash_algorithm)
        assert not signed_by(root.public_key(), answer.signature, answer.tbs_response_bytes,
                             answer.signature_hash_algorithm)
    finally:
        stack.db.dispose()


# --- the key cannot leave the token ------------------------------------------------------


@pytest.fixture(scope="module")
def ca_key(softhsm: SoftHsm) -> Pkcs11Signer:
    return softhsm.generate("fw-attrs", "ca")


@pytest.fixture(scope="module")
def leaky_keys(ca_key: Pkcs11Signer) -> dict[str, Any]:
    """Keys made on the same token *with* export allowed: the controls for the checks."""
    session = ca_key.token_private_key.session
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
        local=True)
    _, wrappable = params.generate_keypair(
        store=False, label="leaky-wrappable",
        private_template={Attribute.SIGN: True, Attribute.SENSITIVE: True,
                          Attribute.EXTRACTABLE: True})
    readable_public, readable = params.generate_keypair(
        store=False, label="leaky-readable",
        private_template={Attribute.SIGN: True, Attribute.SENSITIVE: False,
                          Attribute.EXTRACTABLE: True})
    wrapping_key = session.generate_key(
        KeyType.AES, 256, label="wrapper", store=False,
        template={Attribute.WRAP: True, Attribute.UNWRAP: True})
    return {"wrappable": wrappable, "readable": readable, "readable_public": readable_public,
            "wrapping_key": wrapping_key}


# (attribute, what the CA key must say, what an exportable key says: the check can fail)
EXPORT_ATTRIBUTES = [
    (Attribute.SENSITIVE, True, False),
    (Attribute.EXTRACTABLE, False, True),
    (Attribute.NEVER_EXTRACTABLE, True, False),
    (Attribute.ALWAYS_SENSITIVE, True, False),
]


@pytest.mark.parametrize(("attribute", "ca_value", "leaky_value"), EXPORT_ATTRIBUTES,
                         ids=[a.name for a, _, _ in EXPORT_ATTRIBUTES])
def test_token_marks_ca_key_unexportable(ca_key: Pkcs11Signer, leaky_keys: dict[str, Any],
                                         attribute: Attribute, ca_value: bool,
                                         leaky_value: bool) -> None:
    assert ca_key.token_private_key[attribute] is ca_value
    assert leaky_keys["readable"][attribute] is leaky_value


def test_token_refuses_to_reveal_or_wrap_ca_key(ca_key: Pkcs11Signer,
                                                leaky_keys: dict[str, Any]) -> None:
    wrapping_key = leaky_keys["wrapping_key"]
    with pytest.raises(pkcs11.AttributeSensitive):
        _ = ca_key.token_private_key[Attribute.VALUE]
    with pytest.raises(pkcs11.KeyUnextractable):
        wrapping_key.wrap_key(ca_key.token_private_key, mechanism=Mechanism.AES_KEY_WRAP_PAD)

    # Controls on the same token and session: an exportable key does come out, and the
    # value read is the real private scalar (it derives the matching public key).
    assert len(wrapping_key.wrap_key(leaky_keys["wrappable"],
                                     mechanism=Mechanism.AES_KEY_WRAP_PAD)) > 32
    scalar = int.from_bytes(leaky_keys["readable"][Attribute.VALUE], "big")
    derived = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
    public = serialization.load_der_public_key(encode_ec_public_key(leaky_keys["readable_public"]))
    assert same_key(derived, public)


PROXY_EXPORTS: dict[str, Callable[[ec.EllipticCurvePrivateKey], object]] = {
    "private_bytes-pem-pkcs8": lambda k: k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()),
    "private_bytes-der-encrypted": lambda k: k.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"exfiltrate")),
    "private_bytes-openssh": lambda k: k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()),
    "private_numbers": lambda k: k.private_numbers(),
    "ecdh-exchange": lambda k: k.exchange(
        ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key()),
}


@pytest.mark.parametrize("export", PROXY_EXPORTS.values(), ids=PROXY_EXPORTS.keys())
def test_signer_key_object_refuses_export(
        ca_key: Pkcs11Signer, export: Callable[[ec.EllipticCurvePrivateKey], object]) -> None:
    with pytest.raises(KeyUnavailable, match="cannot be exported"):
        export(ca_key.private_key)
    # Control: the same object is live, it signs on the token with the CA key.
    signature = ca_key.private_key.sign(b"still usable", ec.ECDSA(hashes.SHA256()))
    ca_key.public_key().verify(signature, b"still usable", ec.ECDSA(hashes.SHA256()))


# --- PINs and labels -----------------------------------------------------------------------


def test_wrong_pin_on_first_login_is_refused_with_a_hint(softhsm: SoftHsm) -> None:
    with pytest.raises(KeyUnavailable) as refused:
        softhsm.open("fw-pin-fresh", "k", pin=softhsm.pin + "0")
    assert "cannot log in to token 'fw-pin-fresh'" in refused.value.message
    assert "PinIncorrect" in refused.value.message
    assert refused.value.hint is not None and "PIN" in refused.value.hint
    # Control: the refusal did not poison the token; the right PIN logs in and works.
    softhsm.generate("fw-pin-fresh", "k")
    assert softhsm.open("fw-pin-fresh", "k").key_ref["key_label"] == "k"


def test_wrong_pin_is_refused_after_a_good_login_was_cached(softhsm: SoftHsm) -> None:
    key = softhsm.generate("fw-pin-cached", "k")
    wrong = softhsm.pin[::-1] + "x"
    for attempt in (lambda: softhsm.open("fw-pin-cached", "k", pin=wrong),
                    lambda: Pkcs11Signer.generate(module=MODULE, token_label="fw-pin-cached",
                                                  key_label="k2", pin=wrong)):
        with pytest.raises(KeyUnavailable) as refused:
            attempt()
        assert "cannot log in to token 'fw-pin-cached'" in refused.value.message
        assert refused.value.hint is not None and "PIN" in refused.value.hint
    # Control: the right PIN still opens the same key.
    assert same_key(key.public_key(), softhsm.open("fw-pin-cached", "k").public_key())


# (token, key label, words the message must have, words the hint must have)
LOOKUP_FAILURES = [
    ("fw-labels", "no-such-key", "no unique key 'no-such-key'", "key labels"),
    ("fw-no-such-token", "ca", "no unique PKCS#11 token", "--init-token"),
]


@pytest.fixture(scope="module")
def labelled_token(softhsm: SoftHsm) -> str:
    """A token that holds a key, so 'no such key' is about the label, not an empty token."""
    softhsm.generate("fw-labels", "present")
    return "fw-labels"


@pytest.mark.parametrize(("token", "key", "message", "hint"), LOOKUP_FAILURES,
                         ids=["unknown-key-label", "unknown-token-label"])
def test_missing_key_or_token_is_key_unavailable(softhsm: SoftHsm, labelled_token: str,
                                                 token: str, key: str, message: str,
                                                 hint: str) -> None:
    assert softhsm.open(labelled_token, "present").key_ref["token_label"] == labelled_token
    with pytest.raises(KeyUnavailable) as refused:
        softhsm.open(token, key)
    assert message in refused.value.message
    assert refused.value.hint is not None and hint in refused.value.hint


def test_second_key_with_the_same_label_is_refused(softhsm: SoftHsm) -> None:
    first = softhsm.generate("fw-labels", "dup")
    with pytest.raises(ConfigurationError, match="already holds a key labelled 'dup'"):
        softhsm.generate("fw-labels", "dup")
    # Still exactly one key: open() demands a unique label and finds the first one.
    assert same_key(first.public_key(), softhsm.open("fw-labels", "dup").public_key())


# --- end to end: `fleetward init --ca-key-backend pkcs11`, serve, openssl -------------------


def run(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    if ok:
        assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result


def private_key_files(data_dir: Path) -> set[str]:
    return {str(p.relative_to(data_dir)) for p in data_dir.rglob("*")
            if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}


def crl_checked_verify(public_url: str, chain: Path, cert: Path,
                       folder: Path) -> subprocess.CompletedProcess[str]:
    """`openssl verify -crl_check` with the issuing CRL fetched by curl (signed by the token)."""
    der, pem = folder / "issuing.crl", folder / "issuing-crl.pem"
    run("curl", "-fsS", "-o", der, f"{public_url}/crl/issuing.crl")
    run("openssl", "crl", "-inform", "DER", "-in", der, "-out", pem)
    return run("openssl", "verify", "-crl_check", "-CAfile", chain, "-CRLfile", pem, cert,
               ok=False)


def test_cli_init_with_pkcs11_keeps_ca_keys_on_the_token(softhsm: SoftHsm,
                                                         tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    pin_file.chmod(0o600)
    data_dir = tmp_path / "data"
    server = start_server(data_dir, env=dict(os.environ), extra_init=[
        "--ca-key-backend", "pkcs11", "--pkcs11-module", MODULE,
        "--pkcs11-token-label", "fw-cli", "--pkcs11-pin-file", str(pin_file)])
    try:
        assert sorted(p.name for p in (data_dir / "keys").iterdir()) == ["server.key"]
        assert private_key_files(data_dir) == {"keys/server.key"}
        cas = {c["name"]: c for c in json.loads(server.cli("ca", "show", "--json").stdout)}
        for name in ("root", "issuing"):
            assert cas[name]["key_backend"] == "pkcs11", cas[name]
        assert cas["issuing"]["key_online"] is True  # the server signs with the token key
        issuing_pem = data_dir / "certs" / "issuing-ca.pem"
        issuing_cert = x509.load_pem_x509_certificate(issuing_pem.read_bytes())
        token_key = softhsm.open("fw-cli", "fleetward-issuing-ca")
        assert same_key(token_key.public_key(), issuing_cert.public_key())
        assert token_key.token_private_key[Attribute.NEVER_EXTRACTABLE] is True

        server.cli("device", "add", "p11-cli-dev", "--type", "default")
        key, csr, cert = (tmp_path / f"dev.{ext}" for ext in ("key", "csr", "pem"))
        run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=p11-cli-dev")
        server.cli("cert", "issue", "--device", "p11-cli-dev", "--csr", str(csr),
                   "--out", str(cert))
        assert f"{cert}: OK" in run("openssl", "verify", "-CAfile", server.chain, cert).stdout
        serial = run("openssl", "x509", "-in", cert, "-noout", "-serial").stdout
        serial_hex = serial.strip().split("=", 1)[1].lower().lstrip("0")

        def ocsp_says() -> str:
            result = run("openssl", "ocsp", "-issuer", issuing_pem, "-cert", cert,
                         "-url", f"{server.public_url}/ocsp", "-CAfile", server.chain)
            assert "Response verify OK" in result.stderr, result.stderr
            return result.stdout

        # Controls: before the revocation the same commands say "good" and "OK".
        assert f"{cert}: good" in ocsp_says()
        assert crl_checked_verify(server.public_url, server.chain, cert, tmp_path).returncode == 0
        server.cli("cert", "revoke", serial_hex, "--reason", "keyCompromise")
        answer = ocsp_says()
        assert f"{cert}: revoked" in answer and "Reason: keyCompromise" in answer, answer

        checked = crl_checked_verify(server.public_url, server.chain, cert, tmp_path)
        assert checked.returncode != 0, checked.stdout
        assert "certificate revoked" in checked.stdout + checked.stderr

        # Access tokens are signed on the token too (the CA's backend): the key the JWKS
        # publishes is a non-extractable token key, and an issued token verifies with it.
        server.cli("device", "add", "p11-token-dev", "--type", "default")
        run("openssl", "req", "-new", "-key", key, "-out", csr, "-subj", "/CN=p11-token-dev")
        server.cli("cert", "issue", "--device", "p11-token-dev", "--csr", str(csr),
                   "--out", str(cert))
        issuer = f"https://127.0.0.1:{server.device_port}"
        answer = run("curl", "-sS", "--fail-with-body", "--cacert", server.chain,
                     "--cert", cert, "--key", key, "-d", "grant_type=client_credentials",
                     "-d", "client_id=p11-token-dev", f"{issuer}/oauth2/token").stdout
        token = json.loads(answer)["access_token"]
        jwks = json.loads(run("curl", "-sS", f"{server.public_url}/.well-known/jwks.json").stdout)
        [published] = jwks["keys"]
        claims = jwt.decode(token, jwt.PyJWK(published).key, algorithms=["ES256"],
                            audience=issuer, issuer=issuer)
        assert claims["sub"] == "p11-token-dev"
        # This process is logged in to the token already (softhsm.open above), and
        # PKCS#11 login state is per application: a plain session sees private objects.
        with pkcs11.lib(MODULE).get_token(token_label="fw-cli").open() as session:
            labels = [k.label for k in session.get_objects({
                Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY})]
        [token_label] = [label for label in labels if label.startswith("fleetward-token-")]
        token_key = softhsm.open("fw-cli", token_label)
        assert same_key(token_key.public_key(), jwt.PyJWK(published).key)
        assert token_key.token_private_key[Attribute.NEVER_EXTRACTABLE] is True
        assert private_key_files(data_dir) == {"keys/server.key"}  # no token key file
    finally:
        stop_server(server)
    assert "Traceback" not in server.log_file.read_text()


def test_control_file_backend_init_does_write_ca_key_files(tmp_path: Path) -> None:
    """The listing above sees CA key files when there are some (so its silence means it)."""
    data_dir = tmp_path / "data"
    run(*FLEETWARD, "init", "--data-dir", data_dir, "--public-url", "http://127.0.0.1:1",
        "--public-port", "1", "--admin-port", "2")
    found = private_key_files(data_dir)
    assert "keys/server.key" in found
    assert {"keys/root-ca.key", "keys/issuing-ca.key"} <= found, found
