"""Issue 10: malformed requests must not write secrets (or non-JSON) into the server log.

Threat: a client — or a misconfigured proxy replaying an operator's request — sends
HTTP that the parser refuses while it carries a credential: a NUL byte in a header next
to ``Authorization: Bearer fwa_…``, a request line over the limit with the token in its
query, an oversize header, a header line without a colon, obsolete line folding, an
invalid method, an invalid Content-Length, broken chunked encoding, bytes that are not
HTTP at all. aiohttp logged each as a plain-text traceback quoting the raw line, so the
operator token landed in ``serve.log`` (and the JSON log stopped being JSON). On the
MQTT port, a malformed CONNECT carrying a password must not be logged with it either.

Every listener gets every case over a raw socket (TLS where the listener is TLS), then
the whole log file is scanned: the secret and every 10-character piece of it absent,
every line a JSON object, one structured line per malformed request naming its
listener. The listeners must still answer good requests afterwards.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity, make_device

SOCKET_TIMEOUT_SECONDS = 10.0  # a refused request is answered and closed in milliseconds
LOG_WAIT_SECONDS = 10.0  # for the server's last log lines to reach the file
PIECE = 10  # no run of this many characters of a secret may reach the log
OVER_LIMIT = 9000  # aiohttp's max_line_size and max_field_size are 8190 bytes

SECRET = f"fwa_{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}"
MQTT_PASSWORD = f"mqtt-{secrets.token_urlsafe(32)}"
MQTT_USERNAME = f"user-{secrets.token_urlsafe(24)}"
SECRETS = (SECRET, MQTT_PASSWORD, MQTT_USERNAME)


def pieces(secret: str) -> set[str]:
    """Every run of PIECE characters of ``secret``'s random part (after the prefix)."""
    random_part = secret.split("_", 1)[1] if secret.startswith("fwa_") else secret[5:]
    return {random_part[i:i + PIECE] for i in range(len(random_part) - PIECE + 1)}


# --- malformed HTTP, each case with the secret in it ---------------------------------------

AUTH = f"Authorization: Bearer {SECRET}\r\n"


def http(lines: str, body: bytes = b"") -> bytes:
    return lines.encode("latin-1") + b"\r\n" + body


HTTP_CASES: dict[str, bytes] = {
    "nul-in-another-header": http(f"GET /v1/health HTTP/1.1\r\nHost: x\r\n{AUTH}"
                                  "X-Trace: a\x00b\r\n"),
    "nul-in-authorization": http(f"GET /v1/health HTTP/1.1\r\nHost: x\r\n"
                                 f"Authorization: Bearer {SECRET}\x00\r\n"),
    "request-line-too-long": http(f"GET /v1/health?token={SECRET}&pad={'a' * OVER_LIMIT} "
                                  "HTTP/1.1\r\nHost: x\r\n"),
    "header-too-long": http(f"GET /v1/health HTTP/1.1\r\nHost: x\r\n"
                            f"Authorization: Bearer {SECRET}{'a' * OVER_LIMIT}\r\n"),
    "header-without-colon": http(f"GET /v1/health HTTP/1.1\r\nHost: x\r\nBearer {SECRET}\r\n"),
    "obsolete-line-folding": http(f"GET /v1/health HTTP/1.1\r\nHost: x\r\n"
                                  f"Authorization: Bearer\r\n {SECRET}\r\n"),
    "invalid-method": http(f"G@T /v1/health?token={SECRET} HTTP/1.1\r\nHost: x\r\n"),
    "invalid-content-length": http(f"POST /v1/health HTTP/1.1\r\nHost: x\r\n{AUTH}"
                                   f"Content-Length: 1{SECRET}\r\n"),
    "bad-chunked-encoding": http(f"POST /v1/health HTTP/1.1\r\nHost: x\r\n{AUTH}"
                                 "Transfer-Encoding: chunked\r\n", f"zz{SECRET}\r\n".encode()),
    "not-http": b"\x01\x02\xff" + SECRET.encode() + b"\r\n\r\n",
}

# A body the public listener reads (OCSP POST) whose Content-Encoding cannot be decoded:
# refused by the body parser rather than the header parser.
BAD_ENCODING_BODY = b"zz" + SECRET.encode()
BAD_CONTENT_ENCODING = http(
    f"POST /ocsp HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Type: application/ocsp-request\r\n"
    f"Content-Encoding: deflate\r\nContent-Length: {len(BAD_ENCODING_BODY)}\r\n"
    "Connection: close\r\n", BAD_ENCODING_BODY)


# --- malformed MQTT CONNECTs carrying a user name and password -----------------------------


