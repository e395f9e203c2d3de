"""The device HTTPS API on the device listener (:8443): telemetry, events, own status and
commands, for devices holding a certificate from our CA.

Admission is per *connection*: the first request on a TLS connection presents its client
certificate to the :class:`~fleetward.edge.channel.DeviceGate` (from memory, no SQL),
the admission is kept for the connection's life and a :class:`Closer` is registered in
:class:`LiveConnections`, so revoking the certificate or disabling the device closes a
keep-alive connection at once. Authorization is per *request*: every request is decided
by the admission's policy (``http:<METHOD>`` on the path without its leading '/'), read
afresh each time because the gate swaps it in place when policies change or the device
is quarantined.

Admission happens at the first request rather than in the TLS handshake so that a
refused device gets a problem+json reason (RFC 9457) it can act on instead of a bare
TLS alert; the listener's TLS layer has already verified the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web

from fleetward.config import DeviceApiConfig
from fleetward.edge.channel import (
    Action,
    Admission,
    AuthMethod,
    Closer,
    DeviceGate,
    LiveConnections,
    Refusal,
    Refused,
)
from fleetward.edge.credentials import HttpRefused, PresentedCredentials, request_target
from fleetward.errors import Forbidden, InvalidInput, PayloadTooLarge
from fleetward.model import format_serial
from fleetward.registry.device_commands import DeviceCommandService, command_json
from fleetward.web.problem import parse_json, problem_response, reject_unknown_fields
from fleetward.web.tls import peer_certificate_der
from fleetward.web.tls_gate import format_peer

log = structlog.get_logger("fleetward.device_api")

T = TypeVar("T")
# Closed connections leave the per-connection table within this long even if aiohttp
# never tells us (it has no per-connection close hook); bounds the table by live sockets.
CONNECTION_SWEEP_SECONDS = 1.0
# After close_notify (RFC 8446 §6.1) a peer that does not close its side is cut off this
# much later, so a refused device cannot hold the socket for asyncio's 30 s shutdown wait.
CLOSE_GRACE_SECONDS = 1.0
# Room for the {"type": …, "data": …} envelope around one message of max_message_bytes.
ENVELOPE_BYTES = 1024
_JSON_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json")
PROBLEM_BASE = "https://fleetward.dev/problems/"

_REFUSAL_HINTS = {
    Refusal.BAD_CREDENTIALS: "connect with the device certificate and key this server's CA "
                             "issued (e.g. curl --cert device.pem --key device.key "
                             "--cacert ca.pem); a device without one must enroll first "
                             "(EST /.well-known/est/simpleenroll)",
    Refusal.BANNED: "this certificate or device may no longer connect; re-enroll with a new "
                    "key if the device is still in service, or ask the operator",
    Refusal.NOT_AUTHORIZED: "the device's lifecycle state forbids this; ask the operator "
                            "to enable it (fleetward device enable ID)",
    Refusal.CLIENT_ID_NOT_VALID: "use the device id from the certificate",
    Refusal.SERVER_UNAVAILABLE: "the server is starting or cannot decide now; retry in a "
                                "few seconds",
}


TOKEN_HINT = ("get a new access token (POST /oauth2/token) and present it as the token "
              "type says: Bearer with its client certificate, or DPoP with a fresh proof; "
              "or sign a new SAS token (docs/credentials.md)")


class MessageIntake(Protocol):
    """Where accepted telemetry and events go (``fleetward.edge.intake.Intake``)."""

    async def accept_http(self, admission: Admission, kind: str, message_type: str,
                          data: Any) -> None:
        """Validate and hand one record to the sinks; return once durably accepted.

        Raises:
            FleetwardError: bad input (a 4xx problem) or sinks unavailable (503).
        """
        ...


@dataclass(frozen=True, slots=True)
class DeviceApi:
    """Everything the device routes need.

    ``executor`` runs their SQL (command reads and writes), never the event loop.
    """

    gate: DeviceGate
    live: LiveConnections
    intake: MessageIntake
    commands: DeviceCommandService
    config: DeviceApiConfig
    executor: Executor
    # Access tokens and SAS tokens in ``Authorization`` (None: certificates only).
    credentials: PresentedCredentials | None = None


@dataclass(slots=True)
class _Connection:
    transport: Any  # asyncio or uvloop transport: duck-typed (uvloop's is no Transport)
    admission: Admission
    live_key: int


class DeviceConnections:
    """Admissions of live device TLS connections, keyed by transport."""

    def __init__(self, api: DeviceApi) -> None:
        self.api = api
        # id(transport) -> entry; the entry holds the transport, so the id is not reused
        # while the entry exists.
        self._entries: dict[int, _Connection] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def admit(self, request: web.Request) -> Admission | Refused | HttpRefused:
        """The admission of ``request``: by the credential in its ``Authorization``
        header (decided per request: each request may carry another token), else by the
        connection's client certificate (asking the gate on first use)."""
        transport = request.transport
        if transport is None or transport.is_closing():
            return Refused(Refusal.NOT_AUTHORIZED, "the connection is closing")
        authorization = request.headers.getall("Authorization", [])
        credentials = self.api.credentials
        if authorization and credentials is not None:
            if len(authorization) != 1:
                return HttpRefused(Refused(Refusal.BAD_CREDENTIALS,
                                           "send one Authorization header"), "Bearer",
                                   "invalid_request")
            try:
                target = request_target(request)
            except ValueError:
                return HttpRefused(Refused(Refusal.BAD_CREDENTIALS,
                                           "the request has no usable Host header"),
                                   "Bearer", "invalid_request")
            return credentials.http(authorization[0], request.headers.getall("DPoP", []),
                                    method=request.method, target=target,
                                    peer_der=peer_certificate_der(transport),
                                    source=format_peer(transport.get_extra_info("peername")))
        entry = self._entries.get(id(transport))
        if entry is not None and entry.transport is transport:
            return entry.admission
        verdict = self.api.gate.admit(peer_certificate_der(transport), channel="https",
                                      source=format_peer(transport.get_extra_info("peername")))
        if isinstance(verdict, Refused):
            return verdict

        def close(code: int, reason: str) -> None:
            self._close(transport, code, reason)

        key = self.api.live.register(Closer("https", verdict, close))
        self._entries[id(transport)] = _Connection(transport, verdict, key)
        return verdict

    def _close(self, transport: Any, code: int, reason: str) -> None:
        """Closer: on the event loop; schedules the close and returns."""
        entry = self._entries.pop(id(transport), None)
        if entry is not None and entry.transport is transport:
            self.api.live.unregister(entry.live_key)
            log.info("device https connection closed by the server",
                     device_id=entry.admission.device_id, reason=reason,
                     reason_code=f"0x{code:02x}")
        try:
            transport.close()
            asyncio.get_running_loop().call_later(CLOSE_GRACE_SECONDS, _abort, transport)
        except RuntimeError:  # no running loop (shutdown): close() already ran or will
            pass

    def sweep(self) -> int:
        """Forget connections whose transport has closed; returns how many."""
        gone = [k for k, e in self._entries.items() if e.transport.is_closing()]
        for key in gone:
            entry = self._entries.pop(key)
            self.api.live.unregister(entry.live_key)
        return len(gone)

    async def start(self, app: web.Application) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self, app: web.Application) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for entry in list(self._entries.values()):
            self.api.live.unregister(entry.live_key)
        self._entries.clear()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(CONNECTION_SWEEP_SECONDS)
            try:
                self.sweep()
            except Exception:  # the sweeper must outlive any one failure
                log.exception("device connection sweep failed")


