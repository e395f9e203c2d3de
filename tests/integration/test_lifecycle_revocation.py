"""Lifecycle verbs of the CLI against a real server, and what relying parties then see.

Threats: an operator marks a stolen device compromised and a relying party that asks
with stock tools (``openssl ocsp``, ``curl`` + ``openssl crl``) still hears "good", or
hears a reason that does not say the key leaked; a forbidden change goes through, or is
refused without saying what would be allowed.

Setup goes through the admin API (one CLI start costs ~0.8 s); the step under test is
always the ``fleetward`` command an operator would type.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import RunningServer

VERBS = {  # CLI verb → the state it asks for
    "enable": "active",
    "disable": "disabled",
    "quarantine": "quarantined",
    "release": "active",
    "compromise": "compromised",
    "retire": "retired",
}
STATE_NAMES = ("registered", "active", "disabled", "quarantined", "compromised", "retired")


def flat(text: str) -> str:
    """Rich wraps long lines; compare on single spaces."""
    return " ".join(text.split())


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result


def openssl_csr(device_id: str, folder: Path) -> Path:
    """A fresh P-256 key and CSR made by `openssl req`, as a device vendor would."""
    n = len(list(folder.glob(f"{device_id}-*.csr")))
    key, csr = folder / f"{device_id}-{n}.key", folder / f"{device_id}-{n}.csr"
    run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={device_id}")
    return csr


def serial_of(cert: Path) -> int:
    out = run("openssl", "x509", "-in", cert, "-noout", "-serial").stdout
    return int(out.strip().split("=", 1)[1], 16)


def cli_issue(server: RunningServer, device_id: str, folder: Path) -> tuple[Path, int]:
    """`fleetward cert issue` from an openssl CSR; (certificate file, serial)."""
    csr = openssl_csr(device_id, folder)
    cert = csr.with_suffix(".pem")
    out = flat(server.cli("cert", "issue", "--device", device_id, "--csr", str(csr),
                          "--out", str(cert)).stdout)
    serial = serial_of(cert)
    assert f"issued serial {serial:x} to {device_id}" in out, out
    return cert, serial


def api_issue(server: RunningServer, device_id: str, folder: Path) -> tuple[Path, int]:
    """The same through the admin API, for certificates that are only scenery."""
    csr = openssl_csr(device_id, folder)
    with server.admin() as admin:
        response = admin.post(f"/v1/devices/{device_id}/certificates",
                              json={"csr": csr.read_text(), "profile": "device"})
    assert response.status_code in (200, 201), response.text
    cert = csr.with_suffix(".pem")
    cert.write_text(response.json()["pem"])
    return cert, serial_of(cert)


def add_device(server: RunningServer, device_id: str, *states: str) -> None:
    with server.admin() as admin:
        response = admin.post("/v1/devices", json={"id": device_id, "type": "default"})
        assert response.status_code in (200, 201), response.text
        for state in states:
            response = admin.post(f"/v1/devices/{device_id}/state", json={"state": state})
            assert response.status_code == 200, response.text


def state_of(server: RunningServer, device_id: str) -> str:
    with server.admin() as admin:
        return str(admin.get(f"/v1/devices/{device_id}").json()["state"])


def ocsp(server: RunningServer, cert: Path) -> str:
    result = run("openssl", "ocsp", "-issuer", server.data_dir / "certs" / "issuing-ca.pem",
                 "-cert", cert, "-url", f"{server.public_url}/ocsp", "-CAfile", server.chain)
    # Signed by the issuing CA and checked against the chain: an unsigned or forged answer
    # would not print this.
    assert "Response verify OK" in result.stderr, result.stderr
    return result.stdout


def crl_entries(server: RunningServer, folder: Path) -> dict[int, str]:
    """serial → reason text of the issuing CA's CRL, fetched with curl, read by openssl."""
    der = folder / "issuing.crl"
    run("curl", "-fsS", "-o", der, f"{server.public_url}/crl/issuing.crl")
    verified = run("openssl", "crl", "-inform", "DER", "-in", der, "-noout",
                   "-CAfile", server.data_dir / "certs" / "issuing-ca.pem")
    assert "verify OK" in verified.stderr + verified.stdout
    text = run("openssl", "crl", "-inform", "DER", "-in", der, "-noout", "-text").stdout
    entries: dict[int, str] = {}
    for block in text.split("Serial Number:")[1:]:
        reason = re.search(r"CRL Reason Code:\s*\n\s*(.+)", block)
        entries[int(block.split()[0], 16)] = reason.group(1).strip() if reason else ""
    return entries


