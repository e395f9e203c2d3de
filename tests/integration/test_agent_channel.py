"""The agent's channels against real third-party servers, over real TLS sockets.

MQTT: a private Mosquitto (Debian's ``/usr/sbin/mosquitto``) with mutual TLS
(``require_certificate``, ``use_identity_as_username``) and an ACL that gives the device
only its own topics; certificates from the ``sqlite_stack`` CA, as the server would
issue them. A separate paho client plays the operator side. HTTPS: a small aiohttp TLS
server that asks for the client certificate and speaks the device API contract
(long-poll, result post, problem+json).

Threats, each a case below:
- an agent that talks to a broker whose certificate is not from the pinned CA (a man
  in the middle collects telemetry and sends commands) — negative control of the
  delivery tests with the very same agent state;
- telemetry lost when the broker restarts (the buffer must carry it over), or a
  command left unanswered, answered on another topic, or run twice when repeated;
- a revoked device certificate refused in the TLS handshake, and the agent hammering
  the broker afterwards instead of stopping (``--exit-on-refusal``) — with the
  unrevoked operator certificate as negative control;
- a poison record (refused with problem+json) blocking the records behind it, and the
  refusal's detail/hint lost instead of reaching the device log.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import queue
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from fleetward.agent.connect import ChannelRefused
from fleetward.agent.est_client import build_csr
from fleetward.agent.https_client import HttpsSession, https_transport_factory
from fleetward.agent.keystore import FileKeystore, Pkcs11Keystore
from fleetward.agent.renewal import install_certificate, open_agent
from fleetward.agent.run import EXIT_REFUSED, RunOptions, RunStats, run_agent
from fleetward.agent.state import (
    AgentConfig,
    KeystoreConfig,
    StateLayout,
    ensure_state_dir,
    generate_passphrase_file,
    load_config,
    save_config,
    write_atomic,
)
from fleetward.agent.telemetry import LineSource, SimulatedSensor
from fleetward.ca.pipeline import IssueRequest
from fleetward.ca.profiles import profiles_from_config
from fleetward.ca.setup import ISSUING_NAME
from fleetward.clock import FrozenClock, SystemClock
from fleetward.config import CAConfig
from fleetward.errors import InvalidInput
from tests.conftest import Stack, free_port, need_service
from tests.integration.channel_helpers import write_cert_and_key
from tests.softhsm import SOFTHSM_MODULE, softhsm_tokens
from tests.unit.test_agent_est_client import Pki

MOSQUITTO = Path("/usr/sbin/mosquitto")
AGENT = [sys.executable, "-m", "fleetward.agent.cli"]
FAST_BACKOFF = {"reconnect_base_seconds": 0.2, "reconnect_cap_seconds": 1.0}
WAIT = 20.0  # seconds: generous upper bound for one delivery on a loaded CI machine


@pytest.fixture
def clock() -> FrozenClock:
    """The CA must issue for the real 'now': Mosquitto and OpenSSL check validity."""
    return FrozenClock(SystemClock().now())


# --- identities -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def issue_server(stack: Stack, directory: Path) -> Pem:
    """A serverAuth certificate for localhost/127.0.0.1 from the stack's issuing CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    with stack.db.transaction() as conn:
        record = stack.authority.issue(conn, IssueRequest(
            public_key=key.public_key(), profile=profiles_from_config(CAConfig())["server"],
            server_names=("localhost", "127.0.0.1")), "test")
    return write_pem(directory, "server", record.pem + stack.authority.issuing.pem, key)


def write_pem(directory: Path, name: str, cert_pem: str, key: ec.EllipticCurvePrivateKey) -> Pem:
    return Pem(*write_cert_and_key(directory, name, cert_pem, key))


def issue_client(stack: Stack, directory: Path, device_id: str) -> Pem:
    """A plain device certificate (for the operator's paho client)."""
    stack.add_device(device_id)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = build_csr(device_id, key).public_bytes(serialization.Encoding.PEM)
    record = stack.registry.issue_certificate(device_id, csr, "device", "operator:test")
    return write_pem(directory, device_id, record.pem, key)


