"""Factory provisioning against a real server: token manifests and folders of CSRs.

The threats: a manifest (the only copy of the tokens) that is world-readable, silently
overwritten or lost half-way; tokens kept in plaintext on the server; a re-run that
doubles certificates; a CSR that smuggles in another device's identity.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import shutil
import sqlite3
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FLEETWARD, RunningServer, start_server
from tests.integration.enroll_helpers import csr_der, est_enroll, openssl_csr
from tests.integration.test_cli import assert_clean_failure, flat
from tests.integration.test_cli import csr_pem as csr_pem_without_subject

HEADER = ["device_id", "token", "token_id", "expires_at"]
SUMMARY = re.compile(r"signed (\d+), already signed (\d+), failed (\d+)")


def new_type(server: RunningServer) -> str:
    name = f"line-{secrets.token_hex(3)}"
    with server.admin() as admin:
        response = admin.post("/v1/device-types", json={"name": name})
    assert response.status_code == 201, response.text
    return name


def devices_of(server: RunningServer, type_name: str) -> dict[str, dict[str, Any]]:
    with server.admin() as admin:
        response = admin.get("/v1/devices", params={"type": type_name, "limit": 1000})
    assert response.status_code == 200, response.text
    return {d["id"]: d for d in response.json()["items"]}


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == HEADER
        return list(reader)


def summary(text: str) -> tuple[int, int, int]:
    match = SUMMARY.search(flat(text))
    assert match, text
    signed, already, failed = (int(g) for g in match.groups())
    return signed, already, failed


def certs(server: RunningServer, device_id: str) -> list[dict[str, Any]]:
    with server.admin() as admin:
        response = admin.get(f"/v1/devices/{device_id}/certificates")
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], check=True, capture_output=True,
                          text=True).stdout


# --- tokens ----------------------------------------------------------------------------


def test_manifest_is_written_once_0600_with_one_row_per_registered_device(
        server: RunningServer, tmp_path: Path) -> None:
    line = new_type(server)
    manifest = tmp_path / "manifest.csv"
    result = server.cli("factory", "tokens", "--type", line, "--count", "7", "--out",
                        str(manifest), "--owner", "acme", "--id-prefix", "p3-",
                        "--ttl-hours", "48")
    assert f"registered 7 {line} devices" in flat(result.stdout)
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600
    rows = read_manifest(manifest)
    assert len(rows) == 7
    ids = [r["device_id"] for r in rows]
    assert len(set(ids)) == 7
    assert all(re.fullmatch(r"p3-[0-9a-f]{12}", i) for i in ids), ids
    assert all(r["token"].startswith(f"fwb_{r['token_id']}.") for r in rows)
    stored = devices_of(server, line)
    assert set(stored) == set(ids)
    assert {(d["state"], d["owner"]) for d in stored.values()} == {("registered", "acme")}
    [event] = [e for e in _audit(server, "factory.tokens_created")
               if e["target"] == f"type:{line}"]
    assert event["details"]["count"] == 7
    assert not any(r["token"].partition(".")[2] in json.dumps(event) for r in rows)

    # Never again into the same file: it holds the only copy of seven tokens.
    before = manifest.read_bytes()
    again = server.cli("factory", "tokens", "--type", line, "--count", "3", "--out",
                       str(manifest), check=False)
    assert_clean_failure(again, "already exists", "choose another --out file")
    assert manifest.read_bytes() == before
    assert set(devices_of(server, line)) == set(ids)  # and nothing was registered


def test_manifest_refuses_a_symlink_planted_at_its_path(server: RunningServer,
                                                        tmp_path: Path) -> None:
    line = new_type(server)
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("keep me\n")
    planted = tmp_path / "manifest.csv"
    planted.symlink_to(victim)
    assert_clean_failure(server.cli("factory", "tokens", "--type", line, "--count", "2",
                                    "--out", str(planted), check=False), "already exists")
    assert victim.read_text() == "keep me\n"
    assert devices_of(server, line) == {}


def test_manifest_tokens_are_not_stored_in_plaintext(server: RunningServer,
                                                     tmp_path: Path) -> None:
    line = new_type(server)
    manifest = tmp_path / "m.csv"
    server.cli("factory", "tokens", "--type", line, "--count", "5", "--out", str(manifest))
    rows = read_manifest(manifest)
    raw = b"".join(f.read_bytes() for f in sorted(server.data_dir.glob("fleetward.db*")))
    conn = sqlite3.connect(f"file:{server.data_dir / 'fleetward.db'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        cells = [repr(v) for t in tables for row in conn.execute(f'SELECT * FROM "{t}"')
                 for v in row]
    finally:
        conn.close()
    for row in rows:
        secret = row["token"].partition(".")[2]
        assert len(secret) >= 40
        assert secret.encode() not in raw, "a token secret is in the database files"
        assert not [c for c in cells if secret in c]
        # Negative controls: the search sees what is stored (ids, the device rows).
        assert row["token_id"].encode() in raw
        assert any(row["device_id"] in c for c in cells)


def test_manifest_tokens_enroll_their_own_devices_only(server: RunningServer,
                                                       tmp_path: Path) -> None:
    line = new_type(server)
    manifest = tmp_path / "m.csv"
    server.cli("factory", "tokens", "--type", line, "--count", "2", "--out", str(manifest))
    first, second = read_manifest(manifest)
    swapped = est_enroll(server, csr_der(second["device_id"]),
                         basic=(second["device_id"], first["token"]))
    assert swapped.status_code == 401, swapped.text
    own = est_enroll(server, csr_der(first["device_id"]),
                     basic=(first["device_id"], first["token"]))
    assert own.status_code == 200, own.text
    states = {i: d["state"] for i, d in devices_of(server, line).items()}
    assert states == {first["device_id"]: "active", second["device_id"]: "registered"}


def test_large_runs_go_in_chunks_of_500(server: RunningServer, tmp_path: Path) -> None:
    line = new_type(server)
    manifest = tmp_path / "m.csv"
    server.cli("factory", "tokens", "--type", line, "--count", "501", "--out", str(manifest))
    rows = read_manifest(manifest)
    assert len(rows) == len({r["device_id"] for r in rows}) == 501
    batches = [e["details"]["count"] for e in _audit(server, "factory.tokens_created")
               if e["target"] == f"type:{line}"]
    assert sorted(batches) == [1, 500]


@pytest.mark.parametrize(("args", "needle"), [
    (["--type", "no-such-type", "--count", "3"], "device type 'no-such-type' does not exist"),
    (["--type", "{line}", "--count", "3", "--id-prefix", "a/b"], "invalid id prefix"),
    (["--type", "{line}", "--count", "3", "--ttl-hours", "9999"], "ttl_hours"),
    (["--type", "{line}", "--count", "3", "--owner", "o" * 129], "owner"),
])
def test_a_refused_run_leaves_no_manifest_and_no_devices(server: RunningServer,
                                                         tmp_path: Path, args: list[str],
                                                         needle: str) -> None:
    line = new_type(server)
    manifest = tmp_path / "m.csv"
    result = server.cli("factory", "tokens", *[a.format(line=line) for a in args], "--out",
                        str(manifest), check=False)
    assert_clean_failure(result, needle, "nothing was created")
    assert not manifest.exists()
    assert devices_of(server, line) == {}


@pytest.mark.parametrize(("body", "needle"), [
    ({"count": 501}, "between 1 and 500"),
    ({"count": 0}, "between 1 and 500"),
    ({"count": "5"}, "must be an integer"),
    ({"count": 2, "id_prefix": "-x"}, "invalid id prefix"),
    ({"count": 2, "id_prefix": "x" * 117}, "longer than 116"),
    ({"count": 2, "token": "x"}, "token"),
])
def test_factory_token_requests_are_validated(server: RunningServer, body: dict[str, Any],
                                              needle: str) -> None:
    line = new_type(server)
    with server.admin() as admin:
        response = admin.post("/v1/factory/tokens", json={"type": line, **body})
    assert response.status_code == 400, response.text
    assert needle in response.json()["detail"]
    assert devices_of(server, line) == {}


def test_a_failure_half_way_keeps_the_rows_already_written(tmp_path: Path) -> None:
    """The server dies during a long run: the manifest keeps every token it received."""
    own = start_server(tmp_path / "data")
    manifest = tmp_path / "m.csv"
    try:
        run = subprocess.Popen(
            [*FLEETWARD, "factory", "tokens", "--type", "default", "--count", "20000",
             "--out", str(manifest)], env=own.env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _rows(manifest) < 500:
            time.sleep(0.05)
        assert _rows(manifest) >= 500, "the first chunk never arrived"
    finally:
        # SIGKILL: the connection drops mid-request, the worst case for the manifest.
        own.process.kill()
        own.process.wait(10)
    stdout, stderr = run.communicate(timeout=120)
    rows = read_manifest(manifest)
    assert run.returncode != 0
    assert 500 <= len(rows) < 20000 and len(rows) % 500 == 0
    output = flat(stderr)
    assert f"created {len(rows)} of 20000 devices; their rows are in {manifest}" in output
    assert "fleetward bootstrap-token create --device ID" in output  # what to do about the orphans
    assert "Traceback" not in stderr + stdout
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600
    conn = sqlite3.connect(f"file:{own.data_dir / 'fleetward.db'}?mode=ro", uri=True)
    try:
        stored = {r[0] for r in conn.execute("SELECT id FROM devices")}
    finally:
        conn.close()
    assert {r["device_id"] for r in rows} <= stored


def _rows(manifest: Path) -> int:
    try:
        return max(0, len(manifest.read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def _audit(server: RunningServer, action: str) -> list[dict[str, Any]]:
    with server.admin() as admin:
        response = admin.get("/v1/audit", params={"action": action, "order": "desc",
                                                  "limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


# --- signing CSRs ------------------------------------------------------------------------


def csr_folder(directory: Path, prefix: str, count: int = 5) -> dict[str, Path]:
    """CSRs named by the naming rule, in all three accepted spellings; device id → key."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = {}
    for n in range(count):
        device_id = f"{prefix}-{n}"
        kind = n % 3
        key, csr = openssl_csr(directory, device_id, der=kind == 2)
        if kind == 1:
            csr.rename(csr.with_suffix(".pem"))
        keys[device_id] = key
    return keys


