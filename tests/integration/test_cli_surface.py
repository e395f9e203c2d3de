"""The CLIs' surface against a real `fleetward serve`: what people read, copy and capture.

Threats, each a case below:

- a fingerprint shown to the person who compares it that is not the one the agent
  checked (Rich printed ``3B:AB:C7`` as ``3B🆎C7`` in the pin-mismatch error);
- serials, fingerprints and paths cut ("…") or broken inside the value in a narrow
  terminal, so what is copied is not what the server holds;
- ``TOKEN=$(fleetward token create … --quiet)`` or ``$(fleetward device command …)``
  capturing notes with the value, or printing notes a script did not ask for;
- ``policy attach NAME --type T`` silently replacing the built-in ``default`` policy,
  so that a deny-only policy cuts every device of the type off MQTT with no word said.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from fleetward import __version__
from tests.conftest import RunningServer
from tests.integration.test_cli import openssl_csr

AGENT = [sys.executable, "-m", "fleetward.agent.cli"]
NARROW = {"COLUMNS": "60"}
# Deny-only: no statement allows anything, so a device it alone applies to is refused
# mqtt:connect (and everything else).
DENY_ONLY = {"statements": [{"sid": "no-config", "effect": "deny",
                             "actions": ["mqtt:publish"],
                             "resources": ["devices/${device.id}/config/#"]}]}
DENY_CONNECT = {"statements": [
    {"sid": "own", "effect": "allow", "actions": ["mqtt:*"], "resources": ["${device.id}"]},
    {"sid": "no-mqtt", "effect": "deny", "actions": ["mqtt:connect"], "resources": ["#"]}]}
CONNECT_AND_PUBLISH = {"statements": [
    {"sid": "connect", "effect": "allow", "actions": ["mqtt:connect"],
     "resources": ["${device.id}"]},
    {"sid": "telemetry", "effect": "allow", "actions": ["mqtt:publish"],
     "resources": ["devices/${device.id}/telemetry/#"]}]}


def agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=120,
                          env=env or dict(os.environ))


def narrow(server: RunningServer) -> dict[str, str]:
    return {**server.env(), **NARROW}


def column_texts(table: str) -> list[str]:
    """Each column of a Rich box table, its folded pieces joined top to bottom."""
    columns: list[str] = []
    for line in table.splitlines():
        cells = re.split(r"[│┃]", line)[1:-1]
        if not cells:
            continue
        columns += [""] * (len(cells) - len(columns))
        for i, cell in enumerate(cells):
            columns[i] += cell.strip()
    return columns


def assert_whole_in_a_column(value: str, table: str) -> None:
    assert any(value in column for column in column_texts(table)), (value, table)


def new_device(server: RunningServer) -> str:
    device_id = f"surf-{secrets.token_hex(4)}"
    server.cli("device", "add", device_id)  # no --type: the built-in type 'default'
    return device_id


def issue(server: RunningServer, device_id: str, tmp_path: Path) -> tuple[str, Path]:
    _, csr = openssl_csr(tmp_path, device_id)
    # longer than the terminal is wide: it must come out whole, not broken inside
    out = tmp_path / f"{'certificate-of-' * 4}{device_id}.pem"
    issued = server.cli("cert", "issue", "--device", device_id, "--csr", str(csr),
                        "--out", str(out), env=narrow(server))
    serial = format(x509.load_pem_x509_certificate(out.read_bytes()).serial_number, "x")
    assert f"issued serial {serial} to {device_id}, valid until" in issued.stdout
    assert str(out) in issued.stdout.splitlines()[0], issued.stdout  # one line, no break
    return serial, out


# --- (1) the agent's pin-mismatch error --------------------------------------------------


def test_the_pin_mismatch_error_shows_the_pinned_fingerprint_intact(
        server: RunningServer, tmp_path: Path) -> None:
    device_id = new_device(server)
    token = server.cli("token", "create", "--device", device_id, "--quiet").stdout.strip()
    env = {**os.environ, "FLEETWARD_BOOTSTRAP_TOKEN": token}
    root = x509.load_pem_x509_certificate(
        (server.data_dir / "certs" / "root-ca.pem").read_bytes())
    # A wrong pin whose text holds ":AB:" (and ":ab:" in the form typed): Rich's emoji
    # code for 🆎.
    wrong = "3a:93:3b:ab:c7:8a:" + ":".join(["ab"] * 26)
    spelled = wrong.upper()
    assert root.fingerprint(hashes.SHA256()).hex(":").upper() != spelled
    state = tmp_path / "state"
    base = ["enroll", "--server", f"https://127.0.0.1:{server.device_port}",
            "--device-id", device_id, "--state-dir", str(state)]
    refused = agent(*base, "--ca-fingerprint", wrong, env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"pinned fingerprint {spelled} (it offered:" in refused.stderr, refused.stderr
    assert "🆎" not in refused.stderr
    assert "Traceback" not in refused.stderr and not state.exists()

    # negative control: the right pin enrolls with the same (unused) token
    right = root.fingerprint(hashes.SHA256()).hex()
    enrolled = agent(*base, "--ca-fingerprint", right, env=env)
    assert enrolled.returncode == 0, enrolled.stderr
    assert f"device {device_id} enrolled: certificate" in enrolled.stdout

    # and --renew-fraction takes the form its help shows (2/3), meaning the default
    def next_renewal(*extra: str) -> str:
        shown = agent("status", "--state-dir", str(state), *extra,
                      env={**os.environ, "COLUMNS": "200"})
        assert shown.returncode == 0, shown.stderr
        return next(line for line in shown.stdout.splitlines() if "next renewal" in line)

    assert next_renewal("--renew-fraction", "2/3") == next_renewal()
    assert next_renewal("--renew-fraction", "1/2") == next_renewal("--renew-fraction", "0.5")
    assert next_renewal("--renew-fraction", "1/2") != next_renewal()


def test_both_entry_points_print_their_version() -> None:
    for argv in ([sys.executable, "-m", "fleetward.server"], AGENT):
        done = subprocess.run([*argv, "--version"], capture_output=True, text=True,
                              timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (
            0, f"fleetward {__version__}\n", ""), argv


# --- (5) nothing people copy is cut --------------------------------------------------------


def test_ca_show_in_a_narrow_terminal_keeps_every_fingerprint_whole(
        server: RunningServer) -> None:
    cas = json.loads(server.cli("ca", "show", "--json").stdout)
    shown = server.cli("ca", "show", env=narrow(server)).stdout
    assert "…" not in shown, shown
    for ca in cas:
        assert re.fullmatch(r"[0-9a-f]{64}", ca["fingerprint_sha256"])
        assert_whole_in_a_column(ca["fingerprint_sha256"], shown)


def test_cert_list_and_device_show_in_a_narrow_terminal_keep_serials_whole(
        server: RunningServer, tmp_path: Path) -> None:
    device_id = new_device(server)
    serial, _ = issue(server, device_id, tmp_path)
    assert len(serial) >= 30
    for args in (["cert", "list", "--device", device_id], ["device", "show", device_id]):
        shown = server.cli(*args, env=narrow(server)).stdout
        assert "…" not in shown, shown
        assert_whole_in_a_column(serial, shown)
        if args[0] == "device":
            assert_whole_in_a_column(device_id, shown)


# --- (6, 7) output scripts capture ------------------------------------------------------------


def test_token_create_quiet_prints_the_secret_alone(server: RunningServer) -> None:
    device_id = new_device(server)
    quiet = server.cli("token", "create", "--device", device_id, "--quiet")
    assert re.fullmatch(r"fwb_[0-9a-f]{16}\.\S+\n", quiet.stdout), quiet.stdout
    assert quiet.stderr == ""
    # negative control: without --quiet the notes are there, on stderr only
    loud = server.cli("token", "create", "--device", device_id)
    assert re.fullmatch(r"fwb_[0-9a-f]{16}\.\S+\n", loud.stdout), loud.stdout
    assert "warning:" in loud.stderr and "shown only once" in loud.stderr
    as_json = server.cli("token", "create", "--device", device_id, "--json")
    assert json.loads(as_json.stdout)["token"].startswith("fwb_")  # stdout is JSON only
    quiet_json = server.cli("token", "create", "--device", device_id, "--json", "--quiet")
    assert json.loads(quiet_json.stdout)["device_id"] == device_id
    assert quiet_json.stderr == ""


def test_operator_add_quiet_prints_the_secret_alone(server: RunningServer) -> None:
    quiet = server.cli("operator", "add", f"surf-{secrets.token_hex(3)}", "--role",
                       "auditor", "--quiet")
    assert re.fullmatch(r"fwa_\S+\n", quiet.stdout), quiet.stdout
    assert quiet.stderr == ""
    with httpx.Client(base_url=server.admin_url, verify=server.tls(), timeout=30,
                      headers={"Authorization": f"Bearer {quiet.stdout.strip()}"}) as client:
        assert client.get("/v1/devices").status_code == 200  # the captured token works


def test_device_command_prints_only_the_id_on_stdout(server: RunningServer) -> None:
    device_id = new_device(server)
    queued = server.cli("device", "command", device_id, "ping", "--payload", '{"echo": 1}')
    command_id = queued.stdout.strip()
    assert queued.stdout == f"{command_id}\n" and " " not in command_id
    assert f"queued ping for {device_id}" in queued.stderr
    listed = json.loads(server.cli("device", "commands", device_id, "--json").stdout)
    assert [c["id"] for c in listed] == [command_id]


def test_device_add_without_a_type_uses_the_builtin_default(server: RunningServer) -> None:
    device_id = f"surf-{secrets.token_hex(4)}"
    added = json.loads(server.cli("device", "add", device_id, "--json").stdout)
    assert (added["id"], added["type"]) == (device_id, "default")


# --- (8) attaching a policy shows what now applies, and warns ------------------------------


@pytest.fixture
def fleet(server: RunningServer) -> dict[str, str]:
    """A fresh device type with one active device, and three policies."""
    tag = secrets.token_hex(3)
    names = {"type": f"surf-type-{tag}", "device": f"surf-dev-{tag}",
             "deny_only": f"deny-only-{tag}", "deny_connect": f"deny-connect-{tag}",
             "good": f"good-{tag}"}
    with server.admin() as admin:
        assert admin.post("/v1/device-types", json={"name": names["type"]}).status_code == 201
        assert admin.post("/v1/devices", json={"id": names["device"],
                                               "type": names["type"]}).status_code == 201
        for key, document in (("deny_only", DENY_ONLY), ("deny_connect", DENY_CONNECT),
                              ("good", CONNECT_AND_PUBLISH)):
            assert admin.put(f"/v1/policies/{names[key]}", json=document).status_code == 201
    return names


def attach(admin: httpx.Client, policy: str, **target: str) -> dict[str, Any]:
    response = admin.post(f"/v1/policies/{policy}/attachments", json=target)
    assert response.status_code in (200, 201), response.text
    body: dict[str, Any] = response.json()
    return body


def detach(admin: httpx.Client, policy: str, **target: str) -> dict[str, Any]:
    response = admin.delete(f"/v1/policies/{policy}/attachments", params=target)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def connect_allowed(admin: httpx.Client, device_id: str) -> bool:
    """The data plane's own answer, to check the warning against."""
    tested = admin.post("/v1/policies/test", json={"device_id": device_id,
                                                   "action": "mqtt:connect",
                                                   "resource": device_id})
    assert tested.status_code == 200, tested.text
    return bool(tested.json()["allowed"])


