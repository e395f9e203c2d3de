"""Real parts for the MQTT server tests: a small CA with real certificates, a gate that
admits by certificate CN with an in-test policy, recording hooks, the server on its own
event loop thread, a raw TLS client speaking our codec, and paho-mqtt 2.x clients
driven from the test thread (no background reconnects)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from fleetward.clock import Clock
from fleetward.config import MqttConfig
from fleetward.edge.channel import (
    Admission,
    Decision,
    LiveConnections,
    Refusal,
    Refused,
)
from fleetward.edge.mqtt import codec as c
from fleetward.edge.mqtt.server import MqttServer
from fleetward.policy.topics import filter_covers, topic_matches
from fleetward.web.tls import server_context

T = TypeVar("T")


# --- PKI -----------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Pki:
    """A root CA, a server certificate for 127.0.0.1/localhost, device certificates."""

    directory: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    ca_file: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, directory: Path, name: str = "Test MQTT CA") -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .sign(key, hashes.SHA256()))
        ca_file = directory / "ca.pem"
        ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pki = cls(directory, key, cert, ca_file, directory / "server.pem",
                  directory / "server.key")
        pki._issue("localhost", pki.server_cert, pki.server_key, server=True)
        return pki

    def _issue(self, cn: str, cert_path: Path, key_path: Path, *, server: bool) -> None:
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(cn))
                   .issuer_name(self.ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(hours=1))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))

    def device(self, device_id: str) -> tuple[Path, Path]:
        cert_path = self.directory / f"{device_id}.pem"
        key_path = self.directory / f"{device_id}.key"
        if not cert_path.exists():
            self._issue(device_id, cert_path, key_path, server=False)
        return cert_path, key_path

    def client_context(self, device_id: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if device_id is not None:
            cert_path, key_path = self.device(device_id)
            ctx.load_cert_chain(str(cert_path), str(key_path))
        return ctx

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.server_cert, self.server_key, client_ca_file=self.ca_file,
                              require_client_cert=True)


# --- policy and gate ------------------------------------------------------------------------


Rule = tuple[str, str, str]  # (effect "allow"|"deny", action, topic filter)


def default_rules(device_id: str) -> list[Rule]:
    """The issue's default per type: publish own telemetry/events, subscribe/receive
    own commands."""
    base = f"devices/{device_id}"
    return [("allow", "mqtt:connect", device_id),
            ("allow", "mqtt:publish", f"{base}/telemetry/#"),
            ("allow", "mqtt:publish", f"{base}/events/#"),
            ("allow", "mqtt:subscribe", f"{base}/commands/#"),
            ("allow", "mqtt:receive", f"{base}/commands/#")]


class RulePolicy:
    """An in-test ChannelPolicy: explicit deny wins, no match denies."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = list(rules)

    def decide(self, action: str, resource: str) -> Decision:
        allowed = None
        for effect, rule_action, topic_filter in self.rules:
            if rule_action != action:
                continue
            if action == "mqtt:subscribe":
                hit = filter_covers(topic_filter, resource)
            else:
                hit = topic_matches(topic_filter, resource)
            if hit and effect == "deny":
                return Decision(False, f"denied by statement {rule_action} {topic_filter}",
                                "test", topic_filter)
            if hit and allowed is None:
                allowed = topic_filter
        if allowed is not None:
            return Decision(True, f"allowed by {action} {allowed}", "test", allowed)
        return Decision(False, "no statement allows it", "test", None)


