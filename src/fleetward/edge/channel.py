"""The contract between the device listeners (MQTT, HTTPS) and the trust decisions.

A listener never decides on its own who a peer is or what it may do. On every new
connection it asks a :class:`DeviceGate` to *admit* the peer (certificate → device,
revocation, lifecycle state, policy), keeps the returned :class:`Admission` for the
life of the connection, and asks the admission's policy for every packet or request.
The gate owns the in-memory caches; nothing on this path runs SQL.

Live enforcement goes the other way: the gate tells a :class:`LiveConnections` registry
which devices must be disconnected, and each listener registers a closer per connection.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

# One authorization answer (allowed, reason, policy, statement). Defined by the policy
# engine, which may not import edge/ (ARCHITECTURE §3); re-exported here for listeners.
from fleetward.policy.engine import Decision as Decision


class Action(enum.StrEnum):
    """Policy actions (AWS-IoT-style). HTTP actions are ``http:<METHOD>``."""

    MQTT_CONNECT = "mqtt:connect"
    MQTT_PUBLISH = "mqtt:publish"
    MQTT_SUBSCRIBE = "mqtt:subscribe"
    MQTT_RECEIVE = "mqtt:receive"
    EST_REENROLL = "est:reenroll"
    OTA_DOWNLOAD = "ota:download"

    @staticmethod
    def http(method: str) -> str:
        return f"http:{method.upper()}"


class Refusal(enum.IntEnum):
    """Why a peer is refused, as MQTT 5 reason codes (MQTT 5.0 §2.4, Table 2-6).

    The HTTPS listener maps the same values to statuses (``http_status``) and the
    MQTT 3.1.1 listener to the nearest 3.1.1 behaviour (``v311_connack``).
    """

    NOT_AUTHORIZED = 0x87  # policy denies, or the device state forbids it
    BANNED = 0x8A  # certificate revoked / device compromised or retired
    BAD_CREDENTIALS = 0x86  # no certificate, unknown issuer, unknown device
    CLIENT_ID_NOT_VALID = 0x85  # client id differs from the certificate's device id
    BAD_AUTHENTICATION_METHOD = 0x8C  # an MQTT 5 enhanced authentication method we lack
    SERVER_UNAVAILABLE = 0x88  # the gate cannot decide (caches not loaded): fail closed

    @property
    def v311_connack(self) -> int:
        """MQTT 3.1.1 §3.2.2.3 CONNACK return codes: 2 identifier rejected, 3 server
        unavailable, 4 bad user name or password, 5 not authorized."""
        return {Refusal.CLIENT_ID_NOT_VALID: 2, Refusal.SERVER_UNAVAILABLE: 3,
                Refusal.BAD_CREDENTIALS: 4, Refusal.BAD_AUTHENTICATION_METHOD: 4}.get(self, 5)

    @property
    def http_status(self) -> int:
        return {Refusal.BAD_CREDENTIALS: 401, Refusal.BAD_AUTHENTICATION_METHOD: 401,
                Refusal.SERVER_UNAVAILABLE: 503}.get(self, 403)


class ChannelPolicy(Protocol):
    """A policy compiled for one connection: variables resolved, topic trie built.

    Implementations must be safe to call from the event loop and cost microseconds.
    """

    def decide(self, action: str, resource: str) -> Decision:
        """Decide ``action`` on ``resource`` (an MQTT topic, a topic filter for
        ``mqtt:subscribe``, a request path without the leading '/' for ``http:*``)."""
        ...


class AuthMethod(enum.StrEnum):
    """How the peer of a connection (or the sender of a request) authenticated."""

    CERTIFICATE = "certificate"  # mutual TLS with a certificate from our CA
    ACCESS_TOKEN = "access_token"  # an access token (and its proof, when bound)
    SAS = "sas"  # a SAS token signed with one of the device's symmetric keys


@dataclass(slots=True)
class Admission:
    """Who is on the other end of one connection. ``policy`` is replaced in place when
    the device's policies change, so listeners must read it on every decision."""

    device_id: str
    device_type: str
    owner: str
    serial: int  # certificate serial (0 when no certificate authenticated the peer)
    not_after_epoch: float  # certificate expiry, seconds since the epoch
    state: str  # lifecycle state at admission (LifecycleState value)
    quarantined: bool
    policy: ChannelPolicy
    firmware_version: str | None = None
    auth: AuthMethod = AuthMethod.CERTIFICATE
    # Access tokens: what the token's scopes open (every decision needs both this and
    # the policy); None when no token restricts the connection.
    scope: ChannelPolicy | None = None
    scopes: tuple[str, ...] = ()
    # When the token or SAS that authenticated the peer stops being valid: the MQTT
    # listener ends the session then (unless re-authenticated), HTTPS checks each request.
    credential_expires_at: float = math.inf
    token_jti: str | None = None
    token_binding: str | None = None  # x5t#S256 | jkt | none
    generation: int = 0  # the device's credential generation the token was issued under
    sas_key: tuple[str, int] | None = None  # SAS: (slot, version) of the key that signed

    def decide(self, action: str, resource: str) -> Decision:
        scope = self.scope
        if scope is not None:
            granted = scope.decide(action, resource)
            if not granted.allowed:
                return Decision(False, f"the access token's scope "
                                       f"({' '.join(self.scopes) or 'none'}) does not "
                                       f"cover {action} on '{resource[:200]}'")
        return self.policy.decide(action, resource)