def test_a_deny_only_policy_on_a_type_warns_that_its_devices_cannot_connect(
        server: RunningServer, fleet: dict[str, str]) -> None:
    t, d = fleet["type"], fleet["device"]
    with server.admin() as admin:
        assert connect_allowed(admin, d)  # the built-in default applies
        result = attach(admin, fleet["deny_only"], type=t)
        assert (result["policy"], result["kind"], result["target"], result["changed"]) == (
            fleet["deny_only"], "type", t, True)
        assert result["effective"] == {
            "kind": "type", "target": t, "device_type": t, "policies": [fleet["deny_only"]],
            "device_policies": [], "type_policies": [fleet["deny_only"]],
            "implicit_default": False, "mqtt_connect": False, "quarantined": False}
        [warning] = result["warnings"]
        assert warning["code"] == "mqtt-connect-denied"
        assert f"devices of type '{t}'" in warning["message"]
        assert f"no statement in {fleet['deny_only']} allows mqtt:connect" in warning["message"]
        assert f"fleetward policy attach default --type {t}" in warning["hint"]
        assert not connect_allowed(admin, d)  # the warning tells the truth

        # attaching the default as well restores connect: the warning goes away
        both = attach(admin, "default", type=t)
        assert sorted(both["effective"]["policies"]) == sorted([fleet["deny_only"], "default"])
        assert (both["effective"]["mqtt_connect"], both["warnings"]) == (True, [])
        assert connect_allowed(admin, d)

        # detaching answers 200 with what applies now
        left = detach(admin, "default", type=t)
        assert (left["changed"], left["effective"]["policies"]) == (True, [fleet["deny_only"]])
        assert [w["code"] for w in left["warnings"]] == ["mqtt-connect-denied"]
        back = detach(admin, fleet["deny_only"], type=t)
        assert back["effective"]["policies"] == ["default"]
        assert back["effective"]["implicit_default"] is True and back["warnings"] == []
        assert connect_allowed(admin, d)


