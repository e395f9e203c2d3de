"""A TLS listener for aiohttp that sees its own handshake failures.

When ``loop.create_server(ssl=…)`` refuses a client certificate (unknown CA, expired,
bad signature), asyncio and uvloop only log it at debug level and the application never
hears of it. Enrollment must audit such refusals (an IDevID from an unregistered OEM CA
is an attack-table case), so this site builds the per-connection TLS protocol itself —
the same ``asyncio.sslproto.SSLProtocol`` that ``create_server(ssl=…)`` uses — and
watches its handshake waiter. Successful connections reach aiohttp unchanged.

``loop.start_tls`` on an accepted connection is not an option: uvloop starts reading
right after ``connection_made``, so a fast client's ClientHello can arrive before
start_tls takes the stream over, and the handshake then stalls.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio.sslproto import SSLProtocol
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger("fleetward.tls")

HANDSHAKE_TIMEOUT_SECONDS = 10  # a device on a slow link finishes well within this
OnRefused = Callable[[str, str], None]  # (peer address, OpenSSL verify message)


class _WatchedTLSProtocol(SSLProtocol):
    """SSLProtocol that remembers its peer's address for the refusal report."""

    peer_address = "unknown"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer_address = str(peer[0])
        super().connection_made(transport)


def _watch(waiter: asyncio.Future[None], protocol: _WatchedTLSProtocol,
           on_refused: OnRefused) -> None:
    if waiter.cancelled():
        return
    exc = waiter.exception()  # retrieved here, so asyncio never warns about it
    if exc is None:
        return
    reason: str | None = None
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
    elif isinstance(exc, ssl.SSLError) and "CERTIFICATE" in (exc.reason or "").upper():
        reason = exc.reason
    if reason is None:
        log.debug("tls handshake failed", peer=protocol.peer_address,
                  error=type(exc).__name__)
        return
    log.info("tls client certificate refused", peer=protocol.peer_address, reason=reason)
    try:
        on_refused(protocol.peer_address, reason)
    except Exception:
        log.exception("could not record a refused client certificate")


class GatedTLSSite(web.TCPSite):
    """``web.TCPSite`` whose client-certificate refusals reach ``on_refused``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 ssl_context: ssl.SSLContext, on_refused: OnRefused) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._gate_context = ssl_context
        self._on_refused = on_refused

    async def start(self) -> None:
        # BaseSite.start registers the site; TCPSite.start would bind with ssl=, which is
        # exactly what this class replaces.
        await web.BaseSite.start(self)
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        loop = asyncio.get_running_loop()
        app_factory: Callable[[], Any] = server

        def protocol() -> asyncio.BaseProtocol:
            waiter: asyncio.Future[None] = loop.create_future()
            tls = _WatchedTLSProtocol(
                loop, app_factory(), self._gate_context, waiter, server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS)
            waiter.add_done_callback(lambda w: _watch(w, tls, self._on_refused))
            return tls

        self._server = await loop.create_server(protocol, self._host, self._port,
                                                backlog=self._backlog,
                                                reuse_address=self._reuse_address)