def test_sign_a_folder_verify_and_rerun_without_new_certificates(server: RunningServer,
                                                                  tmp_path: Path) -> None:
    line = new_type(server)
    prefix = f"unit-{secrets.token_hex(3)}"
    csr_dir, out_dir = tmp_path / "csrs", tmp_path / "out"
    keys = csr_folder(csr_dir, prefix)
    (csr_dir / "README.txt").write_text("not a CSR; ignored\n")

    first = server.cli("factory", "sign", "--type", line, "--csr-dir", str(csr_dir),
                       "--out-dir", str(out_dir), "--owner", "acme")
    assert summary(first.stdout) == (5, 0, 0)
    chain = out_dir / "chain.pem"
    assert chain.read_text() == server.chain.read_text()
    serials = {}
    for device_id, key in keys.items():
        cert = out_dir / f"{device_id}.pem"
        verified = subprocess.run(["openssl", "verify", "-CAfile", str(chain), str(cert)],
                                  capture_output=True, text=True)
        assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK"), verified
        assert openssl("x509", "-in", str(cert), "-noout", "-pubkey") == openssl(
            "pkey", "-in", str(key), "-pubout")
        assert f"CN={device_id}" in openssl("x509", "-in", str(cert), "-noout", "-subject"
                                            ).replace(" ", "")
        [record] = certs(server, device_id)
        serials[device_id] = record["serial"]
    stored = devices_of(server, line)
    assert set(stored) == set(keys)
    assert {(d["state"], d["owner"]) for d in stored.values()} == {("active", "acme")}

    # Re-run: every certificate is already in the output folder; nothing is asked for.
    before = _audit(server, "certificate.issued")[0]["seq"]
    again = server.cli("factory", "sign", "--type", line, "--csr-dir", str(csr_dir),
                       "--out-dir", str(out_dir))
    assert summary(again.stdout) == (0, 5, 0)
    # Lost output file: the server returns the certificate it issued, not a new one.
    lost = f"{prefix}-3"
    (out_dir / f"{lost}.pem").unlink()
    third = server.cli("factory", "sign", "--type", line, "--csr-dir", str(csr_dir),
                       "--out-dir", str(out_dir))
    assert summary(third.stdout) == (0, 5, 0)
    assert _audit(server, "certificate.issued")[0]["seq"] == before
    for device_id, serial in serials.items():
        assert [c["serial"] for c in certs(server, device_id)] == [serial]
    restored = openssl("x509", "-in", str(out_dir / f"{lost}.pem"), "-noout", "-serial")
    assert restored.strip().removeprefix("serial=").lower().lstrip("0") == serials[lost]


