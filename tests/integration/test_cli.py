"""The ``fleetward`` CLI against a real server, as an operator would use it.

On the server host the CLI finds everything in the data directory; elsewhere it needs
``--admin-url``, ``FLEETWARD_ADMIN_TOKEN`` and the CA chain. Every misconfiguration must
end in an error with a hint, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import RunningServer, free_port


def csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


def self_signed_ca_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def remote_env(server: RunningServer, token: str | None = None,
               **extra: str) -> dict[str, str]:
    """An operator's laptop: no data directory, only what is given explicitly."""
    env = server.env()
    for name in ("FLEETWARD_DATA_DIR", "FLEETWARD_ADMIN_CA", "FLEETWARD_ADMIN_URL",
                 "FLEETWARD_ADMIN_TOKEN"):
        env.pop(name, None)
    if token is not None:
        env["FLEETWARD_ADMIN_TOKEN"] = token
    env.update(extra)
    return env


def flat(text: str) -> str:
    """Rich wraps long error lines; compare on single spaces."""
    return " ".join(text.split())


def assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Non-zero exit, an error line and a hint line, no traceback."""
    output = flat(result.stderr)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert output.startswith("error: ") and " hint: " in output, result.stderr
    for needle in needles:
        assert needle in output, (needle, result.stderr)
    return output


def openssl_csr(directory: Path, cn: str) -> tuple[Path, Path]:
    key, csr = directory / f"{cn}.key", directory / f"{cn}.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
                    "-out", str(csr), "-subj", f"/CN={cn}"], check=True, capture_output=True)
    return key, csr


def api_device(server: RunningServer, device_id: str, certificates: int = 0) -> list[str]:
    """Set up through the API what a test does not exercise through the CLI."""
    with server.admin() as admin:
        assert admin.post("/v1/devices", json={"id": device_id, "type": "default"}
                          ).status_code == 201
        serials = []
        for _ in range(certificates):
            issued = admin.post(f"/v1/devices/{device_id}/certificates", json={"csr": csr_pem()})
            assert issued.status_code == 201, issued.text
            serials.append(issued.json()["serial"])
    return serials


def api_certs(server: RunningServer, device_id: str) -> dict[str, dict[str, Any]]:
    with server.admin() as admin:
        items = admin.get(f"/v1/devices/{device_id}/certificates").json()["items"]
    return {c["serial"]: c for c in items}


# --- on the server host ----------------------------------------------------------------


def test_device_add_and_list(server: RunningServer) -> None:
    device_id = f"cli-{secrets.token_hex(3)}"
    added = server.cli("device", "add", device_id, "--type", "default", "--owner", "acme",
                       "--label", "site=plant-3")
    assert f"device {device_id} registered (type default, owner acme)" in flat(added.stdout)
    table = server.cli("device", "list")
    row = next(line for line in table.stdout.splitlines() if device_id in line)
    assert "acme" in row and "registered" in row
    registered = json.loads(server.cli("device", "list", "--json", "--state", "registered")
                            .stdout)
    assert {d["state"] for d in registered["items"]} == {"registered"}
    [ours] = [d for d in registered["items"] if d["id"] == device_id]
    assert (ours["type"], ours["owner"], ours["labels"]) == ("default", "acme",
                                                            {"site": "plant-3"})


def test_device_add_refuses_a_label_without_a_value(server: RunningServer) -> None:
    device_id = f"cli-{secrets.token_hex(3)}"
    assert_clean_failure(server.cli("device", "add", device_id, "--type", "default",
                                    "--label", "no-equals-sign", check=False),
                         "bad label", "key=value")
    with server.admin() as admin:
        assert admin.get(f"/v1/devices/{device_id}").status_code == 404


def test_type_add_and_list(server: RunningServer) -> None:
    name = f"meter-{secrets.token_hex(3)}"
    server.cli("type", "add", name, "--description", "smart meters",
               "--message-type", "telemetry", "--message-type", "event")
    table = server.cli("type", "list").stdout
    row = next(line for line in table.splitlines() if name in line)
    assert "smart meters" in row and "telemetry, event" in row
    with server.admin() as admin:
        types = {t["name"]: t for t in admin.get("/v1/device-types").json()["items"]}
    assert types[name]["message_types"] == ["telemetry", "event"]


def test_cert_issue_from_an_openssl_csr_list_and_revoke(server: RunningServer,
                                                        tmp_path: Path) -> None:
    device_id = f"cli-{secrets.token_hex(3)}"
    api_device(server, device_id)
    key, csr = openssl_csr(tmp_path, device_id)
    cert = tmp_path / "device.pem"
    issued = server.cli("cert", "issue", "--device", device_id, "--csr", str(csr),
                        "--out", str(cert))
    # The certificate chains to our CA and carries the key the CSR was made with.
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(server.chain), str(cert)],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout.strip().endswith(": OK"), verify
    cert_key = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-pubkey"],
                              capture_output=True, text=True, check=True).stdout
    own_key = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout"],
                             capture_output=True, text=True, check=True).stdout
    assert cert_key == own_key
    openssl_serial = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-serial"],
                                    capture_output=True, text=True, check=True
                                    ).stdout.strip().removeprefix("serial=").lower()

    listed = json.loads(server.cli("cert", "list", "--device", device_id, "--json").stdout)
    assert [(c["serial"], c["status"]) for c in listed] == [(openssl_serial.lstrip("0"),
                                                             "valid")]
    serial = listed[0]["serial"]
    assert f"issued serial {serial} to {device_id}" in flat(issued.stdout)
    shown = json.loads(server.cli("device", "show", device_id, "--json").stdout)
    assert (shown["id"], shown["type"]) == (device_id, "default")
    assert shown["state"] == "active"  # the first certificate activates the device
    assert [(c["serial"], c["status"]) for c in shown["certificates"]] == [(serial, "valid")]

    revoked = server.cli("cert", "revoke", serial, "--reason", "superseded")
    assert f"revoked {serial}" in revoked.stdout
    assert api_certs(server, device_id)[serial]["status"] == "revoked"
    assert api_certs(server, device_id)[serial]["revocation_reason"] == "superseded"


def test_cert_revoke_every_certificate_of_a_device(server: RunningServer) -> None:
    device_id = f"cli-{secrets.token_hex(3)}"
    bystander = f"cli-{secrets.token_hex(3)}"
    serials = api_device(server, device_id, certificates=2)
    [other] = api_device(server, bystander, certificates=1)
    result = server.cli("cert", "revoke", "--device", device_id, "--reason", "keyCompromise")
    assert f"revoked 2 certificate(s) of {device_id}" in result.stdout
    certs = api_certs(server, device_id)
    assert sorted(certs) == sorted(serials)
    assert {(c["status"], c["revocation_reason"]) for c in certs.values()} == {
        ("revoked", "key_compromise")}
    assert api_certs(server, bystander)[other]["status"] == "valid"


@pytest.mark.parametrize("case", ["neither", "both"])
def test_cert_revoke_needs_a_serial_or_a_device_not_both(server: RunningServer,
                                                         case: str) -> None:
    device_id = f"cli-{secrets.token_hex(3)}"
    [serial] = api_device(server, device_id, certificates=1)
    args = [] if case == "neither" else [serial, "--device", device_id]
    assert_clean_failure(server.cli("cert", "revoke", *args, check=False),
                         "give either a SERIAL or --device ID", "cert revoke --device")
    assert api_certs(server, device_id)[serial]["status"] == "valid"


def test_ca_show_lists_root_and_issuing_with_keys_online(server: RunningServer) -> None:
    cas = {c["kind"]: c for c in json.loads(server.cli("ca", "show", "--json").stdout)}
    assert {"root", "issuing"} <= cas.keys()
    assert cas["issuing"]["parent"] == cas["root"]["name"]
    assert cas["root"]["key_online"] is True and cas["issuing"]["key_online"] is True
    chain = server.chain.read_text()
    assert cas["issuing"]["certificate_pem"].strip() in chain
    assert cas["root"]["certificate_pem"].strip() in chain


def test_audit_tail_shows_the_newest_events_oldest_first(server: RunningServer) -> None:
    marker = f"cli-{secrets.token_hex(3)}"
    api_device(server, marker)
    tail = json.loads(server.cli("audit", "tail", "-n", "3", "--json").stdout)
    with server.admin() as admin:
        newest = admin.get("/v1/audit", params={"order": "desc", "limit": 3}).json()["items"]
    assert len(tail) == 3
    assert [e["seq"] for e in tail] == sorted(e["seq"] for e in tail)
    assert tail == list(reversed(newest))
    assert (tail[-1]["action"], tail[-1]["target"]) == ("device.created", f"device:{marker}")


def test_operator_add_prints_a_token_that_works_remotely_for_its_role(
        server: RunningServer, tmp_path: Path) -> None:
    """Remote mode: --admin-url, FLEETWARD_ADMIN_TOKEN and --ca-file; no data directory."""
    name = f"auditor-{secrets.token_hex(3)}"
    created = server.cli("operator", "add", name, "--role", "auditor")
    token = created.stdout.strip()
    assert token.startswith("fwa_") and "\n" not in token  # stdout is the token alone
    assert "cannot be shown again" in created.stderr
    chain = tmp_path / "fleetward-chain.pem"
    shutil.copy(server.chain, chain)
    env = remote_env(server, token)
    url = ["--admin-url", server.admin_url, "--ca-file", str(chain)]
    reads = server.cli("device", "list", "--json", *url, env=env)
    assert "items" in json.loads(reads.stdout)
    refused = server.cli("device", "add", f"{name}-dev", "--type", "default", *url, env=env,
                         check=False)
    assert_clean_failure(refused, "role auditor may not do this", "ask an admin")
    listed = server.cli("operator", "list").stdout
    row = next(line for line in listed.splitlines() if name in line)
    assert "auditor" in row
    assert token.split(".")[1] not in listed and token.split(".")[1][:12] not in listed


# --- from another host -----------------------------------------------------------------


def test_remote_mode_from_environment_variables_only(server: RunningServer,
                                                    tmp_path: Path) -> None:
    chain = tmp_path / "fleetward-chain.pem"
    shutil.copy(server.chain, chain)
    [serial] = api_device(server, device_id := f"cli-{secrets.token_hex(3)}", certificates=1)
    env = remote_env(server, server.token, FLEETWARD_ADMIN_URL=server.admin_url,
                     FLEETWARD_ADMIN_CA=str(chain))
    server.cli("cert", "revoke", serial, "--reason", "cessationOfOperation", env=env)
    assert api_certs(server, device_id)[serial]["revocation_reason"] == "cessation_of_operation"


def _other_ca(directory: Path) -> Path:
    path = directory / "other-ca.pem"
    path.write_text(self_signed_ca_pem())
    return path


def _not_pem(directory: Path) -> Path:
    path = directory / "notes.txt"
    path.write_text("this is not a certificate\n")
    return path


# case: (args after `device list`, token, extra env, what the error must say)
MISCONFIGURED: dict[str, tuple[Any, ...]] = {
    "nothing-configured": (lambda s, d: [], None, {},
                           ["no admin API to talk to", "FLEETWARD_ADMIN_TOKEN", "--admin-url"]),
    "url-without-token": (lambda s, d: ["--admin-url", s.admin_url, "--ca-file", str(s.chain)],
                          None, {}, ["no admin API to talk to", "FLEETWARD_ADMIN_TOKEN"]),
    "ca-file-of-another-ca": (lambda s, d: ["--admin-url", s.admin_url,
                                            "--ca-file", str(_other_ca(d))], "admin", {},
                              ["cannot verify the TLS certificate", "--ca-file"]),
    "no-ca-file-system-trust": (lambda s, d: ["--admin-url", s.admin_url], "admin", {},
                                ["cannot verify the TLS certificate", "--ca-file"]),
    "ca-file-missing": (lambda s, d: ["--admin-url", s.admin_url,
                                      "--ca-file", str(d / "absent.pem")], "admin", {},
                        ["absent.pem", "--ca-file"]),
    "ca-file-not-pem": (lambda s, d: ["--admin-url", s.admin_url,
                                      "--ca-file", str(_not_pem(d))], "admin", {},
                        ["notes.txt", "PEM"]),
    "server-not-running": (lambda s, d: ["--admin-url", f"https://localhost:{free_port()}",
                                         "--ca-file", str(s.chain)], "admin", {},
                           ["cannot reach the admin API", "is `fleetward serve` running"]),
    "wrong-token": (lambda s, d: ["--admin-url", s.admin_url, "--ca-file", str(s.chain)],
                    "fwa_0123456789abcdef.not-the-secret", {},
                    ["authentication failed", "FLEETWARD_ADMIN_TOKEN"]),
}


@pytest.fixture(scope="module")
def misconfigured_runs(server: RunningServer, tmp_path_factory: pytest.TempPathFactory,
                       ) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run every misconfigured `device list` at once; each CLI start costs about a second."""
    directory = tmp_path_factory.mktemp("remote")

    def run(case: str) -> subprocess.CompletedProcess[str]:
        build, token, extra, _ = MISCONFIGURED[case]
        token = server.token if token == "admin" else token
        return server.cli("device", "list", *build(server, directory), check=False,
                          env=remote_env(server, token, **extra))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(MISCONFIGURED, pool.map(run, MISCONFIGURED), strict=True))


@pytest.mark.parametrize("case", list(MISCONFIGURED))
def test_misconfigured_remote_cli_fails_with_a_hint_not_a_traceback(
        misconfigured_runs: dict[str, subprocess.CompletedProcess[str]], case: str) -> None:
    assert_clean_failure(misconfigured_runs[case], *MISCONFIGURED[case][3])
