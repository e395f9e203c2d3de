"""The device HTTPS API over a real TLS socket on 127.0.0.1, with the real trust gate,
policy service, command service and a real SQLite registry (uvloop, as `fleetward
serve` runs it, behind the same GatedTLSSite).

Threats: a peer without our certificate, a revoked certificate on a live keep-alive
connection, a device stepping outside its policy, a device answering another device's
command, and malformed or oversized bodies. Each refusal must be problem+json with a
reason a device developer can act on, and each has a negative control.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvloop
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from fleetward.agent.est_client import build_csr
from fleetward.ca.pipeline import IssueRequest
from fleetward.ca.profiles import profiles_from_config
from fleetward.config import CAConfig, ChannelConfig, DeviceApiConfig, SinkConfig
from fleetward.edge.channel import Admission, LiveConnections
from fleetward.edge.device import build_device_app
from fleetward.edge.device_api import CONNECTIONS_KEY, DeviceApi
from fleetward.edge.gate import TrustGate
from fleetward.edge.ingest import Ingest
from fleetward.edge.sinks import SqlSink
from fleetward.model import AuditEvent, LifecycleState, format_serial
from fleetward.registry.device_commands import DeviceCommandService
from fleetward.registry.policies import PolicyService
from fleetward.store import Database
from fleetward.store.schema import device_messages
from fleetward.web.tls import server_context
from fleetward.web.tls_gate import GatedTLSSite, ListenerLimits
from tests.conftest import IN_CI, Stack, free_port
from tests.integration.channel_helpers import KeepAliveConnection, write_cert_and_key

T = TypeVar("T")
PROBLEM = "application/problem+json"
LONG_POLL_MAX_SECONDS = 3  # short, so that the clamp is observable in a test
CONFIG = DeviceApiConfig(max_message_bytes=4096, long_poll_max_seconds=LONG_POLL_MAX_SECONDS)
WAIT = 10.0  # seconds any awaited event may take before the test fails


@dataclass(frozen=True)
class Identity:
    device_id: str
    cert: Path
    key: Path
    cafile: Path
    serial: int

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cafile))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


class StoredMessages:
    """What the real ingest stored in the real SQL sink, in order."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def accepted(self) -> list[tuple[str, str, str, Any]]:
        with self._db.read() as conn:
            rows = conn.execute(select(device_messages).order_by(device_messages.c.id))
            return [(r.device_id, r.kind, r.message_type, r.payload) for r in rows]


class LazyIngest:
    """Builds the real ``Ingest`` over a real ``SqlSink`` on first use, on the serving
    loop (the sink's batching task belongs to that loop)."""

    def __init__(self, server: DeviceServer) -> None:
        self._server = server

    async def accept_http(self, admission: Admission, kind: str, message_type: str,
                          data: Any) -> None:
        server = self._server
        if server.ingest is None:
            sink = SqlSink(server.stack.db, server.executor, SinkConfig())
            server.ingest = Ingest(sink, server.commands, CONFIG, server.gate.message_types_of,
                                   server.executor)
        await server.ingest.accept_http(admission, kind, message_type, data)