class CnGate:
    """A DeviceGate for unit tests: the certificate's CN is the device id."""

    def __init__(self) -> None:
        self.extra: dict[str, list[Rule]] = {}
        self.banned: set[str] = set()
        self.admissions: list[Admission] = []

    def admit(self, peer_certificate_der: bytes | None, *, channel: str,
              client_id: str | None = None, source: str = "") -> Admission | Refused:
        if not peer_certificate_der:
            return Refused(Refusal.BAD_CREDENTIALS, "a client certificate is required")
        cert = x509.load_der_x509_certificate(peer_certificate_der)
        device_id = str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        if device_id in self.banned:
            return Refused(Refusal.BANNED, "the certificate is revoked")
        if client_id is not None and client_id != device_id:
            return Refused(Refusal.CLIENT_ID_NOT_VALID,
                           "the client id must equal the certificate's device id")
        admission = Admission(device_id=device_id, device_type="sensor", owner="acme",
                              serial=cert.serial_number,
                              not_after_epoch=cert.not_valid_after_utc.timestamp(),
                              state="active", quarantined=False,
                              policy=RulePolicy(default_rules(device_id)
                                                + self.extra.get(device_id, [])))
        self.admissions.append(admission)
        return admission

    def recheck(self, admission: Admission) -> Admission | Refused:
        if admission.device_id in self.banned:
            return Refused(Refusal.BANNED, "the certificate is revoked")
        return admission

    def current(self, device_id: str) -> Admission:
        return [a for a in self.admissions if a.device_id == device_id][-1]


# --- hooks ------------------------------------------------------------------------------------


@dataclass
class Accepted:
    device_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class RecordingHooks:
    """Records what the server hands over; refuses topics listed in ``refuse``."""

    refuse: dict[str, int] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)  # topics whose sink raises
    max_delay_seconds: float = 0.0  # random sink latency, to prove ordering
    accepted: list[Accepted] = field(default_factory=list)
    audits: list[tuple[str, str | None, str, dict[str, Any]]] = field(default_factory=list)
    connects: list[tuple[str, str]] = field(default_factory=list)
    disconnects: list[tuple[str, str]] = field(default_factory=list)
    subscriptions: list[tuple[str, list[str]]] = field(default_factory=list)

    async def accept_publish(self, admission: Admission, topic: str, payload: bytes,
                             qos: int, retain: bool) -> int | None:
        if self.max_delay_seconds:
            await asyncio.sleep(random.uniform(0, self.max_delay_seconds))
        if topic in self.fail:
            raise RuntimeError("sink unavailable")
        code = self.refuse.get(topic)
        if code is not None:
            return code
        self.accepted.append(Accepted(admission.device_id, topic, payload, qos, retain))
        return None

    def audit(self, action: str, admission: Admission | None, source: str,
              details: dict[str, Any]) -> None:
        self.audits.append((action, admission.device_id if admission else None, source,
                            details))

    def connected(self, admission: Admission, source: str) -> None:
        self.connects.append((admission.device_id, source))

    def disconnected(self, admission: Admission, reason: str) -> None:
        self.disconnects.append((admission.device_id, reason))

    def subscribed(self, admission: Admission, topic_filters: list[str]) -> None:
        self.subscriptions.append((admission.device_id, list(topic_filters)))

    def audited(self, action: str) -> list[dict[str, Any]]:
        return [details for name, _, _, details in list(self.audits) if name == action]


# --- the server on its own loop ---------------------------------------------------------------