def enrolled_agent(stack: Stack, root: Path, device_id: str, *, server_url: str,
                   mqtt_url: str | None = None) -> StateLayout:
    """A state directory as `fleetward-agent enroll` leaves it, issued by the stack."""
    stack.add_device(device_id)
    layout = ensure_state_dir(root)
    generate_passphrase_file(layout.passphrase)
    config = AgentConfig(server_url=server_url, device_id=device_id, mqtt_url=mqtt_url,
                         keystore=KeystoreConfig(kind="file",
                                                 passphrase_file=str(layout.passphrase)))
    save_config(layout, config)
    write_atomic(layout.ca, stack.authority.chain_pem().encode(), 0o644)
    keystore = FileKeystore.from_config(layout, config)
    key = keystore.create_pending()
    csr = build_csr(device_id, key).public_bytes(serialization.Encoding.PEM)
    record = stack.registry.issue_certificate(device_id, csr, "device", "operator:test")
    install_certificate(layout, keystore, x509.load_pem_x509_certificate(record.pem.encode()),
                        rotated=True)
    return layout


def chain_file(stack: Stack, directory: Path) -> Path:
    path = directory / "chain.pem"
    path.write_text(stack.authority.chain_pem())
    return path


# --- Mosquitto ------------------------------------------------------------------------------


ACL = """\
# every device: its own telemetry, events and results out, its own commands in
pattern write devices/%u/telemetry/#
pattern write devices/%u/events/#
pattern write devices/%u/command-results/#
pattern read devices/%u/commands/#
user operator
topic readwrite devices/#
"""


class Mosquitto:
    """A private broker on a free port; restartable on the same port."""

    def __init__(self, directory: Path, cafile: Path, server: Pem,
                 crlfile: Path | None = None) -> None:
        if not MOSQUITTO.exists():
            need_service(f"Mosquitto ({MOSQUITTO}; Debian package mosquitto)")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)
        self.port = free_port()
        acl = directory / "acl"
        acl.write_text(ACL)
        lines = [
            "per_listener_settings false", "allow_anonymous false",
            # running as root in CI containers: don't switch to the mosquitto user, which
            # could not read the test's 0700 temporary directories
            "user root",
            "persistence true", f"persistence_location {directory / 'data'}/",
            f"log_dest file {directory / 'mosquitto.log'}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            f"listener {self.port} 127.0.0.1",
            f"cafile {cafile}", f"certfile {server.cert}", f"keyfile {server.key}",
            "require_certificate true", "use_identity_as_username true",
            f"acl_file {acl}"]
        if crlfile is not None:
            lines.append(f"crlfile {crlfile}")
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([str(MOSQUITTO), "-c", str(self.conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.process.returncode}): "
                                   f"{self.log()}")
            if port_open(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # saves the persistence file
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text() if path.exists() else ""


class Operator:
    """The other side: a paho client with the operator certificate."""

    def __init__(self, broker: Mosquitto, identity: Pem, cafile: Path, topics: list[str], *,
                 persistent: bool = False) -> None:
        self.messages: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.subscribed = threading.Event()
        self.topics = topics
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="operator",
                                  protocol=mqtt.MQTTv311, clean_session=not persistent)
        self.client.tls_set(ca_certs=str(cafile), certfile=str(identity.cert),
                            keyfile=str(identity.key))
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, json.loads(m.payload)))
        self.client.connect("localhost", broker.port, 30)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT), "the operator client could not subscribe"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        for topic in self.topics:
            client.subscribe(topic, qos=1)

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.client.publish(topic, json.dumps(body), qos=1).wait_for_publish(WAIT)

    def take(self, n: int, timeout: float = WAIT) -> list[tuple[str, Any]]:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"got {len(got)} of {n} messages: {got}")
            try:
                got.append(self.messages.get(timeout=remaining))
            except queue.Empty:
                continue
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class AgentThread:
    """``run_agent`` on a thread, as ``fleetward-agent run`` runs it on the main one."""

    layout: StateLayout
    options: RunOptions
    source: Any = None
    stop: threading.Event = field(default_factory=threading.Event)
    result: list[RunStats] = field(default_factory=list)
    error: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result.append(run_agent(self.layout, self.options, self.stop,
                                         source=self.source, rng=random.Random(2)))
        except BaseException as exc:
            self.error.append(exc)

    def join(self, timeout: float = WAIT) -> RunStats:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(10)
            raise AssertionError("the agent did not finish in time")
        if self.error:
            raise self.error[0]
        return self.result[0]

    def finish(self) -> RunStats:
        self.stop.set()
        return self.join()


@dataclass
class MqttWorld:
    stack: Stack
    tmp: Path
    cafile: Path
    server: Pem
    operator_pem: Pem
    broker: Mosquitto
    layout: StateLayout


