"""The agent's MQTT channel: paho-mqtt 2.x over TLS, authenticated by the device
certificate, an access token or a SAS token.

One :class:`MqttSession` is one network connection. paho's own reconnect is off
(``reconnect_on_failure=False``): the supervisor decides when and with which certificate
to connect again, with jittered backoff, and backs off much longer when the server
refuses this identity.

TLS: the pinned CA bundle of the state directory is the only trust anchor and the
server's name is checked (``client_tls_context``). Python's ``ssl`` needs the private
key in a file, so a PKCS#11 key cannot be a TLS client key here (``--https`` can: curl
with OpenSSL's pkcs11 engine) — but it can sign access-token proofs, which need no
client certificate.

Credentials other than the certificate (docs/credentials.md, "Using a token over MQTT"):

- access token, MQTT 5: enhanced authentication (§4.12) with method ``FW-TOKEN``: the
  token in CONNECT's Authentication Data; a key-bound token gets an AUTH 0x18 challenge
  that the session answers with a proof carrying ``nonce``; before the token is due the
  session re-authenticates (§4.12.1: AUTH 0x19 with a fresh token, the same challenge),
  so the connection outlives any one token. paho has no AUTH support: ``mqtt_auth``.
- access token, MQTT 3.1.1 (or a server without ``FW-TOKEN``): user name = device id,
  password = ``<token>`` or ``<token> <proof>``; the session reports ``credential_due``
  before the token expires and the supervisor reconnects with a new one.
- SAS: user name = device id, password = the SAS token; reconnect before ``se`` likewise.

DISCONNECT 0xA0 (Maximum connect time) from the server means the credential ran out:
``credential_expired`` is set and the supervisor reconnects at once with a new one; it
is not a refusal of the device.
"""

from __future__ import annotations

import math
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleetward.agent.commands import BadCommand, parse_command
from fleetward.agent.connect import (
    REFUSAL_CODES,
    RESULT,
    ChannelRefused,
    CommandSink,
    Outbound,
    Outcome,
    commands_filter,
    tls_alert_refusal,
)
from fleetward.agent.errors import ServerUnreachable, TrustBootstrapFailed
from fleetward.agent.keystore import FileKeystore, Keystore, pinned_ca_pem
from fleetward.agent.mqtt_auth import (
    CONTINUE_AUTHENTICATION,
    RE_AUTHENTICATE,
    SUCCESS,
    AuthClient,
)
from fleetward.agent.state import StateLayout, validate_mqtt_url
from fleetward.agent.telemetry import encode_json
from fleetward.agent.tokens import (
    TOKEN_AUTH_METHOD,
    AccessToken,
    Credentials,
    TokenProvider,
)
from fleetward.agent.transport import client_tls_context
from fleetward.clock import Clock, SystemClock
from fleetward.errors import FleetwardError, InvalidInput

log = structlog.get_logger("fleetward.agent")

MQTT_VERSIONS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
DEFAULT_KEEPALIVE_SECONDS = 60  # PINGREQ after a minute of silence (MQTT 5.0 §3.1.2.10)
MAX_KEEPALIVE_SECONDS = 65535  # the Keep Alive field is two bytes (§3.1.2.10)
# Unacknowledged QoS 1 PUBLISHes in flight; a server announces its Receive Maximum
# (MQTT 5.0 §3.2.2.3.3) and paho honours the lower of the two.
MAX_INFLIGHT_MESSAGES = 20
WAIT_SLICE_SECONDS = 0.05  # how often a blocked wait looks at the connection state
# Reason codes worth their own log line although they are not a refusal of the identity.
TAKEOVER = 0x8E  # Session taken over (MQTT 5.0 §3.14.2.1): another client used our id
BAD_AUTHENTICATION_METHOD = 0x8C  # CONNACK: the server does not know FW-TOKEN (§3.2.2.2)
# DISCONNECT: the token or SAS that authenticated the session expired (docs/credentials.md).
MAXIMUM_CONNECT_TIME = 0xA0
REAUTH_TIMEOUT_SECONDS = 30.0  # AUTH 0x19 sent, no AUTH 0x00 by then: try again
REAUTH_RETRY_SECONDS = (2.0, 30.0)  # after a failed re-authentication: first, cap


