"""Acceptance 5: malformed input against a real `fleetward serve` MQTT listener.

Threat: one client with a valid certificate (so it gets past TLS and, where the case
needs it, past CONNECT) sends bytes that are not MQTT, or MQTT that breaks the rules,
to crash the server, wedge its event loop, grow its memory, or take other devices'
connections down with it. Every case runs over its own TLS connection and must end
with the server closing that connection (MQTT 3.1.1 §4.8, MQTT 5.0 §4.13: close on a
malformed packet or protocol error; 5.0 sends DISCONNECT with the reason code first).
Meanwhile a long-lived paho client keeps publishing and receiving, an idle raw
connection must still answer PINGREQ at the end, and the server's resident memory
and open file descriptors must stay bounded.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity
from tests.integration.mqtt_helpers import PahoClient, lab_device, setup_lab

MAX_PACKET_BYTES = 4096  # [mqtt] max_packet_size_bytes for this server
MAX_TOPIC_BYTES = 1024  # the default [mqtt] max_topic_bytes
CLOSE_WITHIN_SECONDS = 5.0  # a malformed connection must be gone well before this
RSS_GROWTH_LIMIT_BYTES = 50 * 1024 * 1024  # across the whole module
FD_SLACK = 8  # descriptors the server may open for its own reasons meanwhile
# After any prefix, this many zero bytes complete whatever packet the prefix started
# (its Remaining Length is at most the maximum packet size, or it is refused at once)
# and then read as packet type 0, which is reserved (§2.1.2): the server must decide
# now, not wait for its CONNECT timeout.
ZERO_FILL = b"\x00" * (MAX_PACKET_BYTES + 16)
EXAMPLES = 50
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

V311, V5 = 4, 5
MALFORMED, PROTOCOL_ERROR, TOPIC_NAME_INVALID, PACKET_TOO_LARGE = 0x81, 0x82, 0x90, 0x95


# --- hand-made packets (not our codec: the server must not be judged by itself) ---------


def varint(value: int) -> bytes:
    """MQTT Variable Byte Integer (§1.5.5 / 3.1.1 §2.2.3)."""
    out = bytearray()
    while True:
        value, byte = divmod(value, 128)
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def string(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def connect(client_id: str, version: int) -> bytes:
    props = b"\x00" if version == V5 else b""
    # Clean session/start, keep-alive 0 (the server applies its maximum).
    return packet(0x10, string(b"MQTT") + bytes([version, 0x02]) + b"\x00\x00" + props
                  + string(client_id.encode()))


def publish_body(topic: bytes, payload: bytes, version: int, qos: int = 0) -> bytes:
    """Topic, packet id (QoS 1), properties (5.0: none), payload."""
    return (string(topic) + (b"\x00\x01" if qos else b"") + (b"\x00" if version == V5 else b"")
            + payload)


def publish(topic: bytes, payload: bytes, version: int, qos: int = 0) -> bytes:
    return packet(0x30 | (qos << 1), publish_body(topic, payload, version, qos))


PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"


def read_packet(sock: ssl.SSLSocket) -> bytes:
    """One whole packet from ``sock`` (fixed header included)."""
    data = _read_exactly(sock, 2)
    while data[-1] & 0x80:
        data += _read_exactly(sock, 1)
    length, shift = 0, 0
    for byte in data[1:]:
        length |= (byte & 0x7F) << shift
        shift += 7
    return data + _read_exactly(sock, length)


def _read_exactly(sock: ssl.SSLSocket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


# --- the target and its observers ---------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Target:
    server: RunningServer
    attacker: DeviceIdentity
    watcher: PahoClient
    watch_topic: str
    bystander: ssl.SSLSocket
    baseline_rss: int
    baseline_fds: int

    def tls(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("localhost", self.server.mqtt_port),
                                       timeout=CLOSE_WITHIN_SECONDS)
        return self.attacker.tls_context().wrap_socket(raw, server_hostname="localhost")

    def attack(self, data: bytes, version: int | None) -> bytes:
        """Send ``data`` on a new connection (after a CONNECT that must succeed when
        ``version`` is given) and return what the server sent back after the CONNACK
        until it closed the connection."""
        with self.tls() as sock:
            if version is not None:
                sock.sendall(connect(self.attacker.device_id, version))
                connack = read_packet(sock)
                # Negative control: this connection is fine until the bad bytes.
                assert connack[0] == 0x20 and connack[3] == 0, connack
            # The server may close before taking everything: that is the point.
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
                sock.sendall(data)
            return self._until_closed(sock)

    @staticmethod
    def _until_closed(sock: ssl.SSLSocket) -> bytes:
        received = b""
        deadline = time.monotonic() + CLOSE_WITHIN_SECONDS
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except (ConnectionError, ssl.SSLError, OSError):
                return received
            if not chunk:
                return received
            received += chunk
        raise AssertionError(f"the server kept the connection open; it sent {received!r}")

    def others_unharmed(self) -> None:
        """The server is alive and the long-lived client still publishes and receives."""
        assert self.server.process.poll() is None, "the server process died"
        payload = uuid.uuid4().bytes
        assert self.watcher.publish(self.watch_topic, payload, 1) == 0
        got = self.watcher.take(1)
        assert [m.payload for m in got] == [payload], "the bystander lost a message"
        assert self.watcher.disconnected.is_set() is False


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    base = tmp_path_factory.mktemp("mqtt-fuzz")
    server = start_server(base / "data",
                          settings={"mqtt": {"max_packet_size_bytes": MAX_PACKET_BYTES}})
    try:
        setup_lab(server)
        attacker = lab_device(server, base / "ids", "fuzz-attacker")
        watch_id = lab_device(server, base / "ids", "fuzz-watcher")
        idle_id = lab_device(server, base / "ids", "fuzz-idle")
        watcher = PahoClient(server, watch_id, v5=True)
        assert watcher.wait_connack() == 0
        topic = f"devices/{watch_id.device_id}/ping"
        assert watcher.subscribe(topic, 1) == [1]
        raw = socket.create_connection(("localhost", server.mqtt_port), timeout=10)
        idle = idle_id.tls_context().wrap_socket(raw, server_hostname="localhost")
        idle.sendall(connect(idle_id.device_id, V5))
        assert read_packet(idle)[3] == 0
        pid = server.process.pid
        t = Target(server, attacker, watcher, topic, idle, 0, 0)
        for _ in range(20):  # warm up the code paths before the baseline
            t.attack(b"\xff" + ZERO_FILL, None)
            t.attack(publish(b"devices/+/x", b"", V5), V5)
            t.others_unharmed()
        t.baseline_rss, t.baseline_fds = rss_bytes(pid), open_fds(pid)
        yield t
        idle.close()
        watcher.close()
    finally:
        stop_server(server)


def disconnect_code(received: bytes) -> int | None:
    """The reason code of the MQTT 5 DISCONNECT the server sent last, if any."""
    if not received or received[0] != 0xE0:
        return None
    return received[2] if len(received) > 2 else 0


# --- scenario table -----------------------------------------------------------------------

OWN = b"devices/fuzz-attacker/"

# name, bytes, CONNECT first (None: no CONNECT), MQTT 5 DISCONNECT codes allowed (after
# CONNACK only; 3.1.1 has no server DISCONNECT and must send nothing).
SCENARIOS: list[tuple[str, bytes, int | None, frozenset[int]]] = [
    ("publish-before-connect", publish(OWN + b"t", b"x", V5), None, frozenset()),
    ("pingreq-before-connect", PINGREQ, None, frozenset()),
    ("subscribe-before-connect", packet(0x82, b"\x00\x01" + string(b"#") + b"\x00"), None,
     frozenset()),
    ("connect-above-max-size", b"\x10" + varint(MAX_PACKET_BYTES * 4) + b"\x00" * 64, None,
     frozenset()),
    ("remaining-length-five-bytes", b"\x30\xff\xff\xff\xff\x01", V5,
     frozenset({MALFORMED})),
    ("remaining-length-five-bytes-v311", b"\x30\xff\xff\xff\xff\x01", V311, frozenset()),
    ("pingreq-with-body", b"\xc0\x01\x00", V5, frozenset({MALFORMED})),
    ("publish-shorter-than-its-topic", b"\x30\x05\x00\x20abc", V5, frozenset({MALFORMED})),
    # Only the fixed header and a little of the body: refused before the body arrives.
    ("publish-above-max-size", b"\x30" + varint(MAX_PACKET_BYTES + 1) + b"\x00" * 100, V5,
     frozenset({PACKET_TOO_LARGE})),
    ("publish-declares-256-MiB", b"\x30\xff\xff\xff\x7f", V5,
     frozenset({PACKET_TOO_LARGE})),
    ("publish-above-max-size-v311", b"\x30" + varint(MAX_PACKET_BYTES + 1) + b"\x00" * 100,
     V311, frozenset()),
    ("topic-64KiB", publish(OWN + b"a" * (65535 - len(OWN)), b"x", V5), V5,
     frozenset({PACKET_TOO_LARGE})),
    ("topic-64KiB-v311", publish(OWN + b"a" * (65535 - len(OWN)), b"x", V311), V311,
     frozenset()),
    ("topic-above-max-topic-bytes", publish(OWN + b"a" * MAX_TOPIC_BYTES, b"x", V5), V5,
     frozenset({TOPIC_NAME_INVALID})),
    ("topic-with-wildcard", publish(OWN + b"+/x", b"x", V5, qos=1), V5,
     frozenset({TOPIC_NAME_INVALID})),
    ("topic-with-nul", publish(OWN + b"a\x00b", b"x", V5, qos=1), V5,
     frozenset({MALFORMED})),
    ("topic-utf16-surrogate", publish(OWN + b"\xed\xa0\x80", b"x", V5, qos=1), V5,
     frozenset({MALFORMED})),
    ("topic-overlong-slash", publish(b"devices\xc0\xaffuzz-attacker/t", b"x", V311, qos=1),
     V311, frozenset()),
    ("empty-topic-no-alias", publish(b"", b"x", V5, qos=1), V5,
     frozenset({PROTOCOL_ERROR, TOPIC_NAME_INVALID, MALFORMED})),
    ("second-connect", connect("fuzz-attacker", V5), V5, frozenset({PROTOCOL_ERROR})),
    ("reserved-type-0", b"\x00\x00", V5, frozenset({MALFORMED})),
    ("reserved-type-15-v311", b"\xf0\x00", V311, frozenset()),
    ("publish-qos-3", b"\x36" + publish(OWN + b"t", b"x", V5)[1:], V5,
     frozenset({MALFORMED})),
]


@pytest.mark.parametrize(("name", "data", "version", "codes"), SCENARIOS,
                         ids=[s[0] for s in SCENARIOS])
def test_malformed_input_closes_only_that_connection(target: Target, name: str, data: bytes,
                                                     version: int | None,
                                                     codes: frozenset[int]) -> None:
    received = target.attack(data, version)
    if codes:
        assert disconnect_code(received) in codes, received[:16]
    else:
        assert received == b"", f"{name}: the server answered {received[:16]!r}"
    target.others_unharmed()


# --- hypothesis ---------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(min_size=1, max_size=600))
def test_random_bytes_before_connect(target: Target, data: bytes) -> None:
    target.attack(data + ZERO_FILL, None)
    target.others_unharmed()


@FUZZ
@given(data=st.binary(min_size=1, max_size=600), version=st.sampled_from([V311, V5]))
def test_random_bytes_after_connect(target: Target, data: bytes, version: int) -> None:
    target.attack(data + ZERO_FILL, version)
    target.others_unharmed()


@FUZZ
@given(version=st.sampled_from([V311, V5]), suffix=st.binary(max_size=40).map(bytes.hex),
       payload=st.binary(max_size=200), qos=st.sampled_from([0, 1]),
       delta=st.integers(-64, 64).filter(bool))
def test_wrong_remaining_length(target: Target, version: int, suffix: str, payload: bytes,
                                qos: int, delta: int) -> None:
    """A PUBLISH to the client's own topic whose Remaining Length is off by ``delta``:
    the body is cut or swallows what follows; the stream is garbage from there on."""
    body = publish_body(OWN + suffix.encode(), payload, version, qos)
    wrong = max(len(body) + delta, 0)
    target.attack(bytes([0x30 | (qos << 1)]) + varint(wrong) + body + ZERO_FILL, version)
    target.others_unharmed()


def _not_utf8(raw: bytes) -> bool:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return "\x00" in text


ILL_FORMED = st.one_of(
    st.binary(min_size=1, max_size=64).filter(_not_utf8),
    st.tuples(st.text(max_size=20), st.sampled_from([
        b"\xed\xa0\x80",  # U+D800 encoded: a surrogate (§1.5.4 [MQTT-1.5.4-1])
        b"\xed\xbf\xbf",  # U+DFFF
        b"\x00",  # U+0000 ([MQTT-1.5.4-2])
        b"\xc0\x80",  # overlong U+0000
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"\xff", b"\x80", b"\xe2\x82",  # never valid / lone continuation / truncated
    ]), st.text(max_size=20)).map(lambda t: t[0].encode() + t[1] + t[2].encode()))


@FUZZ
@given(tail=ILL_FORMED, version=st.sampled_from([V311, V5]), qos=st.sampled_from([0, 1]))
def test_invalid_utf8_topics(target: Target, tail: bytes, version: int, qos: int) -> None:
    """Under the client's own tree, so only the encoding can be the reason to refuse."""
    received = target.attack(publish(OWN + tail, b"x", version, qos), version)
    if version == V5:
        assert disconnect_code(received) == MALFORMED, received[:16]
    else:
        assert received == b"", received[:16]
    target.others_unharmed()


# --- what is left after all of it -----------------------------------------------------------


def test_memory_and_descriptors_stay_bounded(target: Target) -> None:
    """Runs last in this module: a final mixed burst, then the server's footprint."""
    for i in range(100):
        target.attack(os.urandom(64 + i) + ZERO_FILL, None)
        target.attack(publish(OWN + b"\xff" * (i % 7 + 1), b"x", V5), V5)
        target.attack(b"\x30" + varint(MAX_PACKET_BYTES + i) + b"\x00" * 100, V311)
    target.others_unharmed()
    pid = target.server.process.pid
    growth = rss_bytes(pid) - target.baseline_rss
    assert growth < RSS_GROWTH_LIMIT_BYTES, f"RSS grew by {growth / 2**20:.1f} MiB"
    # Every closed connection gave its socket back (allow the loop a moment to reap).
    deadline = time.monotonic() + 2
    while open_fds(pid) > target.baseline_fds + FD_SLACK and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(pid) <= target.baseline_fds + FD_SLACK, (
        f"{open_fds(pid)} descriptors open, {target.baseline_fds} before the fuzz")
    # The idle connection made before all of it still works.
    target.bystander.sendall(PINGREQ)
    assert read_packet(target.bystander) == PINGRESP
