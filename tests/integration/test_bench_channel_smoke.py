"""bench/handshake.py and bench/mqtt.py keep running against real servers, keep their
output format and keep refusing to report a run that did not do the work.

The figures are machine-dependent and not checked, only that they are positive and that
the printed ratios are the printed rates divided. What is checked: each bench exits 0
with tiny parameters, prints the lines docs/performance.md documents, the baseline
really is the baseline (``s_server`` sends no session tickets), and the message counts
are the server side's (rows Fleetward stored, PUBLISHes Mosquitto received), equal to
what the clients sent. Negative controls show the bench's own checks bite: a baseline
that does not require a client certificate, or that presents another certificate, is
refused before anything is timed.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO, free_port, need_service

BENCH = REPO / "bench"
NUMBER = r"(\d+(?:\.\d+)?)"
PINNING = r"(server on CPU 0, clients on CPU 1 \(taskset\)|server and clients unpinned)"

HANDSHAKE_LINE = re.compile(
    r"^(s_server|fleetward|fleetward\+connect): (\d+) handshakes per server-CPU-s, "
    r"(\d+)/s \(wall\), server busy (\d+)%  \[N=(\d+), (\d+) clients, TLS 1\.3, P-256, "
    r"mTLS, no resumption, (\d+) tickets(, \+ MQTT CONNECT/CONNACK/DISCONNECT)?\]$",
    re.MULTILINE)
HANDSHAKE_RATIO = re.compile(rf"^ratio (fleetward|fleetward\+connect)/s_server: {NUMBER}$",
                             re.MULTILINE)
MQTT_LINE = re.compile(
    r"^(mosquitto|fleetward) qos([01]): (\d+) msgs per server-CPU-s, (\d+) msgs/s \(wall\), "
    r"server busy (\d+)%  \[N=(\d+), (\d+) clients, TLS 1\.3, MQTT (3\.1\.1|5\.0), "
    r"(\d+)-byte JSON, (policy \+ payload check \+ SQLite row|no subscribers, counted by "
    r"\$SYS)\]$", re.MULTILINE)
MQTT_RATIO = re.compile(rf"^ratio qos([01]) fleetward/mosquitto: {NUMBER}$", re.MULTILINE)
ENV_LINE = re.compile(rf"^env: python .*; {PINNING}$", re.MULTILINE)


def need_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            need_service(f"{tool} is not installed")


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def load_bench(name: str) -> ModuleType:
    """A bench script as a module (bench/ is not a package; its scripts import each
    other by file name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


# --- handshakes ---------------------------------------------------------------------------


def test_handshake_bench_prints_three_figures_and_their_ratios() -> None:
    need_tools("openssl", "taskset")
    result = run_bench("handshake.py", "--seconds", "1", "--clients", "2", "--warmup", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert ENV_LINE.search(out), f"output format drifted:\n{out}"
    lines = {m.group(1): m for m in HANDSHAKE_LINE.finditer(out)}
    assert set(lines) == {"s_server", "fleetward", "fleetward+connect"}, out
    per_cpu = {}
    for name, m in lines.items():
        cpu_rate, wall_rate, busy, n, clients = (int(g) for g in m.groups()[1:6])
        assert min(cpu_rate, wall_rate, n) > 0, m.group(0)
        assert busy > 0, m.group(0)
        assert clients == 2
        per_cpu[name] = cpu_rate
    # The baseline the issue names: s_server with -num_tickets 0 sends no tickets.
    assert lines["s_server"].group(7) == "0"
    # The CONNECT variant does strictly more work on the same server.
    assert lines["fleetward+connect"].group(8) and not lines["fleetward"].group(8)
    ratios = {m.group(1): float(m.group(2)) for m in HANDSHAKE_RATIO.finditer(out)}
    assert set(ratios) == {"fleetward", "fleetward+connect"}
    for name, ratio in ratios.items():
        assert ratio == pytest.approx(per_cpu[name] / per_cpu["s_server"], abs=0.02)
        assert ratio > 0


def test_handshake_bench_json_reports_counts_cpu_and_ratio() -> None:
    need_tools("openssl", "taskset")
    result = run_bench("handshake.py", "--seconds", "1", "--clients", "1", "--warmup", "1",
                       "--no-connect", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"s_server", "fleetward", "ratios_per_server_cpu_second",
                           "pinning", "environment"}
    for side in ("s_server", "fleetward"):
        figures = report[side]
        assert figures["handshakes"] > 0 and figures["server_cpu_seconds"] > 0
        assert figures["per_server_cpu_second"] == pytest.approx(
            figures["handshakes"] / figures["server_cpu_seconds"], rel=0.01)
        assert figures["clients"] == 1
    assert report["s_server"]["tickets_per_handshake"] == 0
    assert report["ratios_per_server_cpu_second"]["fleetward/s_server"] == pytest.approx(
        report["fleetward"]["per_server_cpu_second"]
        / report["s_server"]["per_server_cpu_second"], rel=0.01)


@pytest.fixture(scope="module")
def fleetward_identity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any,
                                                                                   Path]]:
    """A fleetward data directory and a device identity, made the bench's way."""
    need_tools("openssl")
    channel = load_bench("_channel")
    tmp = tmp_path_factory.mktemp("bench-check")
    server = channel.FleetwardServer(tmp / "data", channel.Pinning(None, None))
    try:
        identity = server.make_devices("ctl", 1, tmp / "devices")[0]
        key = server.clear_server_key(tmp / "server-clear.key")
        yield server, identity, key
    finally:
        server.stop()