def test_every_verb_prints_its_transition_and_retired_is_final(
        server: RunningServer, tmp_path: Path) -> None:
    add_device(server, "lc-walk")
    cli_issue(server, "lc-walk", tmp_path)
    assert state_of(server, "lc-walk") == "active"  # the first certificate activates it
    path = [("disable", "active", "disabled"), ("enable", "disabled", "active"),
            ("quarantine", "active", "quarantined"), ("release", "quarantined", "active"),
            ("compromise", "active", "compromised"), ("retire", "compromised", "retired")]
    for verb, before, after in path:
        out = flat(server.cli("device", verb, "lc-walk", "--reason", f"test {verb}").stdout)
        assert f"device lc-walk: {before} → {after}" in out, out
    assert state_of(server, "lc-walk") == "retired"

    one_per_target = ["enable", "disable", "quarantine", "compromise", "retire"]
    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(one_per_target, pool.map(
            lambda verb: server.cli("device", verb, "lc-walk", check=False), one_per_target),
            strict=True))
    for verb, result in results.items():
        err = flat(result.stderr)
        assert result.returncode != 0, f"{verb} after retire went through: {result.stdout}"
        assert f"error: a device cannot move from retired to {VERBS[verb]}" in err, err
        assert "hint: retired is terminal" in err, err
        assert "Traceback" not in result.stderr
    assert state_of(server, "lc-walk") == "retired"


# (states the device is brought to, forbidden verb, states the hint must name)
FORBIDDEN = [
    ([], "disable", ["active", "compromised", "retired"]),
    ([], "quarantine", ["active", "compromised", "retired"]),
    (["active"], "enable", ["compromised", "disabled", "quarantined", "retired"]),
    (["active", "disabled"], "quarantine", ["active", "compromised", "retired"]),
    (["active", "quarantined"], "disable", ["active", "compromised", "retired"]),
    (["compromised"], "release", ["retired"]),
    (["active", "compromised"], "compromise", ["retired"]),
]


@pytest.mark.parametrize(("states", "verb", "allowed"), FORBIDDEN,
                         ids=[f"{(s or ['registered'])[-1]}:{v}" for s, v, _ in FORBIDDEN])
def test_forbidden_verb_exits_nonzero_naming_the_allowed_states(
        server: RunningServer, states: list[str], verb: str, allowed: list[str]) -> None:
    device_id = f"lc-no-{'-'.join(states) or 'new'}-{verb}"
    add_device(server, device_id, *states)
    before = (states or ["registered"])[-1]

    result = server.cli("device", verb, device_id, check=False)

    err = flat(result.stderr)
    assert result.returncode != 0, result.stdout
    assert f"error: a device cannot move from {before} to {VERBS[verb]}" in err, err
    assert f"hint: from {before} a device may move to: {', '.join(allowed)}" in err, err
    offered = err.split("may move to:", 1)[1]
    named = set(re.findall(r"\b(" + "|".join(STATE_NAMES) + r")\b", offered))
    assert named == set(allowed), err
    assert "Traceback" not in result.stderr
    assert state_of(server, device_id) == before