def test_a_csr_naming_another_device_is_refused_and_reported(server: RunningServer,
                                                             tmp_path: Path) -> None:
    line = new_type(server)
    csr_dir, out_dir = tmp_path / "csrs", tmp_path / "out"
    csr_dir.mkdir()
    good = f"good-{secrets.token_hex(3)}"
    victim = f"victim-{secrets.token_hex(3)}"
    openssl_csr(csr_dir, good)
    # The file claims to be `impostor`, the CSR asks for the victim's name.
    impostor = f"impostor-{secrets.token_hex(3)}"
    _, csr = openssl_csr(csr_dir, impostor, cn=victim)
    result = server.cli("factory", "sign", "--type", line, "--csr-dir", str(csr_dir),
                        "--out-dir", str(out_dir), check=False)
    assert result.returncode == 1
    assert summary(result.stdout) == (1, 0, 1)
    failure = flat(result.stderr)
    assert f"failed: {csr.name} ({impostor}):" in failure and "Traceback" not in failure
    assert (out_dir / f"{good}.pem").exists() and not (out_dir / f"{impostor}.pem").exists()
    assert set(devices_of(server, line)) == {good}  # the refusal registered nobody
    refusals = [e for e in _audit(server, "factory.sign_refused")
                if e["target"] == f"device:{impostor}"]
    assert len(refusals) == 1 and refusals[0]["outcome"] == "failure"
    # Negative control: the same CSR under the name it asks for is signed.
    shutil.move(csr, csr_dir / f"{victim}.csr")
    fixed = server.cli("factory", "sign", "--type", line, "--csr-dir", str(csr_dir),
                       "--out-dir", str(out_dir))
    assert summary(fixed.stdout) == (1, 1, 0)