def test_a_policy_that_allows_connect_gives_no_warning(server: RunningServer,
                                                       fleet: dict[str, str]) -> None:
    t = fleet["type"]
    with server.admin() as admin:
        result = attach(admin, fleet["good"], type=t)
        assert result["warnings"] == []
        assert result["effective"]["mqtt_connect"] is True
        assert result["effective"]["policies"] == [fleet["good"]]
        assert connect_allowed(admin, fleet["device"])
        detach(admin, fleet["good"], type=t)


def test_a_device_gets_its_own_policies_and_its_types(server: RunningServer,
                                                      fleet: dict[str, str]) -> None:
    t, d = fleet["type"], fleet["device"]
    with server.admin() as admin:
        attach(admin, fleet["good"], type=t)
        result = attach(admin, fleet["deny_connect"], device=d)
        effective = result["effective"]
        assert (effective["policies"], effective["device_policies"],
                effective["type_policies"], effective["device_type"]) == (
            [fleet["deny_connect"], fleet["good"]], [fleet["deny_connect"]], [fleet["good"]],
            t)
        [warning] = result["warnings"]
        assert warning["message"].startswith(f"device '{d}' cannot connect over MQTT: "
                                             f"denied by policy '{fleet['deny_connect']}' "
                                             "statement 'no-mqtt'")
        assert "deny wins" in warning["hint"]
        assert not connect_allowed(admin, d)
        # the type's view is untouched by the device's own policy
        assert attach(admin, fleet["good"], type=t)["warnings"] == []
        detached = detach(admin, fleet["deny_connect"], device=d)
        assert detached["effective"]["policies"] == [fleet["good"]]
        assert detached["warnings"] == [] and connect_allowed(admin, d)
        detach(admin, fleet["good"], type=t)