def mqtt_string(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def mqtt_packet(first: int, body: bytes) -> bytes:
    assert len(body) < 128  # one-byte Remaining Length is all these cases need
    return bytes([first, len(body)]) + body


def mqtt_connect(client_id: str, *, flags: int = 0xC2, level: int = 4,
                 properties: bytes = b"\x00", password: bytes | None = None,
                 tail: bytes = b"") -> bytes:
    """A CONNECT (keep-alive 60 s) with the user name and password flags (0xC0) and
    clean session (0x02) by default; ``properties`` only for MQTT 5."""
    pwd = mqtt_string(MQTT_PASSWORD.encode()) if password is None else password
    credentials = mqtt_string(MQTT_USERNAME.encode()) + pwd if flags & 0xC0 else b""
    return mqtt_packet(0x10, mqtt_string(b"MQTT") + bytes([level, flags]) + b"\x00\x3c"
                       + (properties if level == 5 else b"") + mqtt_string(client_id.encode())
                       + credentials + tail)


def mqtt_cases(device_id: str) -> dict[str, tuple[bytes, str]]:
    """name → (bytes, the log event that must report it)."""
    secret = MQTT_PASSWORD.encode()
    return {
        # The password's length field claims more bytes than the packet holds.
        "password-runs-past-the-end": (mqtt_connect(
            device_id, password=(len(secret) + 40).to_bytes(2, "big") + secret),
            "mqtt protocol error"),
        "reserved-flag-set": (mqtt_connect(device_id, flags=0xC3), "mqtt protocol error"),
        "password-without-user-name": (mqtt_packet(0x10, mqtt_string(b"MQTT") + b"\x04\x42"
                                                   b"\x00\x3c" + mqtt_string(device_id.encode())
                                                   + mqtt_string(secret)),
                                       "mqtt protocol error"),
        "bytes-after-the-password": (mqtt_connect(device_id, tail=secret[:8]),
                                     "mqtt protocol error"),
        "v5-unknown-property": (mqtt_connect(device_id, level=5, properties=b"\x02\x7f\x00"),
                                "mqtt protocol error"),
        "not-mqtt": (secret + b"\x00" * 8, "mqtt protocol error"),
        # Well-formed, refused: the client id is not the certificate's device id.
        "refused-connect-with-password": (mqtt_connect("someone-else"), "mqtt connect refused"),
    }


# --- sockets ---------------------------------------------------------------------------------


def exchange(connect: Callable[[], socket.socket], data: bytes) -> bytes:
    """Send ``data`` on a new connection; everything received until the server closes."""
    with connect() as sock:
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            sock.sendall(data)
        received = b""
        deadline = time.monotonic() + SOCKET_TIMEOUT_SECONDS
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
        raise AssertionError(f"the server kept the connection open; it sent {received[:200]!r}")


def plain(port: int) -> Callable[[], socket.socket]:
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECONDS)


def tls(port: int, context: ssl.SSLContext) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        raw = socket.create_connection(("localhost", port), timeout=SOCKET_TIMEOUT_SECONDS)
        return context.wrap_socket(raw, server_hostname="localhost")
    return connect


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0


# --- the attack, once per module -------------------------------------------------------------


@dataclass
class Outcome:
    server: RunningServer
    http_status: dict[tuple[str, str], int] = field(default_factory=dict)
    bad_encoding_status: int = 0
    mqtt_received: dict[str, bytes] = field(default_factory=dict)
    good_requests: dict[str, int] = field(default_factory=dict)
    log_text: str = ""

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_text.splitlines()]


def listeners(server: RunningServer) -> dict[str, Callable[[], socket.socket]]:
    # The device listener accepts TLS without a client certificate (EST bootstrap).
    return {"public": plain(server.public_port),
            "admin": tls(server.admin_port, server.tls()),
            "device": tls(server.device_port, server.tls())}