def test_compromise_reaches_openssl_ocsp_and_the_crl(server: RunningServer,
                                                    tmp_path: Path) -> None:
    add_device(server, "lc-stolen")
    add_device(server, "lc-bystander")
    old, old_serial = api_issue(server, "lc-stolen", tmp_path)
    cert, serial = cli_issue(server, "lc-stolen", tmp_path)
    other, other_serial = api_issue(server, "lc-bystander", tmp_path)
    with server.admin() as admin:
        assert admin.post(f"/v1/certificates/{old_serial:x}/revoke",
                          json={"reason": "superseded"}).status_code == 200
    # Negative control: before the compromise the very same command says "good".
    before = ocsp(server, cert)
    assert f"{cert}: good" in before and "revoked" not in before, before
    assert serial not in crl_entries(server, tmp_path)

    out = flat(server.cli("device", "compromise", "lc-stolen", "--reason", "stolen").stdout)

    assert "device lc-stolen: active → compromised" in out, out
    assert f"revoked certificates: {serial:x}" in out, out
    answer = ocsp(server, cert)
    assert f"{cert}: revoked" in answer and "Reason: keyCompromise" in answer, answer
    superseded = ocsp(server, old)
    assert f"{old}: revoked" in superseded and "Reason: superseded" in superseded, superseded
    assert f"{other}: good" in ocsp(server, other)
    entries = crl_entries(server, tmp_path)
    assert entries[serial] == "Key Compromise"
    assert entries[old_serial] == "Superseded"  # an earlier reason is not rewritten
    assert other_serial not in entries


def test_retire_reaches_openssl_ocsp_and_the_crl(server: RunningServer, tmp_path: Path) -> None:
    add_device(server, "lc-scrapped")
    cert, serial = api_issue(server, "lc-scrapped", tmp_path)
    assert state_of(server, "lc-scrapped") == "active"

    out = flat(server.cli("device", "retire", "lc-scrapped").stdout)

    assert "device lc-scrapped: active → retired" in out, out
    answer = ocsp(server, cert)
    assert f"{cert}: revoked" in answer and "Reason: cessationOfOperation" in answer, answer
    assert crl_entries(server, tmp_path)[serial] == "Cessation Of Operation"
    refused_out = tmp_path / "refused.pem"
    refused = server.cli("cert", "issue", "--device", "lc-scrapped", "--csr",
                         str(openssl_csr("lc-scrapped", tmp_path)), "--out", str(refused_out),
                         check=False)
    assert refused.returncode != 0, refused.stdout
    assert "error: device lc-scrapped is retired" in flat(refused.stderr), refused.stderr
    assert not refused_out.exists()


# The table allows disabled → active and quarantined → active, but the verbs carry
# intent: `release` must not re-enable a disabled device and `enable` must not lift a
# quarantine without the recovery step.
WRONG_INTENT = [
    (["active", "disabled"], "release", "quarantined"),
    (["active", "quarantined"], "enable", "disabled, registered"),
]


@pytest.mark.parametrize(("states", "verb", "applies_to"), WRONG_INTENT,
                         ids=[f"{s[-1]}:{v}" for s, v, _ in WRONG_INTENT])
def test_verb_refuses_a_legal_move_it_does_not_mean(
        server: RunningServer, states: list[str], verb: str, applies_to: str) -> None:
    device_id = f"lc-intent-{states[-1]}-{verb}"
    add_device(server, device_id, *states)

    result = server.cli("device", verb, device_id, check=False)

    err = flat(result.stderr)
    assert result.returncode != 0, result.stdout
    assert f"is {states[-1]}; this action applies only to devices that are {applies_to}" in err
    assert "hint:" in err and "Traceback" not in err
    with server.admin() as admin:
        assert admin.get(f"/v1/devices/{device_id}").json()["state"] == states[-1]
    # The intended verb still works from there.
    intended = "enable" if verb == "release" else "release"
    assert server.cli("device", intended, device_id, check=False).returncode == 0