class DeviceServer:
    """The device listener as ``fleetward serve`` builds it, on its own uvloop thread."""

    def __init__(self, stack: Stack, directory: Path) -> None:
        self.stack = stack
        self.directory = directory
        self.cafile = directory / "chain.pem"
        self.cafile.write_text(stack.authority.chain_pem())
        key = ec.generate_private_key(ec.SECP256R1())
        with stack.db.transaction() as conn:
            record = stack.authority.issue(conn, IssueRequest(
                public_key=key.public_key(), profile=profiles_from_config(CAConfig())["server"],
                server_names=("localhost", "127.0.0.1")), "test")
        cert, key_file = write_cert_and_key(
            directory, "server", record.pem + stack.authority.issuing.pem, key)
        self.tls = server_context(cert, key_file, client_ca_file=self.cafile)
        self.live = LiveConnections()
        self.policies = PolicyService(stack.db, stack.audit, stack.clock)
        self.refusals: list[AuditEvent] = []
        self.gate = TrustGate(stack.db, [stack.authority.issuing.certificate], self.policies,
                              self.live, ChannelConfig(), stack.clock,
                              audit_refusal=self.refusals.append)
        self.gate.load()
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-device-db")
        self.commands = DeviceCommandService(stack.db, stack.audit, stack.clock, CONFIG,
                                             self.executor)
        # The real ingest and SQL sink (built on the serving loop, where they run).
        self.intake = StoredMessages(stack.db)
        self.ingest: Ingest | None = None
        self.app = build_device_app(api=DeviceApi(self.gate, self.live, LazyIngest(self),
                                                  self.commands, CONFIG, self.executor))
        self.port = free_port()
        self.loop = uvloop.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = GatedTLSSite(self.runner, "127.0.0.1", self.port, ssl_context=self.tls,
                            on_refused=lambda address, reason: None,
                            on_limited=lambda address, limit, reset: None,
                            limits=ListenerLimits(1000, 100, 100))
        self.loop.run_until_complete(site.start())
        self._ready.set()
        self.loop.run_forever()

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (where the gate enforces), return its result."""
        async def call() -> T:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(WAIT)

    def sync(self) -> int:
        """Apply control-plane changes as the node's watcher does: poll off the loop,
        apply on it."""
        update = self.gate.poll()
        return self.on_loop(lambda: self.gate.apply(update))

    def tracked(self) -> int:
        return self.on_loop(lambda: len(self.app[CONNECTIONS_KEY]))

    def device(self, device_id: str) -> Identity:
        """Register ``device_id`` (type sensor, owner acme), issue it a certificate."""
        self.stack.add_device(device_id)
        key = ec.generate_private_key(ec.SECP256R1())
        csr = build_csr(device_id, key).public_bytes(serialization.Encoding.PEM)
        record = self.stack.registry.issue_certificate(device_id, csr, "device",
                                                       "operator:test")
        cert, key_file = write_cert_and_key(self.directory / "devices", device_id, record.pem, key)
        self.sync()
        return Identity(device_id, cert, key_file, self.cafile, record.serial)

    def client(self, identity: Identity | None) -> httpx.Client:
        verify = identity.context() if identity else ssl.create_default_context(
            cafile=str(self.cafile))
        return httpx.Client(base_url=self.url, verify=verify, timeout=WAIT + 5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)
        self.loop.close()
        self.executor.shutdown(wait=True)


@pytest.fixture
def server(sqlite_stack: Stack, tmp_path: Path) -> Iterator[DeviceServer]:
    s = DeviceServer(sqlite_stack, tmp_path)
    yield s
    s.close()


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["detail"] and body["hint"], body
    assert "Traceback" not in response.text
    return body


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- admission ----------------------------------------------------------------------------


def test_no_client_certificate_is_401_without_an_http_challenge(server: DeviceServer) -> None:
    own = server.device("d1")
    with server.client(None) as anonymous:
        refused = anonymous.get("/v1/devices/self")
        body = problem(refused, 401)
        # Health and EST stay open without a certificate: only /v1 device routes are gated.
        assert anonymous.get("/v1/health").status_code == 200
    assert "WWW-Authenticate" not in refused.headers  # no HTTP scheme can answer it
    assert body["reason_code"] == "0x86" and "--cert" in body["hint"]
    assert server.refusals and server.refusals[-1].action == "channel.refused"
    with server.client(own) as device:  # negative control
        assert device.get("/v1/devices/self").status_code == 200


def test_own_status_comes_from_the_admission(server: DeviceServer) -> None:
    own = server.device("d1")
    cert = x509.load_pem_x509_certificate(own.cert.read_bytes())
    with server.client(own) as device:
        response = device.get("/v1/devices/self")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "id": "d1", "type": "sensor", "owner": "acme", "state": "active",
        "quarantined": False, "firmware_version": None,
        "certificate": {"serial": format_serial(own.serial),
                        "not_after": cert.not_valid_after_utc.isoformat().replace(
                            "+00:00", "Z")},
        "authenticated_by": "certificate"}


def test_revocation_closes_the_live_connection_and_the_next_one_is_403(
        server: DeviceServer) -> None:
    own, other = server.device("d1"), server.device("d2")
    conn = KeepAliveConnection(server.port, own.context())
    bystander = KeepAliveConnection(server.port, other.context())
    assert conn.get("/v1/devices/self") == 200 and bystander.get("/v1/devices/self") == 200
    assert server.live.count("https") == 2
    server.stack.registry.revoke_certificate(own.serial, "keyCompromise", "operator:test")
    assert server.sync() == 1
    assert conn.wait_closed(0.9), "the revoked device's keep-alive connection stayed open"
    assert not bystander.wait_closed(0.3)  # negative control: only that device
    assert bystander.get("/v1/devices/self") == 200
    with server.client(own) as device:
        body = problem(device.get("/v1/devices/self"), 403)
    assert body["detail"] == "the client certificate is revoked"
    assert body["reason_code"] == "0x8a"
    wait_until(lambda: server.live.count("https") == 1, "the closed connection to unregister")
    conn.close()
    bystander.close()


def test_a_registered_closer_closes_the_keep_alive_connection(server: DeviceServer) -> None:
    own = server.device("d1")
    conn = KeepAliveConnection(server.port, own.context())
    assert conn.get("/v1/devices/self") == 200
    assert conn.get("/v1/devices/self") == 200  # admitted once per connection
    assert server.live.count("https") == 1 and server.tracked() == 1
    closed = server.on_loop(lambda: server.live.close_device("d1", 0x98, "test"))
    assert closed == 1
    # Within the issue's one-second budget, and before the 1 s abort fallback: the close
    # itself (close_notify, then EOF) must do it.
    assert conn.wait_closed(0.9)
    assert server.live.count("https") == 0 and server.tracked() == 0
    conn.close()


def test_connections_the_device_closes_leave_no_entries_behind(server: DeviceServer) -> None:
    own = server.device("d1")
    for _ in range(5):
        with server.client(own) as device:
            assert device.get("/v1/devices/self").status_code == 200
    wait_until(lambda: server.live.count("https") == 0 and server.tracked() == 0,
               "closed connections to be forgotten")


# --- authorization --------------------------------------------------------------------------


def test_policy_decides_every_request_and_changes_apply_without_reconnect(
        server: DeviceServer) -> None:
    own = server.device("d1")
    with server.client(own) as device:
        assert device.post("/v1/events/boot", json={}).status_code == 202
        server.policies.put("telemetry-only", {"statements": [
            {"sid": "telemetry", "effect": "allow", "actions": ["http:POST"],
             "resources": ["v1/telemetry/+"]},
            {"sid": "status", "effect": "allow", "actions": ["http:GET"],
             "resources": ["v1/devices/self"]}]}, "operator:test")
        server.policies.attach("telemetry-only", "device", "d1", "operator:test")
        server.sync()
        body = problem(device.post("/v1/events/boot", json={}), 403)  # same connection
        assert "v1/events/boot" in body["detail"] and "policy" in body["hint"]
        assert device.post("/v1/telemetry/reading", json={"t": 1}).status_code == 202
        problem(device.get("/v1/commands"), 403)
    assert server.intake.accepted == [("d1", "event", "boot", {}),
                                      ("d1", "telemetry", "reading", {"t": 1})]


def test_quarantine_narrows_a_live_connection_to_its_own_status(server: DeviceServer) -> None:
    own = server.device("d1")
    with server.client(own) as device:
        assert device.post("/v1/telemetry/reading", json={"t": 1}).status_code == 202
        server.stack.registry.change_state("d1", LifecycleState.QUARANTINED, "operator:test")
        server.sync()
        body = problem(device.post("/v1/telemetry/reading", json={"t": 2}), 403)
        assert "quarantined" in body["hint"]
        status = device.get("/v1/devices/self")
        assert status.status_code == 200
        assert status.json()["state"] == "quarantined" and status.json()["quarantined"]
    assert len(server.intake.accepted) == 1


# --- telemetry and events ----------------------------------------------------------------


def test_own_telemetry_and_events_are_accepted_in_both_forms(server: DeviceServer) -> None:
    own = server.device("d1")
    with server.client(own) as device:
        for path, body in [("/v1/telemetry", {"type": "reading", "data": {"t": 21.5}}),
                           ("/v1/telemetry/power", {"w": 3}),
                           ("/v1/events", {"type": "boot", "data": {}}),
                           ("/v1/events/door", {"open": True})]:
            response = device.post(path, json=body)
            assert response.status_code == 202, response.text
            assert response.json() == {"accepted": True}
    assert server.intake.accepted == [
        ("d1", "telemetry", "reading", {"t": 21.5}), ("d1", "telemetry", "power", {"w": 3}),
        ("d1", "event", "boot", {}), ("d1", "event", "door", {"open": True})]


BAD_BODIES: list[tuple[str, str, bytes, str, int, str]] = [
    # case, path, body, content type, status, words the detail must contain
    ("not JSON", "/v1/telemetry/reading", b"{t: 1", "application/json", 400, "not valid JSON"),
    ("not UTF-8", "/v1/telemetry/reading", b'{"t": "\xff"}', "application/json", 400,
     "UTF-8"),
    ("form content type", "/v1/telemetry/reading", b'{"t": 1}',
     "application/x-www-form-urlencoded", 400, "application/json"),
    ("bare number", "/v1/telemetry/reading", b"42", "application/json", 400, "object"),
    ("envelope without type", "/v1/telemetry", b'{"data": {}}', "application/json", 400,
     "'type'"),
    ("envelope without data", "/v1/events", b'{"type": "boot"}', "application/json", 400,
     "'data'"),
    ("envelope with extra field", "/v1/telemetry", b'{"type": "a", "data": {}, "x": 1}',
     "application/json", 400, "unknown field"),
    ("data not an object", "/v1/telemetry", b'{"type": "a", "data": [1]}',
     "application/json", 400, "object"),
    ("above the message limit", "/v1/telemetry/reading",
     json.dumps({"blob": "x" * 6000}).encode(), "application/json", 413, "larger than"),
    ("refused by the intake", "/v1/telemetry/Bad", b'{"t": 1}', "application/json", 400,
     "invalid message type"),
]


@pytest.mark.parametrize(("case", "path", "body", "content_type", "status", "words"),
                         BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_malformed_messages_get_a_problem_a_developer_can_act_on(
        server: DeviceServer, case: str, path: str, body: bytes, content_type: str,
        status: int, words: str) -> None:
    own = server.device("d1")
    with server.client(own) as device:
        refused = problem(device.post(path, content=body,
                                      headers={"Content-Type": content_type}), status)
        assert words in refused["detail"], refused
        # Negative control on the same connection: a good record still goes through.
        assert device.post("/v1/telemetry/reading", json={"t": 1}).status_code == 202
    assert server.intake.accepted == [("d1", "telemetry", "reading", {"t": 1})]


# --- commands ----------------------------------------------------------------------------


def start_long_poll(server: DeviceServer, identity: Identity) -> Callable[[], httpx.Response]:
    """``GET /v1/commands?wait=3`` on a thread of its own; returns once the server holds
    the poll, with a function that waits for and returns its answer."""
    answer: dict[str, httpx.Response] = {}

    def poll() -> None:
        with server.client(identity) as device:
            answer["poll"] = device.get("/v1/commands", params={"wait": 3})

    thread = threading.Thread(target=poll)
    thread.start()
    wait_until(lambda: server.commands.waiting() == 1, "the long-poll to wait")

    def result() -> httpx.Response:
        thread.join(WAIT)
        return answer["poll"]
    return result


def test_long_poll_returns_a_command_queued_during_the_wait(server: DeviceServer) -> None:
    own = server.device("d1")
    answer = start_long_poll(server, own)
    queued = server.commands.queue("d1", "reboot", {"delay_seconds": 5}, None, "operator:x")
    queued_at = time.monotonic()
    response = answer()
    answered_in = time.monotonic() - queued_at
    assert response.status_code == 200, response.text
    assert [item["id"] for item in response.json()["items"]] == [queued.id]
    assert response.json()["items"][0] == {
        "id": queued.id, "name": "reboot", "payload": {"delay_seconds": 5},
        "created_at": "2026-06-01T12:00:00Z", "expires_at": "2026-06-02T12:00:00Z"}
    assert answered_in < 1.0  # woken by the queue, not by the end of the wait
    assert server.commands.get(queued.id).status == "delivered"
    with server.client(own) as device:  # delivered: not handed out again at once
        assert device.get("/v1/commands").json() == {"items": []}


def test_results_are_accepted_once_and_only_from_the_addressed_device(
        server: DeviceServer) -> None:
    own, other = server.device("d1"), server.device("d2")
    command = server.commands.queue("d1", "reboot", {}, None, "operator:x")
    path = f"/v1/commands/{command.id}/result"
    with server.client(other) as thief:
        stolen = problem(thief.post(path, json={"status": "succeeded", "result": {}}), 404)
        unknown = problem(thief.post("/v1/commands/0000000000000000000000000/result",
                                     json={"status": "succeeded", "result": {}}), 404)
    # Same answer for "someone else's" and "does not exist".
    assert stolen["hint"] == unknown["hint"]
    assert server.commands.get(command.id).status == "pending"
    with server.client(own) as device:
        problem(device.post(path, json={"status": "done"}), 400)
        problem(device.post(path, json={"status": "succeeded", "result": [1]}), 400)
        done = device.post(path, json={"status": "succeeded", "result": {"uptime": 7}})
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "succeeded"
        again = problem(device.post(path, json={"status": "failed", "result": {}}), 409)
        assert "already answered" in again["detail"]
    row = server.commands.get(command.id)
    assert (row.status, row.result) == ("succeeded", {"uptime": 7})


@pytest.mark.parametrize("wait", ["abc", "-1", "1.5", "٣"])
def test_bad_wait_values_are_400(server: DeviceServer, wait: str) -> None:
    own = server.device("d1")
    with server.client(own) as device:
        body = problem(device.get("/v1/commands", params={"wait": wait}), 400)
        assert "wait" in body["detail"] and "?wait=" in body["hint"]
        assert device.get("/v1/commands", params={"wait": "0"}).status_code == 200


def test_a_wait_above_the_limit_is_shortened_not_refused(server: DeviceServer) -> None:
    own = server.device("d1")
    with server.client(own) as device:
        started = time.monotonic()
        response = device.get("/v1/commands", params={"wait": "3600"})
        elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.json() == {"items": []}
    assert LONG_POLL_MAX_SECONDS <= elapsed < LONG_POLL_MAX_SECONDS + 2
    assert server.commands.waiting() == 0


# --- curl --------------------------------------------------------------------------------


def curl(identity: Identity, server: DeviceServer, *args: str) -> tuple[int, Any]:
    if shutil.which("curl") is None:
        if IN_CI:
            pytest.fail("curl is required in CI")
        pytest.skip("curl not installed")
    done = subprocess.run(
        ["curl", "-sS", "--cert", str(identity.cert), "--key", str(identity.key),
         "--cacert", str(identity.cafile), "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=30, check=True)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body) if body else None


def test_curl_with_a_device_certificate(server: DeviceServer) -> None:
    own = server.device("d1")
    status, body = curl(own, server, "-H", "Content-Type: application/json",
                        "-d", '{"t": 22.5}', f"{server.url}/v1/telemetry/reading")
    assert (status, body) == (202, {"accepted": True})
    status, body = curl(own, server, f"{server.url}/v1/devices/self")
    assert status == 200 and body["id"] == "d1" and body["state"] == "active"
    assert server.intake.accepted == [("d1", "telemetry", "reading", {"t": 22.5})]
    # Negative control: the same curl without a certificate is refused.
    anonymous = subprocess.run(["curl", "-sS", "--cacert", str(own.cafile), "-o", "/dev/null",
                                "-w", "%{http_code}", f"{server.url}/v1/devices/self"],
                               capture_output=True, text=True, timeout=30, check=True)
    assert anonymous.stdout == "401"


def test_expired_commands_are_not_offered(server: DeviceServer) -> None:
    own = server.device("d1")
    server.commands.queue("d1", "reboot", {}, 60, "operator:x")
    server.stack.clock.advance(dt.timedelta(seconds=61))
    with server.client(own) as device:
        assert device.get("/v1/commands").json() == {"items": []}


def test_a_long_poll_that_outlives_a_quarantine_hands_nothing_out(server: DeviceServer) -> None:
    """The device was quarantined while its long-poll waited: the command queued
    meanwhile must not reach it (quarantined devices get recovery routes only)."""
    own = server.device("d1")
    answer = start_long_poll(server, own)
    server.stack.registry.change_state("d1", LifecycleState.QUARANTINED, "operator:test")
    server.sync()
    queued = server.commands.queue("d1", "reboot", {}, None, "operator:x")
    refused = answer()
    assert refused.status_code == 403, refused.text
    assert server.commands.get(queued.id).status == "pending"  # never handed out


def test_the_envelope_form_cannot_bypass_a_per_type_route_rule(server: DeviceServer) -> None:
    own = server.device("d1")
    server.policies.put("no-dumps", {"statements": [
        {"sid": "telemetry", "effect": "allow", "actions": ["http:POST"],
         "resources": ["v1/telemetry", "v1/telemetry/+"]},
        {"sid": "no-dumps", "effect": "deny", "actions": ["http:POST"],
         "resources": ["v1/telemetry/firmware-dump"]}]}, "operator:test")
    server.policies.attach("no-dumps", "device", "d1", "operator:test")
    server.sync()
    with server.client(own) as device:
        problem(device.post("/v1/telemetry/firmware-dump", json={"x": 1}), 403)
        body = problem(device.post("/v1/telemetry", json={"type": "firmware-dump",
                                                          "data": {"x": 1}}), 403)
        assert "no-dumps" in body["detail"]
        # Negative control: another type through the envelope still goes through.
        assert device.post("/v1/telemetry", json={"type": "reading", "data": {"t": 1}}
                           ).status_code == 202
    assert server.intake.accepted == [("d1", "telemetry", "reading", {"t": 1})]