@pytest.fixture
def world(sqlite_stack: Stack, tmp_path: Path) -> Iterator[MqttWorld]:
    cafile = chain_file(sqlite_stack, tmp_path)
    server = issue_server(sqlite_stack, tmp_path / "server")
    operator_pem = issue_client(sqlite_stack, tmp_path / "operator", "operator")
    broker = Mosquitto(tmp_path / "broker", cafile, server)
    layout = enrolled_agent(sqlite_stack, tmp_path / "agent", "dev-1",
                            server_url="https://localhost:9", mqtt_url=broker.url)
    yield MqttWorld(sqlite_stack, tmp_path, cafile, server, operator_pem, broker, layout)
    broker.stop()


def expected_readings(seed: int, n: int) -> list[dict[str, Any]]:
    sensor = SimulatedSensor(seed=seed)
    return [sensor.read().data for _ in range(n)]


# --- MQTT ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_telemetry_reaches_the_broker_over_mutual_tls_with_qos1(world: MqttWorld,
                                                                version: str) -> None:
    operator = Operator(world.broker, world.operator_pem, world.cafile,
                        ["devices/dev-1/telemetry/#"])
    try:
        stats = AgentThread(world.layout, RunOptions(
            mqtt_version=version, interval_seconds=0.1, count=5, **FAST_BACKOFF),
            SimulatedSensor(seed=7)).join()
        got = operator.take(5)
    finally:
        operator.close()
    assert stats.delivered == 5 and stats.exit_reason == "finished"
    assert [topic for topic, _ in got] == ["devices/dev-1/telemetry/reading"] * 5
    assert [body for _, body in got] == expected_readings(7, 5)
    # The broker knew the agent by its certificate (use_identity_as_username) and
    # client id: the ACL pattern %u matched only because CN == dev-1.
    assert "dev-1" in world.broker.log()


def test_a_broker_with_a_certificate_from_another_ca_gets_nothing(world: MqttWorld) -> None:
    """Same agent state as the delivery test; only the broker's certificate differs."""
    other = Pki.create(dt.datetime.now(dt.UTC), prefix="Impostor")
    key = ec.generate_private_key(ec.SECP256R1())
    fake = write_pem(world.tmp / "impostor", "server", other.leaf(
        key.public_key(), "localhost").public_bytes(serialization.Encoding.PEM).decode(), key)
    impostor = Mosquitto(world.tmp / "impostor-broker", world.cafile, fake)
    config = load_config(world.layout)
    save_config(world.layout, AgentConfig(server_url=config.server_url,
                                          device_id=config.device_id,
                                          keystore=config.keystore, mqtt_url=impostor.url))
    try:
        with structlog.testing.capture_logs() as logs:
            agent = AgentThread(world.layout, RunOptions(interval_seconds=0.1, count=3,
                                                         **FAST_BACKOFF),
                                SimulatedSensor(seed=1))
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and not any(
                    e["event"] == "cannot connect" for e in logs):
                time.sleep(0.05)
            stats = agent.finish()
    finally:
        impostor.stop()
    assert stats.connections == 0 and stats.delivered == 0
    failures = [e for e in logs if e["event"] == "cannot connect"]
    assert failures and "not trusted" in failures[0]["error"], logs
    assert "dev-1" not in impostor.log().replace(str(world.tmp), "")


def test_commands_are_answered_on_the_result_topic_once_each(world: MqttWorld) -> None:
    marker = world.tmp / "handler-runs"
    handler = world.tmp / "handler.sh"
    handler.write_text(f"#!/bin/sh\necho run >> {marker}\n"
                       'echo \'{"rotated": 2}\'\n')
    handler.chmod(0o755)
    operator = Operator(world.broker, world.operator_pem, world.cafile,
                        ["devices/dev-1/command-results/#"])
    agent = AgentThread(world.layout, RunOptions(command_handler=handler, **FAST_BACKOFF))
    cases = [
        ({"id": "c-ping", "name": "ping", "payload": {}},
         {"status": "succeeded", "result": {"pong": True}}),
        ({"id": "c-logs", "name": "rotate-logs", "payload": {}},
         {"status": "succeeded", "result": {"rotated": 2}}),
        ({"id": "c-int", "name": "set-interval", "payload": {"seconds": 0.5}},
         {"status": "succeeded", "result": {"interval_seconds": 0.5}}),
        ({"id": "c-bad", "name": "set-interval", "payload": {"seconds": -1}}, None),
    ]
    try:
        answers: dict[str, Any] = {}
        for command, _ in cases:
            topic = f"devices/dev-1/commands/{command['name']}"
            # Published again until answered: the first copies may go out before the
            # agent has subscribed; the repeats must not run the command again.
            deadline = time.monotonic() + WAIT
            while command["id"] not in answers and time.monotonic() < deadline:
                operator.publish(topic, {**command, "created_at": None, "expires_at": None})
                try:
                    t, body = operator.messages.get(timeout=0.5)
                    answers[t.rsplit("/", 1)[1]] = body
                except queue.Empty:
                    pass
        stats = agent.finish()
    finally:
        operator.close()
    for command, expected in cases:
        answer = answers.get(command["id"])
        assert answer is not None, f"no answer to {command['id']}"
        if expected is not None:
            assert answer == expected
        else:
            assert answer["status"] == "failed" and "interval" in answer["result"]["error"]
    assert marker.read_text().count("run") == 1
    assert stats.connections == 1