CONNECTIONS_KEY: web.AppKey[DeviceConnections] = web.AppKey("device_connections",
                                                             DeviceConnections)
DeviceHandler = Callable[[web.Request, DeviceApi, Admission], Awaitable[web.StreamResponse]]


def add_device_routes(app: web.Application, api: DeviceApi) -> None:
    """Mount the device API on the device listener's app (before it starts)."""
    connections = DeviceConnections(api)
    app[CONNECTIONS_KEY] = connections
    app.on_startup.append(connections.start)
    app.on_cleanup.append(connections.stop)
    routes: list[tuple[str, str, DeviceHandler]] = [
        ("POST", "/v1/telemetry", partial(post_message, "telemetry")),
        ("POST", "/v1/telemetry/{message_type}", partial(post_message, "telemetry")),
        ("POST", "/v1/events", partial(post_message, "event")),
        ("POST", "/v1/events/{message_type}", partial(post_message, "event")),
        ("GET", "/v1/devices/self", get_self),
        ("GET", "/v1/commands", get_commands),
        ("POST", "/v1/commands/{command_id}/result", post_result),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, _guarded(api, connections, handler))


def _guarded(api: DeviceApi, connections: DeviceConnections,
             handler: DeviceHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        verdict = connections.admit(request)
        if isinstance(verdict, HttpRefused):
            # RFC 6750 §3.1: a token that is invalid, expired or revoked is 401
            # invalid_token with a challenge (clients read it as "get a new token"), whatever
            # the reason code (0x8a revoked, 0x87 device state) says in the body.
            refused = verdict.refused
            unavailable = refused.code is Refusal.SERVER_UNAVAILABLE
            response = _refusal(request, refused, TOKEN_HINT if (
                refused.code is Refusal.BAD_CREDENTIALS) else None,
                status=None if unavailable else 401)
            if not unavailable:
                response.headers["WWW-Authenticate"] = verdict.challenge
            return response
        if isinstance(verdict, Refused):
            return _refusal(request, verdict)
        resource = request.path.lstrip("/")
        if verdict.scope is not None:
            scoped = verdict.scope.decide(Action.http(request.method), resource)
            if not scoped.allowed:
                return _insufficient_scope(request, verdict)
        # admission.policy is swapped in place by the gate: read it afresh here. (The
        # token scope, the other half of Admission.decide, was decided just above.)
        decision = verdict.policy.decide(Action.http(request.method), resource)
        if not decision.allowed:
            hint = ("a quarantined device may only read its own status "
                    "(GET /v1/devices/self), re-enroll and download firmware"
                    if verdict.quarantined else
                    "ask the operator to allow this route in the device's policy "
                    "(fleetward policy test ID http:" + request.method.upper() + " "
                    + resource[:200] + ")")
            # The same problem type as every other policy denial (per message type,
            # command fetch, EST re-enrollment): one cause, one type for the device.
            raise Forbidden(decision.reason, hint=hint)
        return await handler(request, api, verdict)
    return handle


def _insufficient_scope(request: web.Request, admission: Admission) -> web.Response:
    """RFC 6750 §3.1: the token is fine, its scopes do not reach this route."""
    scheme = "DPoP" if admission.token_binding == "jkt" else "Bearer"
    response = problem_response(403, {
        "type": PROBLEM_BASE + "insufficient-scope", "title": "Insufficient scope",
        "status": 403,
        "detail": f"the access token's scopes ({' '.join(admission.scopes) or 'none'}) do "
                  f"not cover {request.method} {request.path[:200]}",
        "hint": "request a token with the scope this route needs (docs/credentials.md, "
                "Scopes)", "instance": request.path})
    response.headers["WWW-Authenticate"] = f'{scheme} error="insufficient_scope"'
    return response


def _refusal(request: web.Request, refused: Refused, hint: str | None = None,
             status: int | None = None) -> web.Response:
    status = status or refused.code.http_status
    # No WWW-Authenticate on 401: the credential is a TLS client certificate, for which
    # no HTTP authentication scheme exists (RFC 9110 §11.6.1 asks for one only when the
    # client can answer a challenge in HTTP).
    response = problem_response(status, {
        "type": PROBLEM_BASE + "device-refused", "title": "Device refused",
        "status": status, "detail": refused.reason,
        "hint": hint or _REFUSAL_HINTS.get(refused.code, "ask the operator"),
        "reason_code": f"0x{int(refused.code):02x}", "instance": request.path})
    if status == 503:
        response.headers["Retry-After"] = "5"
    return response


# --- handlers -----------------------------------------------------------------------------


async def post_message(kind: str, request: web.Request, api: DeviceApi,
                       admission: Admission) -> web.Response:
    """POST /v1/{telemetry,events}[/{message_type}]: 202 once the sinks accepted it."""
    body = await _json_body(request, api.config.max_message_bytes + ENVELOPE_BYTES)
    message_type = request.match_info.get("message_type")
    base = "/v1/telemetry" if kind == "telemetry" else "/v1/events"
    if message_type is None:
        if not isinstance(body, dict):
            raise InvalidInput("the body must be a JSON object",
                               hint=f'e.g. POST {base} '
                                    '{"type": "reading", "data": {"t": 21.5}}')
        reject_unknown_fields(body, {"type", "data"})
        message_type = body.get("type")
        if not isinstance(message_type, str) or not message_type:
            raise InvalidInput("missing or empty field 'type' (the message type)",
                               hint=f'add "type": "reading", or POST the data alone to '
                                    f'{base}/<type>')
        if "data" not in body:
            raise InvalidInput("missing field 'data'",
                               hint=f'e.g. {{"type": "{message_type[:40]}", "data": {{}}}}')
        data = body["data"]
        # A policy may allow or deny per message type through the path form
        # (v1/telemetry/<type>); the envelope form must not be a way around it.
        typed = f"{base.lstrip('/')}/{message_type}"
        decision = admission.decide(Action.http(request.method), typed)
        if not decision.allowed:
            raise Forbidden(decision.reason,
                            hint=f"the policy decides on {typed!r} for this message type; "
                                 "ask the operator to allow it")
    else:
        data = body
    if not isinstance(data, dict):
        raise InvalidInput(f"the {kind} data must be a JSON object",
                           hint='e.g. {"t": 21.5}; wrap a bare value in an object')
    await api.intake.accept_http(admission, kind, message_type, data)
    return web.json_response({"accepted": True}, status=202)


async def get_self(request: web.Request, api: DeviceApi,
                   admission: Admission) -> web.Response:
    """GET /v1/devices/self: who the server thinks this device is (from memory)."""
    certificate = ({"serial": format_serial(admission.serial),
                    "not_after": _epoch_iso(admission.not_after_epoch)}
                   if admission.serial else None)
    body: dict[str, Any] = {
        "id": admission.device_id, "type": admission.device_type, "owner": admission.owner,
        "state": admission.state, "quarantined": admission.quarantined,
        "firmware_version": admission.firmware_version, "certificate": certificate,
        "authenticated_by": admission.auth.value}
    if admission.auth is not AuthMethod.CERTIFICATE:
        body["credential_expires_at"] = _epoch_iso(admission.credential_expires_at)
    if admission.auth is AuthMethod.ACCESS_TOKEN:
        body["scopes"] = list(admission.scopes)
    return web.json_response(body)


async def get_commands(request: web.Request, api: DeviceApi,
                       admission: Admission) -> web.Response:
    """GET /v1/commands?wait=N: commands due for this device, waiting up to N seconds."""
    wait = _wait_seconds(request, api.config.long_poll_max_seconds)
    # The wait re-reads the database on the command service's read pool, never on the
    # node's single writer thread (``api.executor``), which must stay free for writes.
    items = await api.commands.wait_for_commands(admission.device_id, wait)
    # The control plane may have acted while we waited (quarantine, revocation, a policy
    # change, the connection closed): decide again before handing anything out.
    transport = request.transport
    if transport is None or transport.is_closing():
        return web.json_response({"items": []})
    if admission.auth is not AuthMethod.CERTIFICATE:
        # Not registered as a live connection (nothing swaps its policy in place): ask
        # the gate whether the token or SAS still stands (revoked, expired, device
        # disabled while we waited) and decide with the policy as it is now.
        current = api.gate.recheck(admission, channel="https")
        if isinstance(current, Refused):
            raise Forbidden(current.reason, hint="get a new access token")
        admission = current
    decision = admission.decide(Action.http(request.method), "v1/commands")
    if not decision.allowed:
        raise Forbidden(decision.reason, hint="this device may no longer fetch commands")
    if items:
        await _run(api, api.commands.mark_delivered, [item["id"] for item in items])
    return web.json_response({"items": items})


async def post_result(request: web.Request, api: DeviceApi,
                      admission: Admission) -> web.Response:
    """POST /v1/commands/{id}/result: the device's one answer to a command."""
    body = await _json_body(request, api.config.max_message_bytes + ENVELOPE_BYTES)
    example = '{"status": "succeeded", "result": {"ok": true}}'
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", hint=f"e.g. {example}")
    reject_unknown_fields(body, {"status", "result"})
    status = body.get("status")
    if not isinstance(status, str):
        raise InvalidInput("missing field 'status' ('succeeded' or 'failed')",
                           hint=f"e.g. {example}")
    row = await _run(api, api.commands.complete, admission.device_id,
                     request.match_info["command_id"], status, body.get("result", {}))
    answer = command_json(row)
    return web.json_response({"id": answer["id"], "status": answer["status"],
                              "completed_at": answer["completed_at"]})


# --- helpers ------------------------------------------------------------------------------


async def _run(api: DeviceApi, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(api.executor, partial(fn, *args))


async def _json_body(request: web.Request, limit: int) -> Any:
    """The request's JSON body, at most ``limit`` bytes.

    Raises:
        InvalidInput: not JSON, or not labelled as JSON.
        PayloadTooLarge: above ``limit``.
    """
    if not _JSON_TYPE.fullmatch(request.content_type or ""):
        raise InvalidInput(f"expected Content-Type application/json, got "
                           f"{request.content_type or 'nothing'}",
                           hint="send -H 'Content-Type: application/json' with a JSON body")
    too_large = PayloadTooLarge(f"the body is larger than {limit} bytes",
                                hint="send one record per request, at most "
                                     f"{limit - ENVELOPE_BYTES} bytes of JSON data")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    raw = await request.read()  # aiohttp's client_max_size bounds chunked bodies
    if len(raw) > limit:
        raise too_large
    return parse_json(raw)


def _wait_seconds(request: web.Request, maximum: int) -> int:
    raw = request.query.get("wait")
    if raw is None or raw == "":
        return 0
    if not raw.isascii() or not raw.isdigit():
        raise InvalidInput(f"wait must be a whole number of seconds, not {raw[:20]!r}",
                           hint=f"e.g. GET /v1/commands?wait={maximum} (0 answers at once)")
    # Longer waits are shortened, not refused: the server decides how long it holds a
    # request (RFC 6202 §5.5), and a device built for another server's limit keeps working.
    return min(int(raw), maximum) if len(raw) <= 9 else maximum


def _abort(transport: Any) -> None:
    # Already gone (the peer answered close_notify): nothing left to cut off.
    with contextlib.suppress(Exception):
        transport.abort()


def _epoch_iso(epoch: float) -> str | None:
    if epoch != epoch or epoch in (float("inf"), float("-inf")):
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")


__all__ = ["CONNECTIONS_KEY", "DeviceApi", "DeviceConnections", "MessageIntake",
           "add_device_routes"]