@dataclass(frozen=True, slots=True)
class Refused:
    code: Refusal
    reason: str  # safe to send to the peer: no secrets, no internal detail


class DeviceGate(Protocol):
    """Admission control for device listeners; answers from memory only."""

    def admit(self, peer_certificate_der: bytes | None, *, channel: str,
              client_id: str | None = None, source: str = "") -> Admission | Refused:
        """Admit the peer of a new connection (``channel`` is "mqtt" or "https").

        ``client_id``, when given (MQTT), must equal the certificate's device id.
        A refusal is audited by the gate (throttled), so listeners need not.
        """
        ...

    def recheck(self, admission: Admission, *, channel: str = "mqtt") -> Admission | Refused:
        """Decide again, from the current caches, for a device acting while no longer
        connected (a delayed Will Message) or after a wait (a long-poll): revocation,
        expiry, lifecycle and policy."""
        ...


# --- messages and sinks -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceMessage:
    """An accepted telemetry record or event, on its way to the sinks."""

    device_id: str
    device_type: str
    owner: str
    kind: str  # "telemetry" | "event"
    message_type: str
    channel: str  # "mqtt" | "https"
    payload: Any  # decoded JSON (an object)
    received_at_epoch: float
    topic: str | None = None


class MessageSink(Protocol):
    async def submit(self, message: DeviceMessage) -> None:
        """Return once the message is durably accepted (QoS 1 PUBACK and HTTP 202
        wait for this); raise ``SinkUnavailable`` when it cannot be."""
        ...

    async def close(self) -> None: ...


# --- live connections -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Closer:
    """How to end one live connection. ``close(reason_code, reason)`` is called on the
    event loop thread and must return at once (it schedules the close). The gate swaps
    ``admission.policy`` in place when the device's policies change."""

    channel: str  # "mqtt" | "https"
    admission: Admission
    close: Callable[[int, str], None]
    # Called (on the loop) after the gate swapped ``admission.policy``: MQTT drops the
    # subscriptions the new policy no longer allows.
    policy_changed: Callable[[], None] | None = None

    @property
    def device_id(self) -> str:
        return self.admission.device_id

    @property
    def serial(self) -> int:
        return self.admission.serial


class LiveConnections:
    """Every live device connection on this node, by device id and by serial.

    Listeners register on admission and unregister on close; the gate calls
    :meth:`close_device` / :meth:`close_serial` when the control plane changes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_device: dict[str, set[int]] = {}
        self._closers: dict[int, Closer] = {}

    def register(self, closer: Closer) -> int:
        key = id(closer)
        with self._lock:
            self._closers[key] = closer
            self._by_device.setdefault(closer.device_id, set()).add(key)
        return key

    def unregister(self, key: int) -> None:
        with self._lock:
            closer = self._closers.pop(key, None)
            if closer is not None:
                keys = self._by_device.get(closer.device_id)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._by_device[closer.device_id]

    def for_device(self, device_id: str) -> list[Closer]:
        with self._lock:
            return [self._closers[k] for k in self._by_device.get(device_id, ())]

    def all(self) -> list[Closer]:
        with self._lock:
            return list(self._closers.values())

    def count(self, channel: str | None = None) -> int:
        with self._lock:
            return sum(1 for c in self._closers.values() if channel in (None, c.channel))

    def close_device(self, device_id: str, code: int, reason: str) -> int:
        closers = self.for_device(device_id)
        for closer in closers:
            closer.close(code, reason)
        return len(closers)

    def close_serials(self, serials: Iterable[int], code: int, reason: str) -> int:
        wanted = set(serials)
        closers = [c for c in self.all() if c.serial in wanted]
        for closer in closers:
            closer.close(code, reason)
        return len(closers)


def copy_credential(source: Admission, target: Admission) -> None:
    """Give ``target`` (a fresh decision for the same peer) the credential ``source``
    was admitted with: how, until when, what it may do and what would revoke it."""
    target.serial = source.serial
    target.not_after_epoch = source.not_after_epoch
    target.auth = source.auth
    target.scope = source.scope
    target.scopes = source.scopes
    target.credential_expires_at = source.credential_expires_at
    target.token_jti = source.token_jti
    target.token_binding = source.token_binding
    target.generation = source.generation
    target.sas_key = source.sas_key


def replace_policy(admission: Admission, policy: ChannelPolicy) -> Admission:
    """A copy with another policy (for tests and tools; live code mutates in place)."""
    return dataclasses.replace(admission, policy=policy)