@dataclass(frozen=True, slots=True)
class MqttSettings:
    url: str  # mqtts://host[:port]
    version: str = "5"  # "5" | "3.1.1"
    qos: int = 1  # for telemetry and events; command results always go with QoS 1
    keepalive_seconds: int = DEFAULT_KEEPALIVE_SECONDS
    connect_timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        validate_mqtt_url(self.url)
        if self.version not in MQTT_VERSIONS:
            raise InvalidInput(f"unsupported MQTT version {self.version!r}",
                               hint="use --mqtt-version 5 or --mqtt-version 3.1.1")
        if self.qos not in (0, 1):
            # QoS 2 buys exactly-once at two extra round trips; the server announces
            # Maximum QoS 1 (MQTT 5.0 §3.2.2.3.4), so the agent never asks for it.
            raise InvalidInput(f"QoS {self.qos} is not supported",
                               hint="use --qos 1 (at least once, default) or --qos 0")
        if not 0 < self.keepalive_seconds <= MAX_KEEPALIVE_SECONDS:
            raise InvalidInput(f"keep-alive must be 1-{MAX_KEEPALIVE_SECONDS} seconds",
                               hint="e.g. --keepalive 60")

    @property
    def endpoint(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "", parts.port or 8883


class EnhancedAuthUnsupported(ServerUnreachable):
    """CONNACK 0x8C: the server does not do ``FW-TOKEN``; use the password instead."""


def mqtt_tls_context(layout: StateLayout, keystore: Keystore, *,
                     client_certificate: bool = True) -> ssl.SSLContext:
    """Client TLS for MQTT: the pinned CAs only, and the device certificate with its key
    file unless the session authenticates with a token or SAS (``client_certificate``
    False: server authentication only).

    Raises:
        InvalidInput: a client certificate is wanted and the key lives on a PKCS#11
            token (Python's ``ssl`` cannot use it).
        KeyUnavailable: the certificate or key cannot be loaded.
    """
    if not client_certificate:
        return client_tls_context(cadata=pinned_ca_pem(layout))
    if not isinstance(keystore, FileKeystore):
        raise InvalidInput(
            "MQTT cannot use a device key on a PKCS#11 token: Python's TLS (and so "
            "paho-mqtt) needs the private key in a file",
            hint="run with --https: the HTTPS channel uses the token through curl and "
                 "OpenSSL's pkcs11 engine")
    return client_tls_context(cadata=pinned_ca_pem(layout), cert_file=layout.cert,
                              key_file=layout.key, password=keystore.passphrase())


def _reason_string(properties: Properties | None) -> str:
    value = getattr(properties, "ReasonString", "") if properties is not None else ""
    return str(value)[:200]  # the server's text, bounded for the log


class MqttSession:
    """One MQTT connection as the device (client id = device id).

    Args:
        credentials: an access token or SAS provider; None: the client certificate in
            ``context`` is the credential.
        enhanced_auth: with a token on MQTT 5, use ``FW-TOKEN`` (and re-authenticate);
            False: the token goes in the password (a server without ``FW-TOKEN``).
        clock: "now" for the credential's refresh point.
    """

    channel = "mqtt"

    def __init__(self, device_id: str, settings: MqttSettings, context: ssl.SSLContext,
                 on_command: CommandSink, *, credentials: Credentials | None = None,
                 enhanced_auth: bool = True, clock: Clock | None = None) -> None:
        self._device_id = device_id
        self._settings = settings
        self._on_command = on_command
        self._v5 = settings.version == "5"
        self._credentials = credentials
        self._clock = clock or SystemClock()
        self._tokens = credentials if isinstance(credentials, TokenProvider) else None
        self._fw_token = self._tokens is not None and self._v5 and enhanced_auth
        host, port = settings.endpoint
        # The proof's htu: the listener as the agent connects to it (docs/credentials.md).
        self._proof_url = f"mqtts://{'[' + host + ']' if ':' in host else host}:{port}"
        self._token: AccessToken | None = None  # the token the connection holds now
        self._reauth_token: AccessToken | None = None  # the one a re-authentication offers
        self._reauth_done = threading.Event()
        self._refresh_at = math.inf  # password credentials: reconnect from then on
        self._credential_expired = False
        self._stopping = threading.Event()
        self._reauth_thread: threading.Thread | None = None
        self.reauthentications = 0  # successful AUTH 0x19 exchanges (tests, logs)
        # Clean session: commands wait in the server's database, not in an MQTT session,
        # and are delivered again after every (re)subscribe until answered.
        client = AuthClient(CallbackAPIVersion.VERSION2, client_id=device_id,
                            protocol=MQTT_VERSIONS[settings.version],
                            clean_session=None if self._v5 else True,
                            reconnect_on_failure=False)
        client.tls_set_context(context)
        client.max_inflight_messages_set(MAX_INFLIGHT_MESSAGES)
        client.connect_timeout = settings.connect_timeout_seconds
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_log = self._on_log
        client.on_auth = self._on_auth
        self._client = client
        self._connack = threading.Event()
        self._lost = threading.Event()
        self._connack_code: ReasonCode | None = None
        self._connack_reason = ""
        self._refusal: ChannelRefused | None = None
        self._acks: dict[int, tuple[ReasonCode, str]] = {}
        self._last_error = ""
        self._closed = False
        self._started = False
        self._prefix = f"devices/{device_id}/commands/"

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def refusal(self) -> ChannelRefused | None:
        return self._refusal

    @property
    def credential_expired(self) -> bool:
        """The server ended the session with DISCONNECT 0xA0: the credential ran out."""
        return self._credential_expired

    @property
    def credential_due(self) -> bool:
        """A password credential (3.1.1 token, SAS) is due for replacement: reconnect."""
        return self._clock.now().timestamp() >= self._refresh_at

    # --- connect ---------------------------------------------------------------------

    def _connect_properties(self) -> Properties | None:
        """CONNECT's properties; sets the user name and password for password credentials.

        Raises:
            ServerUnreachable, TokenEndpointRefused: no token can be had.
        """
        credentials = self._credentials
        if credentials is None:
            return None
        if self._fw_token and self._tokens is not None:
            token = self._token = self._tokens.token()
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.AuthenticationMethod = TOKEN_AUTH_METHOD
            props.AuthenticationData = token.value.encode("ascii")
            return props
        password = credentials.mqtt_password(self._proof_url)
        self._client.username_pw_set(password.username, password.password)
        self._refresh_at = password.refresh_at
        return None

    def open(self, stop: threading.Event | None = None) -> None:
        """Connect, wait for CONNACK, subscribe to this device's commands.

        Raises:
            ChannelRefused: the server refused this identity (CONNACK 0x86/0x87/0x8A,
                3.1.1 return codes 4/5, or a TLS alert against the certificate), or the
                token endpoint refused a token (``TokenEndpointRefused``).
            EnhancedAuthUnsupported: CONNACK 0x8C to ``FW-TOKEN``.
            TrustBootstrapFailed: the server's certificate is not from the pinned CA.
            ServerUnreachable: anything else (network, timeout, other CONNACK codes).
        """
        host, port = self._settings.endpoint
        properties = self._connect_properties()
        try:
            if self._v5:
                self._client.connect(host, port, self._settings.keepalive_seconds,
                                     clean_start=True, properties=properties)
            else:
                self._client.connect(host, port, self._settings.keepalive_seconds)
        except ssl.SSLCertVerificationError as exc:
            raise TrustBootstrapFailed(
                f"the MQTT server's certificate is not trusted: {exc.verify_message}",
                hint="the server at the MQTT URL does not hold a certificate from the pinned "
                     "CA, or its name differs from the URL's host") from exc
        except ssl.SSLError as exc:
            raise self._tls_failure(f"{exc.reason} {exc}") from exc
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, timeout
            raise ServerUnreachable(f"cannot reach the MQTT server {host}:{port}: {exc}",
                                    hint="check --mqtt-url and the network; the agent "
                                         "retries with backoff") from exc
        self._started = True
        self._client.loop_start()
        deadline = time.monotonic() + self._settings.connect_timeout_seconds
        while not self._connack.wait(WAIT_SLICE_SECONDS):
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                self.close()
                raise ServerUnreachable(
                    f"no CONNACK from {host}:{port} within "
                    f"{self._settings.connect_timeout_seconds:g} s")
        code = self._connack_code
        if code is None:  # the connection dropped before CONNACK
            self.close()
            if tls_alert_refusal(self._last_error):
                raise self._tls_failure(self._last_error)
            raise ServerUnreachable(f"the MQTT server closed the connection before CONNACK: "
                                    f"{self._last_error or 'no reason given'}")
        if code.is_failure:
            self.close()
            reason = f" ({self._connack_reason})" if self._connack_reason else ""
            if code.value == BAD_AUTHENTICATION_METHOD and self._fw_token:
                raise EnhancedAuthUnsupported(
                    f"the MQTT server does not support enhanced authentication with "
                    f"{TOKEN_AUTH_METHOD}{reason}",
                    hint="the agent sends the token as the password instead")
            if code.value in REFUSAL_CODES:
                raise ChannelRefused(
                    f"the MQTT server refused the connection: CONNACK 0x{code.value:02X} "
                    f"{code.getName()}{reason}", code=code.value, reason=self._connack_reason)
            raise ServerUnreachable(f"the MQTT server refused the connection: CONNACK "
                                    f"0x{code.value:02X} {code.getName()}{reason}")
        self._client.subscribe(commands_filter(self._device_id), qos=1)
        if self._fw_token:
            self._reauth_thread = threading.Thread(target=self._reauthenticate_forever,
                                                   name="fleetward-agent-reauth", daemon=True)
            self._reauth_thread.start()

    # --- FW-TOKEN: challenge and re-authentication (MQTT 5.0 §4.12) ---------------------

    def _on_auth(self, reason: int, method: str | None, data: bytes | None) -> None:
        """paho's network thread: an AUTH packet from the server."""
        if method != TOKEN_AUTH_METHOD:
            log.error("the MQTT server sent AUTH for another authentication method",
                      method=(method or "")[:40])
            self._client.disconnect()
            return
        if reason == SUCCESS:  # a re-authentication succeeded (§4.12.1)
            if self._reauth_token is not None:
                self._token = self._reauth_token
                self._reauth_token = None
            self._reauth_done.set()
            return
        if reason != CONTINUE_AUTHENTICATION or data is None:
            log.error("unexpected AUTH from the MQTT server", reason=f"0x{reason:02X}")
            self._client.disconnect()
            return
        # The challenge of step 2: answer with a proof that carries it as nonce, for the
        # token being authenticated (the CONNECT's, or the re-authentication's).
        token = self._reauth_token or self._token
        if token is None or self._tokens is None or token.proof_key is None:
            log.error("the MQTT server challenged a token that needs no proof")
            self._client.disconnect()
            return
        try:
            proof = self._tokens.proof(token, "CONNECT", self._proof_url, nonce=data)
        except Exception as exc:  # the key cannot sign (token removed, PIN changed)
            log.error("cannot answer the server's challenge", error=f"{type(exc).__name__}")
            self._client.disconnect()
            return
        self._client.send_auth(CONTINUE_AUTHENTICATION, TOKEN_AUTH_METHOD, proof.encode())

    def _reauthenticate_forever(self) -> None:
        """Re-authenticate with a fresh token at each token's refresh point, so the
        session never reaches the token's expiry (and DISCONNECT 0xA0)."""
        failures = 0
        retry_at = 0.0
        while not self._stopping.is_set() and not self.lost:
            token = self._token
            now = self._clock.now().timestamp()
            due = retry_at if failures else (token.refresh_at if token else now)
            if now < due:
                # Short slices: the clock is read again (suspend/resume, clock steps).
                self._stopping.wait(min(due - now, 1.0))
                continue
            try:
                self._reauthenticate()
                failures = 0
            except FleetwardError as exc:
                failures += 1
                first, cap = REAUTH_RETRY_SECONDS
                delay = min(cap, first * 2 ** (failures - 1))
                retry_at = self._clock.now().timestamp() + delay
                log.warning("re-authentication failed; retrying", error=exc.message,
                            hint=exc.hint, retry_in_s=delay,
                            token_expires_in_s=round(token.expires_at - now) if token else None)
            except Exception:
                log.exception("re-authentication failed unexpectedly")
                failures += 1
                retry_at = self._clock.now().timestamp() + REAUTH_RETRY_SECONDS[1]

    def _reauthenticate(self) -> None:
        """One AUTH 0x19 exchange with a fresh token.

        Raises:
            ServerUnreachable: no token, or no AUTH 0x00 in time.
        """
        if self._tokens is None:
            return
        fresh = self._tokens.token()  # past the refresh point: a new token
        if fresh is self._token:
            return  # (a clock step backwards) nothing new to offer yet
        self._reauth_done.clear()
        self._reauth_token = fresh
        rc = self._client.send_auth(RE_AUTHENTICATE, TOKEN_AUTH_METHOD,
                                    fresh.value.encode("ascii"))
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ServerUnreachable(f"cannot send AUTH: {mqtt.error_string(rc)}")
        deadline = time.monotonic() + REAUTH_TIMEOUT_SECONDS
        while not self._reauth_done.wait(WAIT_SLICE_SECONDS):
            if self.lost or self._stopping.is_set():
                return
            if time.monotonic() > deadline:
                self._reauth_token = None
                raise ServerUnreachable("the MQTT server did not confirm the "
                                        f"re-authentication within {REAUTH_TIMEOUT_SECONDS:g} s")
        self.reauthentications += 1
        log.info("mqtt session re-authenticated with a new access token",
                 expires_in_s=round(fresh.expires_at - self._clock.now().timestamp()))

    def _tls_failure(self, text: str) -> ChannelRefused | ServerUnreachable:
        detail = " ".join(text.split())[:300]
        if tls_alert_refusal(detail):
            return ChannelRefused(
                f"the MQTT server refused the device certificate during the TLS handshake: "
                f"{detail}", reason=detail)
        return ServerUnreachable(f"TLS with the MQTT server failed: {detail}")

    # --- paho callbacks (run on paho's network thread; they must not block) ------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        self._connack_code = reason_code
        self._connack_reason = _reason_string(properties)
        if not reason_code.is_failure:
            log.info("mqtt connected", url=self._settings.url, version=self._settings.version,
                     session_present=flags.session_present)
        self._connack.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode | None, properties: Properties | None) -> None:
        code = reason_code.value if reason_code is not None else 0
        reason = _reason_string(properties)
        from_server = flags.is_disconnect_packet_from_server
        if from_server and code in REFUSAL_CODES:
            self._refusal = ChannelRefused(
                f"the MQTT server ended the session: DISCONNECT 0x{code:02X} "
                f"{REFUSAL_CODES[code]}{f' ({reason})' if reason else ''}",
                code=code, reason=reason)
        elif from_server and code == MAXIMUM_CONNECT_TIME:
            # Nothing was refused: the credential's connect time is used up. Get a new one
            # and reconnect (docs/credentials.md, "Expiry").
            self._credential_expired = True
            log.info("the server ended the session: its credential expired; reconnecting "
                     "with a new one", reason=reason)
        elif from_server and code == TAKEOVER:
            log.error("another client connected with this device's id and took over the "
                      "session: a clone of this device may exist", reason=reason)
        elif not self._closed:
            log.warning("mqtt connection lost",
                        reason=reason_code.getName() if reason_code is not None else "",
                        detail=reason or self._last_error or None, from_server=from_server)
        self._lost.set()
        self._connack.set()  # wakes open() when the connection dies before CONNACK

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        self._acks[mid] = (reason_code, _reason_string(properties))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        for code in reason_codes:
            if code.is_failure:
                # 3.1.1 SUBACK 0x80 arrives as a failure code too (§3.9.3).
                log.error("the server refused the command subscription: commands will not "
                          "arrive over MQTT", topic=commands_filter(self._device_id),
                          code=f"0x{code.value:02X}", reason=_reason_string(properties),
                          hint="ask the operator to allow mqtt:subscribe and mqtt:receive on "
                               "devices/${device.id}/commands/#")
            else:
                log.info("subscribed to commands", topic=commands_filter(self._device_id))

    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        if not message.topic.startswith(self._prefix):
            log.warning("message on an unexpected topic ignored", topic=message.topic[:200])
            return
        try:
            self._on_command(parse_command(bytes(message.payload)))
        except BadCommand as exc:
            self._on_command(exc)

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        if level in (mqtt.MQTT_LOG_ERR, mqtt.MQTT_LOG_WARNING):
            self._last_error = text[:300]

    # --- send ----------------------------------------------------------------------------

    def send(self, messages: Sequence[Outbound], timeout_seconds: float) -> list[Outcome]:
        outcomes = [Outcome.UNSENT] * len(messages)
        sent: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        for index, message in enumerate(messages):
            if self.lost:
                break
            qos = 1 if message.kind == RESULT else self._settings.qos
            info = self._client.publish(message.topic(self._device_id), encode_json(message.body),
                                        qos=qos, properties=self._publish_properties())
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self._lost.set()
                break
            sent.append((index, info))
        deadline = time.monotonic() + timeout_seconds
        for index, info in sent:
            while not info.is_published() and not self.lost and time.monotonic() < deadline:
                info.wait_for_publish(WAIT_SLICE_SECONDS)
            if not info.is_published():
                # Unacknowledged: resent on the next session (at least once, duplicates
                # possible). A server that stops acknowledging is treated as gone.
                self._lost.set()
                break
            outcomes[index] = self._outcome(messages[index], info.mid)
        return outcomes

    def _publish_properties(self) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        # MQTT 5.0 §3.3.2.3.2 / §3.3.2.3.9: the payload is UTF-8 JSON.
        props.PayloadFormatIndicator = 1
        props.ContentType = "application/json"
        return props

    def _outcome(self, message: Outbound, mid: int) -> Outcome:
        ack = self._acks.pop(mid, None)
        if ack is None or not ack[0].is_failure:
            return Outcome.DELIVERED
        code, reason = ack
        # MQTT 5.0 §3.4.2.1: a PUBACK reason code >= 0x80 means the server refused it.
        log.warning("the server refused a message", topic=message.topic(self._device_id),
                    code=f"0x{code.value:02X}", reason=reason or code.getName())
        return Outcome.REJECTED

    def close(self) -> None:
        self._stopping.set()
        if self._closed:
            return
        self._closed = True
        if self._started:
            if not self.lost:
                # A normal DISCONNECT (reason 0x00): the server discards no will.
                self._client.disconnect()
            self._client.loop_stop()
        self._lost.set()


__all__ = ["MQTT_VERSIONS", "EnhancedAuthUnsupported", "MqttSession", "MqttSettings",
           "mqtt_tls_context"]
