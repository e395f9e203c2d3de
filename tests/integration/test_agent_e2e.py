"""Device agent part 2 end to end: ``fleetward-agent`` enrolls with a bootstrap token,
then ``run`` publishes telemetry and answers commands against a real ``fleetward serve``,
over MQTT and over HTTPS; what it sent is read back from the server's SQL sink."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.conftest import RunningServer, start_server, stop_server

AGENT = [sys.executable, "-m", "fleetward.agent.cli"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(tmp_path_factory.mktemp("agent-e2e") / "data")
    yield s
    stop_server(s)


def agent(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def enrolled_agent(server: RunningServer, directory: Path, device_id: str) -> Path:
    """Register ``device_id``, give it a one-time token, and enroll an agent with it."""
    with server.admin() as admin:
        assert admin.post("/v1/devices", json={"id": device_id, "type": "default"}
                          ).status_code == 201
        issued = admin.post(f"/v1/devices/{device_id}/bootstrap-tokens", json={"ttl_hours": 1})
        assert issued.status_code == 201, issued.text
    token_file = directory / f"{device_id}.token"
    token_file.write_text(issued.json()["token"])
    token_file.chmod(0o600)
    root = x509.load_pem_x509_certificate((server.data_dir / "certs/root-ca.pem").read_bytes())
    state = directory / device_id
    result = agent("enroll", "--server", f"https://localhost:{server.device_port}",
                   "--device-id", device_id, "--token-file", str(token_file),
                   "--state-dir", str(state),
                   "--ca-fingerprint", root.fingerprint(hashes.SHA256()).hex())
    assert result.returncode == 0, result.stdout + result.stderr
    return state


def messages(server: RunningServer, device_id: str) -> list[dict[str, Any]]:
    with server.admin() as admin:
        response = admin.get(f"/v1/devices/{device_id}/messages", params={"limit": 100})
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items


@pytest.mark.parametrize("channel", ["mqtt", "https"])
def test_agent_run_publishes_telemetry_into_the_sql_sink(server: RunningServer, tmp_path: Path,
                                                         channel: str) -> None:
    device_id = f"agent-{channel}"
    state = enrolled_agent(server, tmp_path, device_id)
    assert messages(server, device_id) == []  # negative control
    result = agent("run", "--state-dir", str(state), f"--{channel}",
                   "--mqtt-url", f"mqtts://localhost:{server.mqtt_port}",
                   "--source", "sim", "--seed", "7", "--interval", "0.1", "--count", "5",
                   "--exit-on-refusal")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = messages(server, device_id)
    assert len(rows) == 5
    assert {r["channel"] for r in rows} == {channel}
    assert {r["kind"] for r in rows} == {"telemetry"}
    assert all(isinstance(r["payload"], dict) and r["payload"] for r in rows)


@pytest.mark.parametrize("queued_first", [False, True], ids=["online", "queued-offline"])
@pytest.mark.parametrize("channel", ["mqtt", "https"])
def test_agent_run_answers_a_command_queued_by_the_operator(
        server: RunningServer, tmp_path: Path, channel: str, queued_first: bool) -> None:
    """Online: the command is pushed to the live session. Queued-offline: it waits in
    the database and reaches the device when it subscribes (MQTT) or polls (HTTPS)."""
    device_id = f"agent-cmd-{channel}-{'q' if queued_first else 'o'}"
    state = enrolled_agent(server, tmp_path, device_id)
    if queued_first:
        server.cli("device", "command", device_id, "ping", "--payload", "{}")
    process = subprocess.Popen(
        [*AGENT, "run", "--state-dir", str(state), f"--{channel}",
         "--mqtt-url", f"mqtts://localhost:{server.mqtt_port}", "--source", "none",
         "--poll-wait", "2", "--exit-on-refusal"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if not queued_first:
            time.sleep(1.0)  # let it connect and subscribe (or start long-polling)
            queued = server.cli("device", "command", device_id, "ping", "--payload", "{}")
            assert queued.returncode == 0
        deadline = time.monotonic() + 20
        done: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not done:
            with server.admin() as admin:
                items = admin.get(f"/v1/devices/{device_id}/commands").json()["items"]
            done = [c for c in items if c["status"] == "succeeded"]
            time.sleep(0.2)
        assert done, f"command not answered; agent output:\n{process.stdout}"
        assert done[0]["result"] == {"pong": True}
    finally:
        process.terminate()
        process.wait(10)
