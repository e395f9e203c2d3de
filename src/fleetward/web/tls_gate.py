"""TLS listeners that see their own handshake failures and bound their connections.

When ``loop.create_server(ssl=…)`` refuses a client certificate (unknown CA, expired,
bad signature), asyncio and uvloop only log it at debug level and the application never
hears of it. Refusals must be audited (an IDevID from an unregistered OEM CA, a device
certificate from another CA on the MQTT port), so :class:`TLSAcceptor` builds the
per-connection TLS protocol itself — the same ``SSLProtocol`` class that
``create_server(ssl=…)`` uses on that loop (uvloop's own, or asyncio's) — and watches its
handshake waiter. Successful connections reach the application protocol unchanged.

Building the protocol here is also the only place that sees a connection *before* its
handshake, so it is where a listener bounds how many connections it holds open and how
many are still unauthenticated: beyond ``max_connections``, ``max_pending_handshakes``
or one address's ``max_pending_handshakes_per_source`` a new TCP connection is closed
at once instead of costing a handshake (an ECDHE + ECDSA round costs the server ≈ 1.5 ms
of CPU), and clients that connect and never finish TLS cannot hold more than the
pending budget, nor one address more than its share of it.

``loop.start_tls`` on an accepted connection is not an option: uvloop starts reading
right after ``connection_made``, so a fast client's ClientHello can arrive before
start_tls takes the stream over, and the handshake then stalls.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from asyncio.sslproto import SSLProtocol as AsyncioSSLProtocol
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger("fleetward.tls")

HANDSHAKE_TIMEOUT_SECONDS = 10  # a device on a slow link finishes well within this
# Connections reset over a limit are reported at most once per this window, with their
# count: a flood must not turn into a flood of audit rows.
LIMIT_REPORT_WINDOW_SECONDS = 60.0
OnRefused = Callable[[str, str], None]  # (peer "host:port", OpenSSL verify message)
# (peer "host:port" of the first one, which limit, connections reset since the last report)
OnLimited = Callable[[str, str, int], None]


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    max_connections: int  # open connections, those still in the handshake included
    max_pending_handshakes: int  # connections that have not finished TLS yet
    # One address's share of the pending budget: without it one host opening silent
    # connections faster than they time out would keep every device out.
    max_pending_handshakes_per_source: int


def format_peer(peer: Any) -> str:
    """``host:port`` (``[v6]:port``) of a ``peername``, or ``unknown``."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return "unknown"


class _Watched:
    """Mixed into the loop's SSLProtocol: remembers the peer and tells the acceptor
    when the connection ends, whatever happened to the handshake."""

    acceptor: TLSAcceptor
    peer_address = "unknown"
    source_host: str | None = None  # set while counted in the per-source share
    handshaking = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer_address = format_peer(peer)
        super().connection_made(transport)  # type: ignore[misc]
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if not self.acceptor._source_started(self, host):
            # Over its address's share: ended before the ClientHello is even read.
            transport.abort()  # type: ignore[attr-defined]

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)  # type: ignore[misc]
        finally:
            self.acceptor._ended(self)


class _WatchedAsyncio(_Watched, AsyncioSSLProtocol):
    pass


def _uvloop_protocol_class() -> tuple[type[Any], type[Any]] | None:
    try:
        import uvloop
        import uvloop.loop
    except ImportError:  # uvloop is a dependency; asyncio still works without it
        return None
    # Not in uvloop's type stubs, but the class create_server(ssl=…) itself uses.
    uvloop_ssl_protocol: type[Any] = getattr(uvloop.loop, "SSLProtocol")  # noqa: B009

    class _WatchedUvloop(_Watched, uvloop_ssl_protocol):  # type: ignore[misc]
        pass
    return uvloop.Loop, _WatchedUvloop


_UVLOOP = _uvloop_protocol_class()


class _Reset(asyncio.Protocol):
    """A connection over a limit: closed at once, before any TLS work, then reported."""

    def __init__(self, acceptor: TLSAcceptor, limit: str) -> None:
        self._acceptor = acceptor
        self._limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        abort = getattr(transport, "abort", None)
        if callable(abort):
            abort()  # nothing buffered to flush: close without waiting for the peer
        else:
            transport.close()
        self._acceptor._report_limit(format_peer(transport.get_extra_info("peername")),
                                     self._limit)