def test_cli_attach_and_detach_print_what_applies_and_warn(server: RunningServer,
                                                           fleet: dict[str, str]) -> None:
    t, bad, good = fleet["type"], fleet["deny_only"], fleet["good"]
    warned = server.cli("policy", "attach", bad, "--type", t)
    assert f"policy {bad} attached to type {t}" in warned.stdout
    assert (f"now applies to devices of type {t} without policies of their own: {bad}"
            in warned.stdout), warned.stdout
    lines = warned.stderr.splitlines()
    assert lines[0].startswith(f"warning: devices of type '{t}'"), warned.stderr
    assert "cannot connect over MQTT" in lines[0]
    assert lines[1].startswith("hint: ") and f"policy attach default --type {t}" in lines[1]
    detached = server.cli("policy", "detach", bad, "--type", t)
    assert f"policy {bad} detached from type {t}" in detached.stdout
    assert "default (built-in; nothing is attached to the type)" in detached.stdout
    assert detached.stderr == ""

    # negative control: a policy that allows connect draws no warning
    quiet = server.cli("policy", "attach", good, "--type", t)
    assert f"now applies to devices of type {t} without policies of their own: {good}" in (
        quiet.stdout)
    assert quiet.stderr == ""
    on_device = server.cli("policy", "attach", bad, "--device", fleet["device"])
    assert (f"now applies to device {fleet['device']}: {bad} (device), {good} (type {t})"
            in on_device.stdout), on_device.stdout
    assert on_device.stderr == ""  # the type's policy still allows connect
    server.cli("policy", "detach", bad, "--device", fleet["device"])
    server.cli("policy", "detach", good, "--type", t)


@pytest.mark.parametrize("args,needle", [
    (["cert", "revoke", "../operators/x"], "invalid certificate serial"),
    (["cert", "revoke", "--device", "../operators"], "device id"),
    (["cert", "list", "--device", "a/../../v1/operators"], "device id"),
    (["device", "show", "../operators"], "device id"),
    (["device", "disable", "x/../../operators"], "device id"),
    (["operator", "revoke", "../policies/prod"], "invalid operator token id"),
    (["token", "revoke", "../operators/0123456789abcdef"], "invalid bootstrap token id"),
])
def test_ids_are_checked_before_they_become_url_path_segments(
        args: list[str], needle: str) -> None:
    """No request is made: the admin URL points at a closed port, so an error about the
    connection instead of the id would mean the id was sent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWARD_")}
    env.update(FLEETWARD_ADMIN_URL="https://127.0.0.1:9", FLEETWARD_ADMIN_TOKEN="fwa_x.y")
    result = subprocess.run([sys.executable, "-m", "fleetward.server", *args], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "admin API" not in result.stderr
