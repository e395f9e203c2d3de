"""The agent's HTTPS channel: the device API on the device listener (:8443), mTLS or a
token in the ``Authorization`` header.

Requests go through the same transports as EST (``transport.py``): httpx with the key
file, or curl with OpenSSL's pkcs11 engine for a key on a token. With an access token
or a SAS token (``tokens.py``) every request carries ``Authorization`` (``DPoP <token>``
with a fresh ``DPoP`` proof for a key-bound token, ``Bearer <token>`` for a
certificate-bound one over mTLS, ``SharedAccessSignature …``), and a device without a
certificate talks server-authenticated TLS only. Each session opens
with ``GET /v1/devices/self`` (is this identity accepted?), then sends records as
``POST /v1/telemetry/<type>`` / ``POST /v1/events/<type>`` and long-polls
``GET /v1/commands?wait=<s>`` on a thread of its own.

The server explains every refusal as problem details (RFC 9457); the agent logs their
``detail`` and ``hint``, which are written for the device developer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from fleetward.agent.commands import BadCommand, parse_command
from fleetward.agent.connect import (
    ChannelRefused,
    CommandSink,
    Outbound,
    Outcome,
    ssl_error_text,
    tls_alert_refusal,
)
from fleetward.agent.errors import ServerUnreachable
from fleetward.agent.keystore import FileKeystore, Keystore, Pkcs11Keystore, pinned_ca_pem
from fleetward.agent.state import StateLayout, write_atomic
from fleetward.agent.telemetry import encode_json
from fleetward.agent.transport import (
    CurlTransport,
    HttpResponse,
    HttpxTransport,
    Transport,
    client_tls_context,
    openssl_engine_config,
)
from fleetward.errors import FleetwardError, InvalidInput

log = structlog.get_logger("fleetward.agent")

DEFAULT_POLL_WAIT_SECONDS = 20  # the server caps ?wait= at [device_api] long_poll_max_seconds
MAX_POLL_WAIT_SECONDS = 300
REQUEST_TIMEOUT_SECONDS = 30.0  # one request; a long poll gets its wait on top
POLL_RETRY_CAP_SECONDS = 60.0  # a poll the server keeps refusing is retried at most this slowly
# 408/425/429 and 5xx: the server cannot take it *now*; anything else 4xx is about the
# message itself (RFC 9110 §15.5) and sending it again would fail again.
_RETRY_LATER = {408, 425, 429}
JSON_HEADERS = {"Content-Type": "application/json",
                "Accept": "application/json, application/problem+json"}

TransportFactory = Callable[[float], Transport]
# The headers that authenticate one request (method, path): ``Credentials.http_headers``.
Authorize = Callable[[str, str], Mapping[str, str]]
# The server's problem type for a refused device or credential (edge/device_api.py): on
# any route it is about who is asking, never about the message.
DEVICE_REFUSED_TYPE = "device-refused"


@dataclass(frozen=True, slots=True)
class Problem:
    status: int
    title: str
    detail: str
    hint: str
    type: str = ""

    @property
    def refuses_device(self) -> bool:
        return self.type.rstrip("/").rsplit("/", 1)[-1] == DEVICE_REFUSED_TYPE


def problem_of(response: HttpResponse) -> Problem:
    """The problem details of an error response (RFC 9457 §3), or what we can say."""
    title = detail = hint = kind = ""
    try:
        body = json.loads(response.body)
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        title, detail, hint, kind = (str(body.get(k) or "")[:500]
                                     for k in ("title", "detail", "hint", "type"))
    if not detail:
        detail = title or f"HTTP {response.status}"
    return Problem(response.status, title, detail, hint, kind)


def https_transport_factory(layout: StateLayout, server_url: str, keystore: Keystore, *,
                            client_certificate: bool = True) -> TransportFactory:
    """Transports authenticating with the current certificate and key, as they are NOW
    (a file key is read into the TLS context once; a token key is named by its label),
    or with no client certificate at all (``client_certificate`` False: the requests
    carry a token; server-authenticated TLS against the pinned CAs).

    Raises:
        KeyUnavailable: the certificate or key cannot be loaded.
    """
    if not client_certificate:
        context = client_tls_context(cadata=pinned_ca_pem(layout))
        return lambda timeout: HttpxTransport(server_url, context, timeout)
    if isinstance(keystore, FileKeystore):
        context = client_tls_context(cadata=pinned_ca_pem(layout), cert_file=layout.cert,
                                     key_file=layout.key, password=keystore.passphrase())
        return lambda timeout: HttpxTransport(server_url, context, timeout)
    if isinstance(keystore, Pkcs11Keystore):
        module = keystore.config.keystore.module
        if module is None:
            raise InvalidInput("agent.toml names no PKCS#11 module")
        write_atomic(layout.openssl_conf, openssl_engine_config(module).encode(), 0o600)
        key_uri = keystore.key_uri()
        pin = keystore.pin().encode()
        return lambda timeout: CurlTransport(
            server_url, ca_file=layout.ca, cert_file=layout.cert, key_uri=key_uri, pin=pin,
            openssl_conf=layout.openssl_conf, timeout_seconds=timeout)
    raise InvalidInput(f"unsupported keystore {keystore.kind!r}")


def _refusal_from(exc: FleetwardError) -> ChannelRefused | None:
    text = ssl_error_text(exc) or exc.message
    if tls_alert_refusal(text):
        return ChannelRefused(f"the server refused the device certificate during the TLS "
                              f"handshake: {' '.join(text.split())[:300]}", reason=text[:300])
    return None


class HttpsSession:
    """The device API as one logical session (HTTP keep-alive underneath)."""

    channel = "https"

    def __init__(self, make_transport: TransportFactory, on_command: CommandSink, *,
                 poll_wait_seconds: int = DEFAULT_POLL_WAIT_SECONDS,
                 request_timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
                 poll_commands: bool = True, authorize: Authorize | None = None) -> None:
        if not 0 <= poll_wait_seconds <= MAX_POLL_WAIT_SECONDS:
            raise InvalidInput(f"the long-poll wait must be 0-{MAX_POLL_WAIT_SECONDS} s",
                               hint="e.g. --poll-wait 20")
        self._make_transport = make_transport
        self._on_command = on_command
        self._wait = poll_wait_seconds
        self._timeout = request_timeout_seconds
        self._poll_commands = poll_commands
        self._authorize = authorize
        self._transport: Transport | None = None
        self._poll_transport: Transport | None = None
        self._lost = threading.Event()
        self._closed = threading.Event()
        self._refusal: ChannelRefused | None = None
        self._poller: threading.Thread | None = None
        self.device: dict[str, Any] = {}

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def refusal(self) -> ChannelRefused | None:
        return self._refusal

    def _request(self, transport: Transport, method: str, path: str, *,
                 body: bytes | None = None, headers: Mapping[str, str]) -> HttpResponse:
        """One request, with the credential's headers when the session has one.

        Raises:
            FleetwardError: the transport failed, or no credential can be had
                (``ChannelRefused`` when the token endpoint refuses the device).
        """
        if self._authorize is not None:
            headers = {**headers, **self._authorize(method, path)}
        return transport.request(method, path, body=body, headers=headers)

    def open(self, stop: threading.Event | None = None) -> None:
        """Check that the server accepts this identity; start the command long-poll.

        Raises:
            ChannelRefused: 401/403 on ``/v1/devices/self``, a TLS alert against the
                device certificate, or a token endpoint that refuses the device.
            TrustBootstrapFailed: the server's certificate is not from the pinned CA.
            ServerUnreachable: anything else.
        """
        self._transport = self._make_transport(self._timeout)
        try:
            response = self._request(self._transport, "GET", "/v1/devices/self",
                                     headers={"Accept": JSON_HEADERS["Accept"]})
        except FleetwardError as exc:
            self.close()
            refusal = _refusal_from(exc)
            if refusal is not None:
                raise refusal from exc
            raise
        if response.status in (401, 403):
            self.close()
            problem = problem_of(response)
            raise ChannelRefused(f"the server refused this device (HTTP {response.status}): "
                                 f"{problem.detail}", code=response.status,
                                 reason=problem.detail, hint=problem.hint or None)
        if not 200 <= response.status < 300:
            self.close()
            problem = problem_of(response)
            raise ServerUnreachable(f"GET /v1/devices/self answered HTTP {response.status}: "
                                    f"{problem.detail}", hint=problem.hint or None)
        try:
            body = json.loads(response.body)
            self.device = body if isinstance(body, dict) else {}
        except (ValueError, UnicodeDecodeError):
            self.device = {}
        log.info("https session open", state=self.device.get("state"),
                 certificate_not_after=self.device.get("certificate_not_after"))
        if self._poll_commands:
            self._poller = threading.Thread(target=self._poll_loop, daemon=True,
                                            name="fleetward-agent-command-poll")
            self._poller.start()

    # --- send -------------------------------------------------------------------------------

    def send(self, messages: Sequence[Outbound], timeout_seconds: float) -> list[Outcome]:
        outcomes = [Outcome.UNSENT] * len(messages)
        transport = self._transport
        if transport is None:
            self._lost.set()
            return outcomes
        for index, message in enumerate(messages):
            if self.lost:
                break
            try:
                response = self._request(transport, "POST", message.path(),
                                         body=encode_json(message.body), headers=JSON_HEADERS)
            except FleetwardError as exc:
                self._fail(exc)
                break
            outcome = self._outcome(message, response)
            if outcome is Outcome.UNSENT:
                break
            outcomes[index] = outcome
        return outcomes

    def _outcome(self, message: Outbound, response: HttpResponse) -> Outcome:
        if 200 <= response.status < 300:
            return Outcome.DELIVERED
        problem = problem_of(response)
        if response.status == 401 or (response.status == 403 and problem.refuses_device):
            # Who is asking was refused (a credential expired or revoked, a device
            # disabled), not this message: it is sent again on the next session.
            self._refusal = ChannelRefused(
                f"the server refused this device (HTTP {response.status}): {problem.detail}",
                code=response.status, reason=problem.detail, hint=problem.hint or None)
            self._lost.set()
            return Outcome.UNSENT
        if response.status in _RETRY_LATER or response.status >= 500:
            log.warning("the server cannot take messages now; retrying later",
                        path=message.path(), status=response.status, detail=problem.detail,
                        hint=problem.hint or None,
                        retry_after=response.header("retry-after"))
            self._lost.set()
            return Outcome.UNSENT
        log.warning("the server refused a message", path=message.path(),
                    status=response.status, detail=problem.detail, hint=problem.hint or None)
        return Outcome.REJECTED

    def _fail(self, exc: FleetwardError) -> None:
        if self._closed.is_set():
            return
        refusal = exc if isinstance(exc, ChannelRefused) else _refusal_from(exc)
        if refusal is not None:
            self._refusal = refusal
        else:
            log.warning("https request failed", error=exc.message, hint=exc.hint)
        self._lost.set()

    # --- commands ------------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        failures = 0
        transport = self._poll_transport = self._make_transport(self._wait + self._timeout)
        try:
            while not self._closed.is_set() and not self._lost.is_set():
                try:
                    response = self._request(transport, "GET",
                                             f"/v1/commands?wait={self._wait}",
                                             headers={"Accept": JSON_HEADERS["Accept"]})
                except FleetwardError as exc:
                    self._fail(exc)
                    return
                if response.status == 200:
                    failures = 0
                    self._deliver(response)
                    continue
                if response.status == 204:
                    failures = 0
                    continue
                problem = problem_of(response)
                if response.status == 401 or (response.status == 403
                                               and problem.refuses_device):
                    self._refusal = ChannelRefused(
                        f"the server refused this device (HTTP {response.status}): "
                        f"{problem.detail}",
                        code=response.status, reason=problem.detail, hint=problem.hint or None)
                    self._lost.set()
                    return
                failures += 1
                # e.g. 403 while quarantined, 429, 503: keep telemetry going, poll slower.
                delay = min(POLL_RETRY_CAP_SECONDS, 2.0 ** min(failures, 6))
                log.warning("polling for commands failed", status=response.status,
                            detail=problem.detail, hint=problem.hint or None,
                            retry_in_s=delay)
                self._closed.wait(delay)
        except Exception as exc:  # the transport was closed under us by close()
            if not self._closed.is_set():
                log.error("command poll stopped", error=f"{type(exc).__name__}: {exc}")
                self._lost.set()
        finally:
            transport.close()

    def _deliver(self, response: HttpResponse) -> None:
        try:
            body = json.loads(response.body)
        except (ValueError, UnicodeDecodeError):
            log.warning("GET /v1/commands answered something that is not JSON")
            return
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            log.warning("GET /v1/commands answered without an items list")
            return
        for item in items:
            if not isinstance(item, dict):
                self._on_command(BadCommand("a command in the items list is not an object"))
                continue
            try:
                self._on_command(parse_command(item))
            except BadCommand as exc:
                self._on_command(exc)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._lost.set()
        if self._transport is not None:
            self._transport.close()


__all__ = ["DEFAULT_POLL_WAIT_SECONDS", "Authorize", "HttpsSession", "Problem",
           "TransportFactory", "https_transport_factory", "problem_of"]
