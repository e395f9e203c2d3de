"""The TLS acceptor behind the device HTTPS and MQTT listeners, over real sockets and real
TLS, on both event loops ``fleetward serve`` may run (uvloop) and tests use (asyncio).

Threats: a certificate refusal that nobody hears of; a flood of TCP connections that
never finish TLS, holding sockets and memory; more connections than the node can carry;
a counter that leaks on some path and slowly locks everybody out."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from fleetward.web import tls_gate
from fleetward.web.tls_gate import ListenerLimits, TLSAcceptor
from tests.unit.mqtt_support import Pki, wait_until

T = TypeVar("T")
WAIT = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("acceptor-pki"))


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("foreign-pki"), name="Somebody Else's CA")


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class Listener:
    """A TLSAcceptor on 127.0.0.1 in a loop thread, recording what it reports."""

    def __init__(self, pki: Pki, loop: asyncio.AbstractEventLoop, limits: ListenerLimits,
                 handshake_timeout_seconds: float = 5.0) -> None:
        self.loop = loop
        self.refused: list[tuple[str, str]] = []
        self.limited: list[tuple[str, str, int]] = []
        self.acceptor = TLSAcceptor(
            pki.server_context(), _Echo, limits=limits,
            on_refused=lambda peer, reason: self.refused.append((peer, reason)),
            on_limited=lambda peer, limit, reset: self.limited.append((peer, limit, reset)),
            handshake_timeout_seconds=handshake_timeout_seconds)
        self._thread = threading.Thread(target=loop.run_forever, daemon=True)
        self._thread.start()

        async def start() -> asyncio.AbstractServer:
            return await loop.create_server(self.acceptor, "127.0.0.1", 0)
        self.server = self.call(start())
        self.port = int(self.server.sockets[0].getsockname()[1])

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def counters(self) -> tuple[int, int]:
        async def read() -> tuple[int, int]:
            return self.acceptor.open, self.acceptor.pending
        result: tuple[int, int] = self.call(read())
        return result

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()
        self.call(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)
        self.loop.close()


LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio"),
         pytest.param(uvloop.new_event_loop, id="uvloop")]


@pytest.fixture(params=LOOPS)
def make_listener(request: pytest.FixtureRequest, pki: Pki
                  ) -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def make(max_connections: int = 100, max_pending_handshakes: int = 100,
             max_pending_handshakes_per_source: int = 100, **kwargs: Any) -> Listener:
        limits = ListenerLimits(max_connections, max_pending_handshakes,
                                max_pending_handshakes_per_source)
        listener = Listener(pki, request.param(), limits, **kwargs)
        started.append(listener)
        return listener

    yield make
    for listener in started:
        listener.stop()


def connect(listener: Listener, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", listener.port), timeout=WAIT,
                                    source_address=(source, 0))


def tls_client(listener: Listener, pki: Pki, device_id: str | None,
               context: ssl.SSLContext | None = None, source: str = "127.0.0.1"
               ) -> ssl.SSLSocket:
    """A finished handshake, proven by an echo (TLS 1.3 clients finish before the
    server has checked their certificate, and only then learn it was refused)."""
    raw = connect(listener, source)
    context = context or pki.client_context(device_id)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"ping")
    if tls.recv(4) != b"ping":
        tls.close()
        raise ConnectionResetError("the server closed the connection")
    return tls


def refused_by_server(connect: Callable[[], Any]) -> bool:
    """True when the server ends the connection instead of serving it."""
    try:
        connection = connect()
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    connection.close()
    return False


def is_reset(sock: socket.socket) -> bool:
    sock.settimeout(WAIT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_device_gets_through_and_the_counters_return_to_zero(
        make_listener: Callable[..., Listener], pki: Pki) -> None:
    listener = make_listener()
    clients = [tls_client(listener, pki, f"d{n}") for n in range(3)]
    assert listener.counters() == (3, 0)
    for client in clients:
        client.close()
    wait_until(lambda: listener.counters() == (0, 0), what="every end counted")
    assert listener.refused == [] and listener.limited == []


@pytest.mark.parametrize("credential", ["none", "foreign"])
def test_certificate_refusals_are_reported_with_the_peer_and_the_reason(
        make_listener: Callable[..., Listener], pki: Pki, foreign_pki: Pki,
        credential: str) -> None:
    listener = make_listener()
    context = pki.client_context(None)
    if credential == "foreign":
        cert, key = foreign_pki.device("intruder")
        context.load_cert_chain(str(cert), str(key))
    assert refused_by_server(lambda: tls_client(listener, pki, None, context))
    wait_until(lambda: len(listener.refused) == 1, what="refusal reported")
    peer, reason = listener.refused[0]
    assert peer.startswith("127.0.0.1:")
    expected = "CERTIFICATE" if credential == "none" else "unable to get local issuer"
    assert expected.lower() in reason.lower()
    wait_until(lambda: listener.counters() == (0, 0), what="refused connection counted out")


def test_a_failed_handshake_that_is_not_about_a_certificate_is_not_reported(
        make_listener: Callable[..., Listener]) -> None:
    listener = make_listener()
    with connect(listener) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert is_reset(plain)
    wait_until(lambda: listener.counters() == (0, 0), what="counted out")
    assert listener.refused == []


def test_silent_clients_hold_only_the_pending_budget(
        make_listener: Callable[..., Listener], pki: Pki) -> None:
    listener = make_listener(max_pending_handshakes=2)
    silent = [connect(listener) for _ in range(2)]
    wait_until(lambda: listener.counters() == (2, 2), what="two handshakes pending")
    with connect(listener, "127.0.0.3") as third:
        assert is_reset(third), "a third silent client got a handshake slot"
    assert refused_by_server(lambda: tls_client(listener, pki, "d1")), (
        "the budget is full: even a real device waits until a slot frees")
    wait_until(lambda: len(listener.limited) == 1, what="limit reported")
    peer, limit, reset = listener.limited[0]
    assert peer.startswith("127.0.0.3:") and limit == "max_pending_handshakes"
    assert reset == 1, "the first reset of a window is reported at once, with its count"
    assert listener.acceptor.reset_total == 2
    for sock in silent:
        sock.close()
    wait_until(lambda: listener.counters() == (0, 0), what="slots freed")
    tls_client(listener, pki, "d1").close()  # negative control: a slot is free again


def test_a_handshake_that_never_finishes_is_aborted_and_frees_its_slot(
        make_listener: Callable[..., Listener]) -> None:
    listener = make_listener(max_pending_handshakes=1, handshake_timeout_seconds=0.5)
    with connect(listener) as silent:
        wait_until(lambda: listener.counters() == (1, 1), what="handshake pending")
        started = time.monotonic()
        assert is_reset(silent)
        assert time.monotonic() - started < 3.0
    wait_until(lambda: listener.counters() == (0, 0), what="slot freed by the timeout")


def test_open_connections_are_capped(make_listener: Callable[..., Listener],
                                     pki: Pki) -> None:
    listener = make_listener(max_connections=2)
    first, second = tls_client(listener, pki, "d1"), tls_client(listener, pki, "d2")
    assert refused_by_server(lambda: tls_client(listener, pki, "d3"))
    wait_until(lambda: listener.limited != [], what="limit reported")
    assert listener.limited[0][1] == "max_connections"
    first.close()
    wait_until(lambda: listener.counters()[0] == 1, what="one closed")
    tls_client(listener, pki, "d3").close()  # negative control: room again
    second.close()
    wait_until(lambda: listener.counters() == (0, 0), what="all closed")


def test_limit_reports_are_aggregated_per_window(make_listener: Callable[..., Listener],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood must not become a flood of audit rows: the first reset is reported at
    once, the rest of the window's resets in one report when the window ends (even if
    the flood has stopped by then), and nothing more while nothing happens."""
    monkeypatch.setattr(tls_gate, "LIMIT_REPORT_WINDOW_SECONDS", 1.0)  # >> 5 loopback resets
    listener = make_listener(max_connections=1, max_pending_handshakes=1,
                             max_pending_handshakes_per_source=1)
    with connect(listener):
        wait_until(lambda: listener.counters() == (1, 1), what="slot taken")
        for _ in range(5):
            with connect(listener) as over:
                assert is_reset(over)
        assert [reset for _, _, reset in listener.limited] == [1]
        wait_until(lambda: len(listener.limited) == 2, what="end-of-window report")
        assert listener.limited[1][2] == 4
        time.sleep(2.2)
        assert len(listener.limited) == 2, "reported again with nothing to report"