class ServerThread:
    def __init__(self, pki: Pki, config: MqttConfig, clock: Clock | None = None) -> None:
        self.pki = pki
        self.config = config
        self.gate = CnGate()
        self.live = LiveConnections()
        self.hooks = RecordingHooks()
        # The node runs on uvloop; FLEETWARD_TEST_UVLOOP=1 runs these tests on it too.
        if os.environ.get("FLEETWARD_TEST_UVLOOP"):
            import uvloop
            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = MqttServer(self.gate, self.live, self.hooks, config,
                                 pki.server_context(), clock)
        self.port = self.run(self.server.start("127.0.0.1", 0))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()
        return self.run(wrapper())

    def stop(self) -> None:
        try:
            self.run(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    def stats(self) -> Any:
        return self.call(self.server.stats)

    def deliver(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        return self.call(lambda: self.server.deliver(topic, payload, qos, retain))


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


# --- raw client -------------------------------------------------------------------------------


class RawClient:
    """A TLS socket that speaks our codec, for exact bytes and exact answers."""

    def __init__(self, server: ServerThread, device_id: str | None, version: int = c.MQTT_5,
                 *, ctx: ssl.SSLContext | None = None) -> None:
        self.version = version
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        context = ctx or server.pki.client_context(device_id)
        self.sock = context.wrap_socket(sock, server_hostname="localhost")
        self.reader = c.PacketReader(1 << 24, version)
        self.eof = False

    def send(self, data: bytes | c.Packet) -> None:
        if not isinstance(data, bytes | bytearray):
            data = c.encode(data, self.version)
        self.sock.sendall(data)

    def connect(self, client_id: str, **kwargs: Any) -> c.Connack:
        self.send(c.Connect(client_id, self.version, **kwargs))
        packet = self.recv()
        assert isinstance(packet, c.Connack), packet
        return packet

    def recv(self, timeout: float = 5.0) -> c.Packet | None:
        """The next packet, or None when the server closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            packet = self.reader.next_packet()
            if packet is not None:
                return packet
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no packet from the server")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
                data = b""
            if not data:
                self.eof = True
            else:
                self.reader.feed(data)

    def expect(self, kind: type[T], timeout: float = 5.0) -> T:
        packet = self.recv(timeout)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    def until_closed(self, timeout: float = 5.0) -> list[c.Packet]:
        """Every packet up to the server's close (fails if it does not close)."""
        packets: list[c.Packet] = []
        while True:
            packet = self.recv(timeout)
            if packet is None:
                return packets
            packets.append(packet)

    def ping(self) -> None:
        self.send(c.PINGREQ)
        self.expect(c.Pingresp)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --- paho-mqtt 2.x clients --------------------------------------------------------------------


class PahoDevice:
    """A paho client whose network loop the test drives (``pump``), so it never
    reconnects behind the test's back."""

    def __init__(self, server: ServerThread, device_id: str, version: int, *,
                 clean: bool = True, keepalive: int = 60, session_expiry: int | None = None,
                 will: tuple[str, bytes, int, bool] | None = None) -> None:
        self.device_id = device_id
        protocol = paho.MQTTv5 if version == c.MQTT_5 else paho.MQTTv311
        kwargs: dict[str, Any] = {}
        if version != c.MQTT_5:
            kwargs["clean_session"] = clean
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id,
                                  protocol=protocol, **kwargs)
        self.client.tls_set_context(server.pki.client_context(device_id))
        self.messages: list[paho.MQTTMessage] = []
        self.connack: tuple[bool, int] | None = None
        self.subacks: dict[int, list[int]] = {}
        self.pubacks: dict[int, int] = {}
        self.disconnected: int | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, message: self.messages.append(message)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        if will is not None:
            self.client.will_set(will[0], will[1], will[2], will[3])
        properties = None
        if version == c.MQTT_5:
            properties = PahoProperties(PacketTypes.CONNECT)
            if session_expiry is not None:
                properties.SessionExpiryInterval = session_expiry
        connect_kwargs: dict[str, Any] = {"keepalive": keepalive}
        if version == c.MQTT_5:
            connect_kwargs["clean_start"] = clean
            connect_kwargs["properties"] = properties
        self.client.connect("127.0.0.1", server.port, **connect_kwargs)
        pump([self], lambda: self.connack is not None or self.disconnected is not None,
             what=f"CONNACK for {device_id}")

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason_code: Any, _p: Any) -> None:
        self.connack = (bool(flags.session_present), int(reason_code.value))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        self.subacks[mid] = [int(code.value) for code in codes]

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
        self.pubacks[mid] = int(reason_code.value)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        self.disconnected = int(reason_code.value)

    def subscribe(self, topic: str, qos: int) -> list[int]:
        _, mid = self.client.subscribe(topic, qos)
        pump([self], lambda: mid in self.subacks, what=f"SUBACK for {topic}")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False,
                wait: bool = True) -> int:
        info = self.client.publish(topic, payload, qos, retain)
        if qos and wait:
            pump([self], lambda: info.mid in self.pubacks, what=f"PUBACK for {topic}")
        else:
            pump([self], lambda: True)
        return info.mid

    def disconnect(self) -> None:
        self.client.disconnect()
        pump([self], lambda: self.disconnected is not None, what="disconnect")


def pump(devices: list[PahoDevice], until: Callable[[], bool], timeout: float = 5.0,
         what: str = "") -> None:
    """Run the clients' network loops until ``until()`` (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        for device in devices:
            device.client.loop(timeout=0.01)
        if until():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