def test_sign_with_a_manifest_of_file_names(server: RunningServer, tmp_path: Path) -> None:
    line = new_type(server)
    csr_dir, out_dir = tmp_path / "csrs", tmp_path / "out"
    csr_dir.mkdir()
    mapping = {}
    for n in range(3):
        _, csr = openssl_csr(csr_dir, f"scan-{n}", cn=f"m-{secrets.token_hex(3)}")
        mapping[csr.name] = openssl("req", "-in", str(csr), "-noout", "-subject"
                                    ).strip().rpartition("=")[2].strip()
    manifest = tmp_path / "map.csv"
    manifest.write_text("csr_file,device_id\n" + "".join(
        f"{name},{device_id}\n" for name, device_id in mapping.items()))
    result = server.cli("factory", "sign", "--type", line, "--csr-dir", str(csr_dir),
                        "--out-dir", str(out_dir), "--manifest", str(manifest))
    assert summary(result.stdout) == (3, 0, 0)
    assert set(devices_of(server, line)) == set(mapping.values())
    assert {p.name for p in out_dir.iterdir()} == {f"{d}.pem" for d in mapping.values()} | {
        "chain.pem"}


@pytest.mark.parametrize(("setup", "needle"), [
    ("duplicate", "two CSRs for device"),
    ("empty", "no CSRs to sign"),
    ("bad-manifest", "needs the columns csr_file,device_id"),
])
def test_sign_refuses_an_unclear_folder_before_signing_anything(
        server: RunningServer, tmp_path: Path, setup: str, needle: str) -> None:
    line = new_type(server)
    csr_dir = tmp_path / "csrs"
    csr_dir.mkdir()
    args: list[str] = []
    if setup == "duplicate":
        _, csr = openssl_csr(csr_dir, "twin")
        shutil.copy(csr, csr_dir / "twin.pem")
        openssl_csr(csr_dir, f"single-{secrets.token_hex(3)}")
    if setup == "bad-manifest":
        manifest = tmp_path / "map.csv"
        manifest.write_text("file,id\nx.csr,x\n")
        args = ["--manifest", str(manifest)]
    result = server.cli("factory", "sign", "--type", line, "--csr-dir", str(csr_dir),
                        "--out-dir", str(tmp_path / "out"), *args, check=False)
    assert_clean_failure(result, needle)
    assert devices_of(server, line) == {}