class TLSAcceptor:
    """Protocol factory for ``loop.create_server`` (without ``ssl=``): TLS per connection,
    certificate refusals reported to ``on_refused``, connections over ``limits`` reset and
    reported (aggregated) to ``on_limited``.

    Args:
        ssl_context: the listener's server context.
        app_factory: builds the application protocol of a connection.
        limits: the listener's connection budgets.
        on_refused: called on the loop when a client certificate fails the handshake.
        on_limited: called on the loop at most once per ``LIMIT_REPORT_WINDOW_SECONDS``
            while connections are being reset over a limit.
        handshake_timeout_seconds: a handshake not finished by then is aborted.
    """

    def __init__(self, ssl_context: ssl.SSLContext, app_factory: Callable[[], Any], *,
                 limits: ListenerLimits, on_refused: OnRefused, on_limited: OnLimited,
                 handshake_timeout_seconds: float = HANDSHAKE_TIMEOUT_SECONDS) -> None:
        self._ssl_context = ssl_context
        self._app_factory = app_factory
        self._limits = limits
        self._on_refused = on_refused
        self._on_limited = on_limited
        self._handshake_timeout = handshake_timeout_seconds
        self.open = 0  # connections accepted and not yet lost
        self.pending = 0  # of those, still in the handshake
        self.reset_total = 0  # connections reset over a limit, ever
        self._pending_by_source: dict[str, int] = {}  # at most max_pending_handshakes keys
        self._reset_unreported = 0
        self._reported_at = float("-inf")
        self._last_limit = ("unknown", "max_connections")  # (peer, limit) of the last reset
        self._flush: asyncio.TimerHandle | None = None

    def __call__(self) -> asyncio.BaseProtocol:
        if self.open >= self._limits.max_connections:
            return self._over_limit("max_connections")
        if self.pending >= self._limits.max_pending_handshakes:
            return self._over_limit("max_pending_handshakes")
        loop = asyncio.get_running_loop()
        protocol_class: type[Any] = _WatchedAsyncio
        if _UVLOOP is not None and isinstance(loop, _UVLOOP[0]):
            protocol_class = _UVLOOP[1]
        waiter: asyncio.Future[None] = loop.create_future()
        protocol = protocol_class(loop, self._app_factory(), self._ssl_context, waiter,
                                  server_side=True,
                                  ssl_handshake_timeout=self._handshake_timeout)
        protocol.acceptor = self
        self.open += 1
        self.pending += 1
        waiter.add_done_callback(lambda done: self._handshake_done(done, protocol))
        return protocol  # type: ignore[no-any-return]

    def _over_limit(self, which: str) -> asyncio.BaseProtocol:
        self.reset_total += 1
        self._reset_unreported += 1
        return _Reset(self, which)

    def _source_started(self, protocol: _Watched, host: str) -> bool:
        """Count a new handshake in its address's share; False when that share is full
        (the connection is then aborted and reported like any other reset)."""
        pending = self._pending_by_source.get(host, 0)
        if pending >= self._limits.max_pending_handshakes_per_source:
            self.reset_total += 1
            self._reset_unreported += 1
            self._report_limit(protocol.peer_address, "max_pending_handshakes_per_source")
            return False
        self._pending_by_source[host] = pending + 1
        protocol.source_host = host
        return True

    def _handshake_over(self, protocol: _Watched) -> None:
        """The handshake ended (finished, failed, timed out or the peer left): free its
        slots. Called from both ends that can see it first; counts only once."""
        if not protocol.handshaking:
            return
        protocol.handshaking = False
        self.pending -= 1
        host, protocol.source_host = protocol.source_host, None
        if host is not None:
            left = self._pending_by_source[host] - 1
            if left:
                self._pending_by_source[host] = left
            else:
                del self._pending_by_source[host]

    def _report_limit(self, peer: str, which: str) -> None:
        self._last_limit = (peer, which)
        now = time.monotonic()
        if now - self._reported_at < LIMIT_REPORT_WINDOW_SECONDS:
            # Reported at the end of the window, so a burst that stops is still counted.
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_later(
                    self._reported_at + LIMIT_REPORT_WINDOW_SECONDS - now, self._flush_report)
            return
        self._send_report()

    def _flush_report(self) -> None:
        self._flush = None
        if self._reset_unreported:
            self._send_report()

    def _send_report(self) -> None:
        peer, which = self._last_limit
        count, self._reset_unreported = self._reset_unreported, 0
        self._reported_at = time.monotonic()
        log.warning("tls listener over its connection limit; new connections are reset",
                    limit=which, reset=count, open=self.open, pending=self.pending)
        try:
            self._on_limited(peer, which, count)
        except Exception:
            log.exception("could not record a connection limit")

    def _handshake_done(self, waiter: asyncio.Future[None], protocol: _Watched) -> None:
        self._handshake_over(protocol)
        if waiter.cancelled():
            return
        exc = waiter.exception()  # retrieved here, so asyncio never warns about it
        if exc is None:
            return
        reason: str | None = None
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = exc.verify_message or str(exc)
        elif isinstance(exc, ssl.SSLError):
            # "…_ALERT_BAD_CERTIFICATE" and the like are alerts the *client* sent about
            # *our* certificate (RFC 8446 §6.2): its complaint, not a refusal of ours.
            name = (exc.reason or "").upper()
            if "CERTIFICATE" in name and "ALERT" not in name:
                reason = exc.reason
        if reason is None:
            log.debug("tls handshake failed", peer=protocol.peer_address,
                      error=type(exc).__name__)
            return
        log.info("tls client certificate refused", peer=protocol.peer_address, reason=reason)
        try:
            self._on_refused(protocol.peer_address, reason)
        except Exception:
            log.exception("could not record a refused client certificate")

    def _ended(self, protocol: _Watched) -> None:
        self.open -= 1
        self._handshake_over(protocol)  # lost before the waiter said anything


class GatedTLSSite(web.TCPSite):
    """``web.TCPSite`` whose TLS goes through a :class:`TLSAcceptor`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 ssl_context: ssl.SSLContext, on_refused: OnRefused,
                 limits: ListenerLimits, on_limited: OnLimited) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._gate_context = ssl_context
        self._on_refused = on_refused
        self._on_limited = on_limited
        self._limits = limits
        self.acceptor: TLSAcceptor | None = None

    async def start(self) -> None:
        # BaseSite.start registers the site; TCPSite.start would bind with ssl=, which is
        # exactly what this class replaces.
        await web.BaseSite.start(self)
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        self.acceptor = TLSAcceptor(self._gate_context, server, limits=self._limits,
                                    on_refused=self._on_refused, on_limited=self._on_limited)
        self._server = await asyncio.get_running_loop().create_server(
            self.acceptor, self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address)