def test_the_agent_reconnects_after_a_broker_restart_and_sends_what_it_buffered(
        world: MqttWorld) -> None:
    operator = Operator(world.broker, world.operator_pem, world.cafile,
                        ["devices/dev-1/telemetry/#"], persistent=True)
    agent = AgentThread(world.layout, RunOptions(interval_seconds=0.1, **FAST_BACKOFF),
                        SimulatedSensor(seed=3))
    seen: set[int] = set()
    try:
        seen |= {body["seq"] for _, body in operator.take(3)}
        world.broker.stop()
        time.sleep(1.5)  # ~15 readings while the broker is down go to the buffer
        world.broker.start()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            seen |= {body["seq"] for _, body in operator.take(1)}
            top = max(seen)
            if top >= 30 and seen >= set(range(1, top + 1)):
                break
        stats = agent.finish()
    finally:
        operator.close()
    top = max(seen)
    assert top >= 30
    assert set(range(1, top + 1)) <= seen, f"lost: {sorted(set(range(1, top + 1)) - seen)}"
    assert stats.connections >= 2 and stats.dropped == 0


def test_a_revoked_certificate_is_refused_in_the_handshake_and_the_agent_stops(
        world: MqttWorld) -> None:
    serial = x509.load_pem_x509_certificate(world.layout.cert.read_bytes()).serial_number
    world.stack.registry.revoke_certificate(serial, "keyCompromise", "operator:test")
    with world.stack.db.transaction() as conn:
        crl = x509.load_der_x509_crl(world.stack.authority.crl_der(conn, ISSUING_NAME))
    crlfile = world.tmp / "issuing.crl.pem"
    crlfile.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    broker = Mosquitto(world.tmp / "crl-broker", world.cafile, world.server, crlfile)
    config = load_config(world.layout)
    save_config(world.layout, AgentConfig(server_url=config.server_url,
                                          device_id=config.device_id,
                                          keystore=config.keystore, mqtt_url=broker.url))
    try:
        # negative control: the unrevoked operator certificate connects to this broker
        Operator(broker, world.operator_pem, world.cafile, ["devices/#"]).close()
        with structlog.testing.capture_logs() as logs:
            stats = AgentThread(world.layout, RunOptions(
                exit_on_refusal=True, interval_seconds=0.1, count=3, **FAST_BACKOFF),
                SimulatedSensor(seed=1)).join()
    finally:
        broker.stop()
    assert stats.exit_code == EXIT_REFUSED
    assert stats.delivered == 0
    refused = [e for e in logs if "refuses this device" in e["event"]]
    assert refused and "revoked" in refused[0]["error"].lower(), logs


def test_the_cli_sends_stdin_records_and_events_and_saves_the_mqtt_url(
        world: MqttWorld) -> None:
    config = load_config(world.layout)
    save_config(world.layout, AgentConfig(server_url=config.server_url,
                                          device_id=config.device_id,
                                          keystore=config.keystore))  # no mqtt_url yet
    operator = Operator(world.broker, world.operator_pem, world.cafile,
                        ["devices/dev-1/telemetry/#", "devices/dev-1/events/#"])
    lines = ('{"temperature_c": 20.5}\n'
             'this line is not json\n'
             '{"type": "power", "data": {"watts": 3.5}}\n'
             '{"kind": "event", "type": "door-open", "data": {"door": 2}}\n')
    try:
        done = subprocess.run(
            [*AGENT, "run", "--state-dir", str(world.layout.root), "--mqtt",
             "--mqtt-url", world.broker.url, "--source", "stdin", "--count", "3"],
            input=lines.encode(), capture_output=True, timeout=60, check=False,
            env={**os.environ, "FLEETWARD_BOOTSTRAP_TOKEN": ""})
        got = operator.take(3)
    finally:
        operator.close()
    assert done.returncode == 0, done.stderr.decode()
    assert sorted(got, key=lambda m: m[0]) == sorted([
        ("devices/dev-1/telemetry/reading", {"temperature_c": 20.5}),
        ("devices/dev-1/telemetry/power", {"watts": 3.5}),
        ("devices/dev-1/events/door-open", {"door": 2})], key=lambda m: m[0])
    assert load_config(world.layout).mqtt_url == world.broker.url
    assert b"not JSON" in done.stderr  # the bad line is reported, not fatal