def wait_for_log(server: RunningServer, event: str, count: int) -> None:
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while time.monotonic() < deadline:
        if server.log_file.read_text(errors="replace").count(f'"{event}"') >= count:
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    base = tmp_path_factory.mktemp("malformed")
    server = start_server(base / "data")
    result = Outcome(server)
    try:
        device: DeviceIdentity = make_device(server, base / "ids", "malformed-mqtt")
        for listener, connect in listeners(server).items():
            for name, data in HTTP_CASES.items():
                result.http_status[(listener, name)] = status_of(exchange(connect, data))
        result.bad_encoding_status = status_of(
            exchange(plain(server.public_port), BAD_CONTENT_ENCODING))
        mqtt = tls(server.mqtt_port, device.tls_context())
        for name, (data, _event) in mqtt_cases(device.device_id).items():
            result.mqtt_received[name] = exchange(mqtt, data)
        # The listeners still serve good requests after all that.
        result.good_requests["public"] = httpx.get(f"{server.public_url}/healthz",
                                                   timeout=10).status_code
        with server.admin() as admin:
            result.good_requests["admin"] = admin.get("/v1/health").status_code
        result.good_requests["device"] = httpx.get(
            f"https://localhost:{server.device_port}/v1/health", verify=server.tls(),
            timeout=10).status_code
        with tls(server.mqtt_port, device.tls_context())() as sock:
            sock.sendall(mqtt_connect(device.device_id, flags=0x02))
            result.good_requests["mqtt"] = sock.recv(4)[3]  # CONNACK return code
        wait_for_log(server, "malformed http request",
                     len(HTTP_CASES) * len(listeners(server)) + 1)
    finally:
        stop_server(server)
    result.log_text = server.log_file.read_text(errors="backslashreplace")
    yield result


# --- the tests -------------------------------------------------------------------------------


def test_every_malformed_request_is_refused_and_closed(outcome: Outcome) -> None:
    """Negative control for the log tests: every case did reach the parser and was
    refused (a 400, then the connection closed — `exchange` checks the close)."""
    assert outcome.http_status == {key: 400 for key in outcome.http_status}
    assert len(outcome.http_status) == len(HTTP_CASES) * 3
    assert outcome.bad_encoding_status == 400
    for name, received in outcome.mqtt_received.items():
        # MQTT 3.1.1 closes without a word on a malformed CONNECT (§4.8); a refused one
        # gets CONNACK 2 (identifier rejected).
        expected = b"\x20\x02\x00\x02" if name == "refused-connect-with-password" else b""
        assert received == expected, name


def test_no_secret_reaches_the_log(outcome: Outcome) -> None:
    for secret in SECRETS:
        assert secret not in outcome.log_text
        leaked = sorted(piece for piece in pieces(secret) if piece in outcome.log_text)
        assert not leaked, f"pieces of a secret in the log: {leaked[:3]}"


def test_every_log_line_is_json(outcome: Outcome) -> None:
    lines = outcome.log_text.splitlines()
    assert lines, "the server wrote no log"
    for number, line in enumerate(lines, 1):
        try:
            parsed = json.loads(line)
        except ValueError:
            pytest.fail(f"log line {number} is not JSON: {line[:120]!r}")
        assert isinstance(parsed, dict), line[:120]


def test_one_structured_line_per_malformed_http_request(outcome: Outcome) -> None:
    reports = [line for line in outcome.lines() if line["event"] == "malformed http request"]
    by_listener = {name: [r for r in reports if r["listener"] == name]
                   for name in ("public", "admin", "device")}
    assert {name: len(found) for name, found in by_listener.items()} == {
        "public": len(HTTP_CASES) + 1, "admin": len(HTTP_CASES), "device": len(HTTP_CASES)}
    for report in reports:
        assert set(report) <= {"event", "level", "timestamp", "listener", "peer", "status",
                               "error", "reason"}, report
        assert report["status"] == 400 and report["error"] and report["reason"]
    with_peer = [r for r in by_listener["admin"] if r["peer"] == "127.0.0.1"]
    assert len(with_peer) == len(HTTP_CASES), "the peer address is named"
    reasons = {r["reason"] for r in reports}
    assert "Invalid header value char" in reasons  # llhttp's own constant reason
    assert any(r["error"] == "LineTooLong" for r in reports)


def test_one_structured_line_per_malformed_or_refused_mqtt_connect(outcome: Outcome) -> None:
    cases = mqtt_cases("malformed-mqtt")
    lines = outcome.lines()
    for event in ("mqtt protocol error", "mqtt connect refused"):
        expected = sum(1 for _data, wanted in cases.values() if wanted == event)
        found = [line for line in lines if line["event"] == event]
        assert len(found) == expected, (event, found)
        for line in found:
            assert line["listener"] == "mqtt" and line["peer"].startswith("127.0.0.1:")
            assert isinstance(line["reason_code"], int) and line["reason"]


def test_listeners_still_answer_good_requests(outcome: Outcome) -> None:
    assert outcome.good_requests == {"public": 200, "admin": 200, "device": 200, "mqtt": 0}


def test_the_secret_scan_sees_a_leak() -> None:
    """Negative control for the scan itself: one piece of a secret is found."""
    line = json.dumps({"event": "x", "detail": SECRET[20:40]})
    assert any(piece in line for piece in pieces(SECRET))