def test_sign_api_is_idempotent_per_csr_and_refuses_mixups(server: RunningServer,
                                                           tmp_path: Path) -> None:
    line, other_line = new_type(server), new_type(server)
    device_id = f"api-{secrets.token_hex(3)}"
    _, csr_file = openssl_csr(tmp_path, device_id)
    csr_pem = csr_file.read_text()
    body = {"type": line, "device_id": device_id, "csr_pem": csr_pem, "owner": "acme"}
    with server.admin() as admin:
        first = admin.post("/v1/factory/sign", json=body)
        second = admin.post("/v1/factory/sign", json=body)
        # The same CSR bytes for another device, or the device under another type.
        blank_body = {"type": line, "csr_pem": csr_pem_without_subject()}
        shared_a = admin.post("/v1/factory/sign", json={**blank_body, "device_id": "sh-a-"
                                                        + secrets.token_hex(3)})
        shared_b = admin.post("/v1/factory/sign", json={**blank_body, "device_id": "sh-b-"
                                                        + secrets.token_hex(3)})
        wrong_type = admin.post("/v1/factory/sign", json={**body, "type": other_line})
        garbage = admin.post("/v1/factory/sign", json={**body, "csr_pem": "not a csr"})
    assert (first.status_code, second.status_code) == (201, 200), (first.text, second.text)
    assert (first.json()["reused"], second.json()["reused"]) == (False, True)
    assert first.json()["serial"] == second.json()["serial"]
    assert first.json()["pem"] == second.json()["pem"]
    assert len(certs(server, device_id)) == 1
    assert shared_a.status_code == 201, shared_a.text
    assert shared_b.status_code == 409 and "already signed for device" in shared_b.json()[
        "detail"]
    assert wrong_type.status_code == 409 and f"exists with type {line}" in wrong_type.json()[
        "detail"]
    assert garbage.status_code == 400
    assert devices_of(server, other_line) == {}
    # A revoked certificate is not handed out again: the same CSR gets a new one.
    with server.admin() as admin:
        admin.post(f"/v1/certificates/{first.json()['serial']}/revoke",
                   json={"reason": "superseded"})
        third = admin.post("/v1/factory/sign", json=body)
    assert third.status_code == 201 and third.json()["serial"] != first.json()["serial"]


def test_sign_file_mode_and_chain_are_left_readable(server: RunningServer,
                                                    tmp_path: Path) -> None:
    """Certificates are public; the output must not inherit the manifest's 0600."""
    line = new_type(server)
    csr_dir, out_dir = tmp_path / "csrs", tmp_path / "out"
    csr_dir.mkdir()
    device_id = f"mode-{secrets.token_hex(3)}"
    openssl_csr(csr_dir, device_id)
    old = os.umask(0o022)
    try:
        server.cli("factory", "sign", "--type", line, "--csr-dir", str(csr_dir), "--out-dir",
                   str(out_dir))
    finally:
        os.umask(old)
    assert stat.S_IMODE((out_dir / f"{device_id}.pem").stat().st_mode) & 0o044 == 0o044
    assert not list(out_dir.glob(".*.tmp"))