# --- HTTPS (device API contract) -------------------------------------------------------------


class DeviceApi:
    """The device API's contract on an aiohttp TLS server that requires a client
    certificate from the stack's CA. Records what it got, with the peer's CN."""

    def __init__(self, server: Pem, cafile: Path) -> None:
        self.port = free_port()
        self.received: list[tuple[str, str, Any]] = []  # (peer CN, path, JSON body)
        self.results: dict[str, Any] = {}
        self.poll_waits: list[str] = []
        self.self_answer: tuple[int, dict[str, Any]] = (200, {"id": "dev-1",
                                                               "state": "active"})
        self.telemetry_plan: list[int] = []  # statuses for the next telemetry posts
        self._pending: list[dict[str, Any]] = []
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(cafile))
        self._ctx.load_cert_chain(str(server.cert), str(server.key))
        self._ctx.verify_mode = ssl.CERT_REQUIRED
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._wake = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/devices/self", self._self)
        app.router.add_post("/v1/telemetry/{type}", self._message)
        app.router.add_post("/v1/events/{type}", self._message)
        app.router.add_get("/v1/commands", self._commands)
        app.router.add_post("/v1/commands/{id}/result", self._result)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ctx)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    @staticmethod
    def _peer(request: web.Request) -> str:
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        for rdn in (cert or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return ""

    @staticmethod
    def problem(status: int, detail: str, hint: str) -> web.Response:
        return web.json_response({"type": "about:blank", "title": "refused", "status": status,
                                  "detail": detail, "hint": hint}, status=status,
                                 content_type="application/problem+json")

    async def _self(self, request: web.Request) -> web.Response:
        status, body = self.self_answer
        if status != 200:
            return self.problem(status, body["detail"], body["hint"])
        return web.json_response({**body, "id": self._peer(request)})

    async def _message(self, request: web.Request) -> web.Response:
        message_type = request.match_info["type"]
        if message_type == "forbidden":
            return self.problem(403, "policy denies http:POST on v1/telemetry/forbidden",
                                "ask the operator to allow this message type")
        if request.path.startswith("/v1/telemetry") and self.telemetry_plan:
            status = self.telemetry_plan.pop(0)
            if status != 202:
                return self.problem(status, "sink unavailable", "retry later")
        self.received.append((self._peer(request), request.path, await request.json()))
        return web.json_response({"accepted": True}, status=202)

    async def _commands(self, request: web.Request) -> web.Response:
        self.poll_waits.append(request.query.get("wait", ""))
        wait = min(float(request.query.get("wait", "0")), 30.0)
        if not self._pending:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
        items, self._pending = self._pending, []
        return web.json_response({"items": items})

    async def _result(self, request: web.Request) -> web.Response:
        self.results[request.match_info["id"]] = await request.json()
        return web.Response(status=204)

    def queue_command(self, command: dict[str, Any]) -> None:
        def put() -> None:
            self._pending.append(command)
            self._wake.set()
        self._loop.call_soon_threadsafe(put)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def api(sqlite_stack: Stack, tmp_path: Path) -> Iterator[tuple[DeviceApi, StateLayout]]:
    cafile = chain_file(sqlite_stack, tmp_path)
    device_api = DeviceApi(issue_server(sqlite_stack, tmp_path / "server"), cafile)
    layout = enrolled_agent(sqlite_stack, tmp_path / "agent", "dev-1",
                            server_url=device_api.url)
    yield device_api, layout
    device_api.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_https_telemetry_and_events_arrive_with_the_device_certificate(
        api: tuple[DeviceApi, StateLayout]) -> None:
    device_api, layout = api
    source = LineSource(io.BytesIO(b'{"t": 1}\n{"kind": "event", "type": "boot", "data": {}}\n'
                                   b'{"type": "power", "data": {"w": 2}}\n'))
    stats = AgentThread(layout, RunOptions(channel="https", poll_wait_seconds=1),
                        source).join()
    assert stats.delivered == 3 and stats.exit_reason == "finished"
    assert device_api.received == [("dev-1", "/v1/telemetry/reading", {"t": 1}),
                                   ("dev-1", "/v1/events/boot", {}),
                                   ("dev-1", "/v1/telemetry/power", {"w": 2})]


def test_https_long_poll_delivers_a_command_and_the_result_is_posted(
        api: tuple[DeviceApi, StateLayout]) -> None:
    device_api, layout = api
    agent = AgentThread(layout, RunOptions(channel="https", poll_wait_seconds=2))
    try:
        wait_for(lambda: len(device_api.poll_waits) >= 1, "the first long-poll")
        # queued while the agent's poll is waiting: answered without a new poll cycle
        device_api.queue_command({"id": "c1", "name": "ping", "payload": {},
                                  "created_at": None, "expires_at": None})
        device_api.queue_command({"id": "c2", "name": "no-such-thing", "payload": {}})
        wait_for(lambda: {"c1", "c2"} <= set(device_api.results), "the results")
    finally:
        stats = agent.finish()
    assert device_api.results["c1"] == {"status": "succeeded", "result": {"pong": True}}
    assert device_api.results["c2"] == {"status": "failed",
                                        "result": {"error": "unknown command"}}
    assert set(device_api.poll_waits) == {"2"}
    assert stats.commands == 2


def test_https_problem_details_are_logged_and_a_refused_record_blocks_nothing(
        api: tuple[DeviceApi, StateLayout]) -> None:
    device_api, layout = api
    source = LineSource(io.BytesIO(b'{"n": 1}\n{"type": "forbidden", "data": {"n": 2}}\n'
                                   b'{"n": 3}\n'))
    with structlog.testing.capture_logs() as logs:
        stats = AgentThread(layout, RunOptions(channel="https", poll_wait_seconds=1),
                            source).join()
    assert [body for _, _, body in device_api.received] == [{"n": 1}, {"n": 3}]
    assert (stats.delivered, stats.rejected) == (2, 1)
    refused = [e for e in logs if e["event"] == "the server refused a message"]
    assert refused[0]["detail"] == "policy denies http:POST on v1/telemetry/forbidden"
    assert refused[0]["hint"] == "ask the operator to allow this message type"


def test_https_outage_answers_are_retried_in_order(
        api: tuple[DeviceApi, StateLayout]) -> None:
    device_api, layout = api
    device_api.telemetry_plan = [503, 503, 429]
    stats = AgentThread(layout, RunOptions(channel="https", poll_wait_seconds=1,
                                           interval_seconds=0.1, count=6, **FAST_BACKOFF),
                        SimulatedSensor(seed=5)).join()
    assert [body for _, _, body in device_api.received] == expected_readings(5, 6)
    assert stats.connections == 4 and stats.rejected == 0


@pytest.mark.parametrize(("revoked", "refused"), [(True, True), (False, False)])
def test_https_a_certificate_refused_in_the_tls_handshake_is_a_refusal(
        sqlite_stack: Stack, tmp_path: Path, revoked: bool, refused: bool) -> None:
    """Against ``openssl s_server`` checking a CRL: the revoked certificate's handshake
    ends in the server's alert 'certificate revoked', which the agent must read as a
    refusal of its identity; the same setup with an unrevoked certificate opens."""
    cafile = chain_file(sqlite_stack, tmp_path)
    server = issue_server(sqlite_stack, tmp_path / "server")
    layout = enrolled_agent(sqlite_stack, tmp_path / "agent", "dev-1",
                            server_url="https://localhost:9")
    if revoked:
        serial = x509.load_pem_x509_certificate(layout.cert.read_bytes()).serial_number
        sqlite_stack.registry.revoke_certificate(serial, "keyCompromise", "operator:test")
    with sqlite_stack.db.transaction() as conn:
        crl = x509.load_der_x509_crl(sqlite_stack.authority.crl_der(conn, ISSUING_NAME))
    crlfile = tmp_path / "issuing.crl.pem"
    crlfile.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    port = free_port()
    s_server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(server.cert),
         "-key", str(server.key), "-CAfile", str(cafile), "-Verify", "3", "-CRL",
         str(crlfile), "-crl_check", "-verify_return_error", "-www", "-quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), "s_server")
        agent = open_agent(layout)
        session = HttpsSession(https_transport_factory(
            layout, f"https://localhost:{port}", agent.keystore), lambda item: None,
            poll_commands=False)
        if refused:
            with pytest.raises(ChannelRefused, match=r"(?i)certificate revoked"):
                session.open()
        else:
            session.open()  # s_server -www answers 200
            session.close()
    finally:
        s_server.kill()
        s_server.wait(5)


@pytest.mark.parametrize("status", [401, 403])
def test_https_refusal_of_the_device_stops_with_exit_on_refusal(
        api: tuple[DeviceApi, StateLayout], status: int) -> None:
    device_api, layout = api
    device_api.self_answer = (status, {"detail": "device dev-1 is disabled",
                                       "hint": "an operator must enable it"})
    with structlog.testing.capture_logs() as logs:
        stats = AgentThread(layout, RunOptions(channel="https", exit_on_refusal=True),
                            SimulatedSensor(seed=1)).join()
    assert stats.exit_code == EXIT_REFUSED and stats.connections == 0
    refused = [e for e in logs if "refuses this device" in e["event"]]
    assert "device dev-1 is disabled" in refused[0]["error"]
    assert refused[0]["hint"] == "an operator must enable it"
    assert device_api.received == []


# --- HTTPS with the key on a PKCS#11 token (curl + OpenSSL's pkcs11 engine) ------------------

TOKEN_LABEL = "fw-agent-channel"  # labels are per process: one token for this module only


@pytest.fixture(scope="module")
def token_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    if not list(Path("/usr/lib").glob("*/engines-3/pkcs11.so")):
        need_service("OpenSSL's pkcs11 engine (Debian: libengine-pkcs11-openssl)")
    with softhsm_tokens(tmp_path_factory.mktemp("softhsm-channel"), [TOKEN_LABEL]) as tokens:
        yield tokens.pin, tokens.pin_file


def token_agent(stack: Stack, root: Path, device_id: str, server_url: str,
                pin_file: Path) -> StateLayout:
    """A state directory whose key was generated on the token and never left it."""
    stack.add_device(device_id)
    layout = ensure_state_dir(root)
    config = AgentConfig(server_url=server_url, device_id=device_id, keystore=KeystoreConfig(
        kind="pkcs11", module=SOFTHSM_MODULE, token_label=TOKEN_LABEL,
        pin_file=str(pin_file)))
    save_config(layout, config)
    write_atomic(layout.ca, stack.authority.chain_pem().encode(), 0o644)
    keystore = Pkcs11Keystore(layout, config)
    key = keystore.create_pending()  # CSR signed on the token
    csr = build_csr(device_id, key).public_bytes(serialization.Encoding.PEM)
    record = stack.registry.issue_certificate(device_id, csr, "device", "operator:test")
    install_certificate(layout, keystore, x509.load_pem_x509_certificate(record.pem.encode()),
                        rotated=True)
    return layout


@pytest.mark.softhsm
def test_https_with_a_token_key_sends_and_answers_through_curl(
        sqlite_stack: Stack, tmp_path: Path, token_env: tuple[str, Path]) -> None:
    _, pin_file = token_env
    cafile = chain_file(sqlite_stack, tmp_path)
    device_api = DeviceApi(issue_server(sqlite_stack, tmp_path / "server"), cafile)
    layout = token_agent(sqlite_stack, tmp_path / "agent", "dev-hsm", device_api.url, pin_file)
    try:
        # --mqtt cannot use the token key: a clear refusal before any connection
        with pytest.raises(InvalidInput) as caught:
            run_agent(layout, RunOptions(channel="mqtt"), threading.Event())
        assert "--https" in caught.value.hint
        # no channel named: HTTPS is chosen for a token key
        agent = AgentThread(layout, RunOptions(poll_wait_seconds=2, interval_seconds=0.2,
                                               count=2),
                            SimulatedSensor(seed=9))
        wait_for(lambda: len(device_api.poll_waits) >= 1, "the first long-poll")
        device_api.queue_command({"id": "c-hsm", "name": "ping", "payload": {}})
        wait_for(lambda: "c-hsm" in device_api.results and len(device_api.received) >= 2,
                 "telemetry and the result")
        stats = agent.finish()
    finally:
        device_api.close()
    assert [(cn, path) for cn, path, _ in device_api.received] == [
        ("dev-hsm", "/v1/telemetry/reading")] * 2
    assert [body for _, _, body in device_api.received] == expected_readings(9, 2)
    assert device_api.results["c-hsm"] == {"status": "succeeded", "result": {"pong": True}}
    assert stats.delivered == 2


# --- how the agent reads MQTT refusals (a scripted broker on a real TLS socket) ------------------
#
# Mosquitto cannot be made to answer CONNACK 0x8A or DISCONNECT 0x98; Fleetward's own
# MQTT server does (tested end to end once it is wired). This broker answers exactly
# the bytes of MQTT 5.0 §3.2 / §3.14 and 3.1.1 §3.2, so the agent's reading of them is
# tested against the wire format, not against our own encoder.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _reason_props(reason: str) -> bytes:
    if not reason:
        return b"\x00"
    raw = reason.encode()
    props = b"\x1f" + len(raw).to_bytes(2, "big") + raw  # Reason String (§3.2.2.3.9)
    return _varint(len(props)) + props


class ScriptedBroker:
    """Accepts TLS connections, reads CONNECT, answers as told, closes."""

    def __init__(self, server: Pem, *, connack: int, reason: str = "",
                 disconnect: int | None = None) -> None:
        self.connack, self.reason, self.disconnect = connack, reason, disconnect
        self.connects: list[int] = []  # protocol level of each CONNECT
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(str(server.cert), str(server.key))
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._sock.accept()
            except TimeoutError:
                continue
            with raw, contextlib.suppress(OSError):
                raw.settimeout(5)
                with self._ctx.wrap_socket(raw, server_side=True) as conn:
                    self._answer(conn)

    @staticmethod
    def _read_packet(conn: ssl.SSLSocket) -> tuple[int, bytes]:
        header = conn.recv(1)
        length, shift = 0, 0
        while True:
            byte = conn.recv(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = b""
        while len(body) < length:
            body += conn.recv(length - len(body))
        return header[0], body

    def _answer(self, conn: ssl.SSLSocket) -> None:
        kind, body = self._read_packet(conn)
        if kind >> 4 != 1:
            return
        level = body[6]  # after the protocol name "MQTT" (2-byte length + 4)
        self.connects.append(level)
        if level == 5:
            payload = b"\x00" + bytes([self.connack]) + _reason_props(
                "" if self.disconnect is not None else self.reason)
        else:
            payload = b"\x00" + bytes([self.connack])
        conn.sendall(b"\x20" + _varint(len(payload)) + payload)
        if self.disconnect is not None:
            self._read_packet(conn)  # the agent's SUBSCRIBE to its commands
            payload = bytes([self.disconnect]) + _reason_props(self.reason)
            conn.sendall(b"\xe0" + _varint(len(payload)) + payload)
        time.sleep(0.2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.mark.parametrize(("version", "connack", "disconnect", "refused"), [
    ("5", 0x8A, None, True),       # banned: revoked certificate, compromised device
    ("5", 0x87, None, True),       # not authorized: policy, device state
    ("5", 0x86, None, True),       # bad credentials: unknown device
    ("5", 0x00, 0x98, True),       # administrative action: closed live by the operator
    ("3.1.1", 0x05, None, True),   # 3.1.1 "not authorized" (§3.2.2.3)
    ("3.1.1", 0x04, None, True),   # 3.1.1 "bad user name or password"
    # negative controls: the server is busy or unavailable, the device is not refused
    ("5", 0x88, None, False),      # server unavailable
    ("5", 0x89, None, False),      # server busy
    ("5", 0x00, 0x8B, False),      # server shutting down
    ("3.1.1", 0x03, None, False),  # 3.1.1 server unavailable
])
def test_mqtt_refusal_codes_stop_the_agent_and_others_only_back_off(
        sqlite_stack: Stack, tmp_path: Path, version: str, connack: int,
        disconnect: int | None, refused: bool) -> None:
    broker = ScriptedBroker(issue_server(sqlite_stack, tmp_path / "server"), connack=connack,
                            reason="certificate 5f3a revoked", disconnect=disconnect)
    layout = enrolled_agent(sqlite_stack, tmp_path / "agent", "dev-1",
                            server_url="https://localhost:9", mqtt_url=broker.url)
    try:
        with structlog.testing.capture_logs() as logs:
            agent = AgentThread(layout, RunOptions(
                mqtt_version=version, exit_on_refusal=True, renew=False, **FAST_BACKOFF))
            if refused:
                stats = agent.join()
            else:
                wait_for(lambda: len(broker.connects) >= 2, "a second attempt")
                stats = agent.finish()
    finally:
        broker.close()
    assert set(broker.connects) == {5 if version == "5" else 4}
    if disconnect is not None:
        assert stats.connections >= 1  # CONNACK 0: the session was up when it was ended
    if refused:
        assert stats.exit_code == EXIT_REFUSED
        assert len(broker.connects) == 1  # exited: no second attempt
        event = next(e for e in logs if "refuses this device" in e["event"])
        if version == "5":
            assert event["reason"] == "certificate 5f3a revoked"  # the server's words
    else:
        assert stats.exit_code != EXIT_REFUSED and stats.refusals == 0
        assert stats.backoffs and max(stats.backoffs) <= FAST_BACKOFF["reconnect_cap_seconds"]