def start_s_server(*args: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(["openssl", "s_server", "-accept", str(port), "-num_tickets",
                                "0", "-www", "-quiet", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("s_server did not start")


@pytest.mark.parametrize(("scenario", "verify", "cert", "refusal"), [
    # The honest baseline passes the check: this row is what makes the others mean
    # something.
    ("client certificate required", "-Verify", "server", None),
    ("client certificate only requested", "-verify", "server",
     "answered a client without a certificate"),
    ("another server certificate", "-Verify", "device",
     "does not present Fleetward's server certificate"),
])
def test_handshake_bench_refuses_a_baseline_doing_different_work(
        fleetward_identity: tuple[Any, Any, Path], scenario: str, verify: str,
        cert: str, refusal: str | None) -> None:
    server, identity, key = fleetward_identity
    handshake = load_bench("handshake")
    data = server.data_dir
    if cert == "server":
        cert_file, key_file = data / "certs" / "server.pem", key
    else:  # a certificate of the same CA that is not Fleetward's server certificate
        cert_file, key_file = identity.cert, identity.key
    process, port = start_s_server(verify, "1", "-cert", str(cert_file), "-key",
                                   str(key_file), "-CAfile", str(data / "certs" / "chain.pem"))
    try:
        if refusal is None:
            handshake.check_server("s_server", port, identity, data / "certs" / "server.pem")
        else:
            with pytest.raises(SystemExit, match=refusal):
                handshake.check_server("s_server", port, identity,
                                       data / "certs" / "server.pem")
    finally:
        process.kill()
        process.wait(5)


@pytest.mark.parametrize("args", [["--seconds", "0"], ["--clients", "0"]])
def test_handshake_bench_rejects_nonsense_parameters(args: list[str]) -> None:
    result = run_bench("handshake.py", *args)
    assert result.returncode == 2
    assert "must be" in result.stderr


# --- MQTT ---------------------------------------------------------------------------------


def test_mqtt_bench_counts_what_the_servers_took_and_prints_ratios() -> None:
    need_tools("openssl", "taskset", "mosquitto", "mosquitto_sub")
    count, clients = 5000, 2
    result = run_bench("mqtt.py", "--count", str(count), "--clients", str(clients))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert ENV_LINE.search(out), f"output format drifted:\n{out}"
    lines = {(m.group(1), int(m.group(2))): m for m in MQTT_LINE.finditer(out)}
    assert set(lines) == {("mosquitto", 0), ("mosquitto", 1), ("fleetward", 0),
                          ("fleetward", 1)}, out
    per_cpu = {}
    for key, m in lines.items():
        cpu_rate, wall_rate, busy, n, n_clients = (int(g) for g in m.groups()[2:7])
        assert min(cpu_rate, wall_rate) > 0 and busy >= 0, m.group(0)
        # Counted by the server side (rows stored / $SYS received), all of it.
        assert (n, n_clients) == (count * clients, clients), m.group(0)
        assert (m.group(8), m.group(9)) == ("3.1.1", "100")
        per_cpu[key] = cpu_rate
    assert "SQLite row" in lines[("fleetward", 0)].group(10)
    assert "$SYS" in lines[("mosquitto", 0)].group(10)
    ratios = {int(m.group(1)): float(m.group(2)) for m in MQTT_RATIO.finditer(out)}
    assert set(ratios) == {0, 1}
    for qos, ratio in ratios.items():
        assert ratio > 0
        assert ratio == pytest.approx(
            per_cpu[("fleetward", qos)] / per_cpu[("mosquitto", qos)], rel=0.02, abs=0.002)


def test_mqtt_bench_json_with_mqtt5_and_qos1_only() -> None:
    need_tools("openssl", "taskset", "mosquitto", "mosquitto_sub")
    result = run_bench("mqtt.py", "--count", "1000", "--clients", "2", "--qos", "1",
                       "--mqtt-version", "5", "--payload-bytes", "200", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["fleetward"]) == set(report["mosquitto"]) == {"qos1"}
    for side in ("fleetward", "mosquitto"):
        figures = report[side]["qos1"]
        assert figures["messages"] == 2000
        assert figures["server_cpu_seconds"] > 0 and figures["wall_seconds"] > 0
    assert report["settings"]["mqtt_version"] == 5
    assert report["settings"]["payload_bytes"] == 200
    assert report["ratios_per_server_cpu_second"]["qos1"] == pytest.approx(
        report["fleetward"]["qos1"]["per_server_cpu_second"]
        / report["mosquitto"]["qos1"]["per_server_cpu_second"], rel=0.01)


def test_mqtt_bench_fails_when_fleetward_acknowledges_but_does_not_store() -> None:
    # Negative control for the row count: with the SQL sink off and NATS JetStream as the
    # only sink, every PUBLISH is still authorized and PUBACKed, but no row is written.
    # A bench that trusted PUBACKs would print a (faster) figure here.
    need_tools("openssl", "taskset", "mosquitto", "mosquitto_sub")
    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=2).close()
    except OSError as exc:
        need_service(f"NATS at 127.0.0.1:4222: {exc}")
    result = run_bench("mqtt.py", "--count", "500", "--clients", "1", "--qos", "1",
                       "--set", "sinks.sql=false", "--set", "sinks.nats_url=nats://127.0.0.1:4222")
    assert result.returncode != 0
    assert "fleetward qos1: 500 sent but 0 stored" in result.stderr, result.stderr
    assert "ratio" not in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--count", "0"], "at least 1"),
    (["--set", "sinks"], "section.key=value"),
    (["--window", "0"], "at least 1"),
    (["--payload-bytes", "10"], "at least 64"),
])
def test_mqtt_bench_rejects_nonsense_parameters(args: list[str], message: str) -> None:
    result = run_bench("mqtt.py", *args)
    assert result.returncode == 2
    assert message in result.stderr