def test_one_address_gets_only_its_share_of_the_pending_budget(
        make_listener: Callable[..., Listener], pki: Pki) -> None:
    """Linux routes all of 127/8 to the loopback, so two addresses are two hosts."""
    listener = make_listener(max_pending_handshakes=10, max_pending_handshakes_per_source=2)
    hogs = [connect(listener, "127.0.0.1") for _ in range(2)]
    wait_until(lambda: listener.counters() == (2, 2), what="two pending")
    with connect(listener, "127.0.0.1") as third:
        assert is_reset(third), "one address took more than its share"
    tls_client(listener, pki, "d1", source="127.0.0.2").close()  # another host still gets in
    wait_until(lambda: listener.limited != [], what="share reported")
    assert listener.limited[0][1] == "max_pending_handshakes_per_source"
    for hog in hogs:
        hog.close()
    wait_until(lambda: listener.counters() == (0, 0), what="all counted out")
    tls_client(listener, pki, "d1", source="127.0.0.1").close()  # its share is free again


def test_a_client_refusing_our_certificate_is_not_our_refusal(
        make_listener: Callable[..., Listener], pki: Pki) -> None:
    """A client that finds our certificate wrong for the name it asked for sends a
    bad_certificate alert (RFC 8446 §6.2); the server sees an SSLError naming a
    certificate, but it is the client's complaint, not a refusal of ours."""
    listener = make_listener()

    def wrong_name() -> ssl.SSLSocket:
        raw = connect(listener)
        return pki.client_context("d1").wrap_socket(raw, server_hostname="elsewhere.example")
    assert refused_by_server(wrong_name)
    wait_until(lambda: listener.counters() == (0, 0), what="counted out")
    assert listener.refused == []
