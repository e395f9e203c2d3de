"""The trust gate: who a device listener's peer is and whether it may be here, from
memory only, and the live enforcement of every control-plane change.

``admit`` runs on the event loop for every new device connection. OpenSSL has verified
the client certificate's chain and validity by then; the gate checks that our issuing
CA issued it (the device listener also trusts OEM CAs for enrollment), that its serial
is not revoked, that the device exists in a state that may connect, and — for MQTT —
that the client id is the device id and policy allows ``mqtt:connect``. It then
compiles the device's policies once for the connection.

The caches are filled by ``load`` and kept current by ``poll`` (both blocking, run on a
worker thread), which read the audit log as a change feed (store/channel.py). ``apply``
(on the loop) installs what ``poll`` read and acts on live connections: a revoked
certificate or a device that may no longer connect is disconnected (MQTT 5 DISCONNECT
0x98, administrative action), a policy change is swapped into live admissions.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fleetward.clock import Clock
from fleetward.config import ChannelConfig
from fleetward.crypto.jose import certificate_thumbprint
from fleetward.crypto.sas import SasRefused, SharedAccessSignature, check_sas
from fleetward.edge.channel import (
    Action,
    Admission,
    AuthMethod,
    ChannelPolicy,
    LiveConnections,
    Refusal,
    Refused,
    copy_credential,
)
from fleetward.edge.hooks import Throttle
from fleetward.model import AuditEvent, Device, DeviceType, LifecycleState, format_serial
from fleetward.store import Database
from fleetward.store import channel as channel_rows
from fleetward.store import revoked_tokens as revoked_rows
from fleetward.tokens.access import AccessToken
from fleetward.tokens.credentials import DeviceSecrets as DeviceSecrets
from fleetward.tokens.scopes import RECOVERY_SCOPES, compile_scope

log = structlog.get_logger("fleetward.gate")

DEVICE_URI_PREFIX = "urn:fleetward:device:"
# Parsed and issuer-verified certificates, by DER digest: a reconnecting device skips
# the ECDSA verification. Bounded: an attacker can only evict, never grow it.
VERIFIED_CERT_CACHE_ENTRIES = 10_000
EXPIRY_CHECK_SECONDS = 5.0  # live connections outliving their certificate are closed

# Audit actions whose rows mean "reload this device" (target "device:<id>").
# Credential changes (target "device:<id>") reload the device and its symmetric keys.
CREDENTIAL_ACTIONS = frozenset({"credential.added", "credential.rotated",
                                "credential.revoked", "access_token.device_revoked"})
DEVICE_ACTIONS = frozenset({
    "device.created", "device.state_changed", "certificate.revoked",
    "enroll.device_registered", "device.firmware_reported"}) | CREDENTIAL_ACTIONS
POLICY_ACTIONS = frozenset({"policy.put", "policy.deleted", "policy.attached",
                            "policy.detached"})
TYPE_ACTIONS = frozenset({"device_type.created", "device_type.updated"})
TOKEN_REVOKED = "access_token.revoked"  # target "access_token:<jti>"
TOKEN_KEY_ACTIONS = frozenset({"token_key.rotated"})
WATCHED_ACTIONS = (DEVICE_ACTIONS | POLICY_ACTIONS | TYPE_ACTIONS | TOKEN_KEY_ACTIONS
                   | {TOKEN_REVOKED})

ADMIN_CLOSE = 0x98  # MQTT 5.0 §2.4 reason code: administrative action
# A refused MQTT client id is echoed in the CONNACK Reason String and the audit row; it
# is client-controlled text (up to 65535 bytes, MQTT 5.0 §1.5.4), so only this much of
# it, with anything unprintable escaped.
MAX_ECHOED_CLIENT_ID_CHARS = 64


class LocalChanges:
    """Runs a poll as soon as *this* node commits a watched change, on the committing
    thread, so the change is scheduled on the loop before the request that made it
    returns (an admin call that revokes, then a device that reconnects, cannot race).
    Other nodes' changes arrive with the next timed poll.

    ``noted`` runs inside the transaction (AuditLog.on_append), ``committed`` after it
    (Database.on_commit), both on the committing thread: a flag per thread links them,
    so a rolled-back change wakes nobody.
    """

    def __init__(self) -> None:
        self._pending = threading.local()
        self._wake: Callable[[], None] | None = None

    def bind(self, wake: Callable[[], None] | None) -> None:
        self._wake = wake

    def noted(self, action: str) -> None:
        if action in WATCHED_ACTIONS:
            self._pending.flag = True

    def committed(self) -> None:
        if getattr(self._pending, "flag", False):
            self._pending.flag = False
            if self._wake is not None:
                self._wake()


class SecretsLoader(Protocol):
    """Reads devices' symmetric keys, decrypted (tokens/credentials.py)."""

    def load_all(self, conn: Any) -> dict[str, DeviceSecrets]: ...

    def load_device(self, conn: Any, device_id: str) -> DeviceSecrets | None: ...


class PolicyCompiler(Protocol):
    """How the gate gets policies: a snapshot read (SQL, off the loop) and a
    per-connection compile (on the loop, microseconds per statement)."""

    def snapshot(self) -> Any: ...

    def compile(self, snapshot: Any, device: Device, serial: int) -> ChannelPolicy:
        """The device's effective policy; the quarantine policy when it is quarantined."""
        ...


@dataclass(frozen=True, slots=True)
class VerifiedCertificate:
    serial: int
    device_id: str
    not_before_epoch: float
    not_after_epoch: float


@dataclass(slots=True)
class CacheUpdate:
    """What one ``poll`` read; installed by ``apply`` on the loop thread."""

    devices: dict[str, Device | None] = field(default_factory=dict)
    revoked: set[int] = field(default_factory=set)
    policy_snapshot: Any = None
    policy_changed: bool = False
    types: list[DeviceType] | None = None
    secrets: dict[str, DeviceSecrets | None] = field(default_factory=dict)
    revoked_tokens: dict[str, float] = field(default_factory=dict)  # jti -> forget after

    @property
    def empty(self) -> bool:
        return not (self.devices or self.revoked or self.policy_changed or self.types
                    or self.revoked_tokens)


class TrustGate:
    """Implements ``fleetward.edge.channel.DeviceGate``."""

    def __init__(self, db: Database, issuing_certificates: Sequence[x509.Certificate],
                 policies: PolicyCompiler, live: LiveConnections, config: ChannelConfig,
                 clock: Clock, audit_refusal: Callable[[AuditEvent], None], *,
                 secrets: SecretsLoader | None = None,
                 token_keys_changed: Callable[[], None] | None = None,
                 max_sas_validity_seconds: int = 86400) -> None:
        self._db = db
        self._issuers = list(issuing_certificates)
        self._policies = policies
        self.live = live
        self._config = config
        self._clock = clock
        self._audit_refusal = audit_refusal
        self._devices: dict[str, Device] = {}
        self._types: dict[str, DeviceType] = {}
        self._revoked: set[int] = set()
        self._policy_snapshot: Any = None
        self._verified: OrderedDict[bytes, VerifiedCertificate] = OrderedDict()
        self._verified_lock = threading.Lock()
        self._refusal_throttle = Throttle(config.refusal_audit_window_seconds)
        self._last_seq = 0
        self._poll_lock = threading.Lock()
        self._next_expiry_check = 0.0
        self._secrets_loader = secrets
        self._secrets: dict[str, DeviceSecrets] = {}
        self._revoked_tokens: dict[str, float] = {}
        self._token_keys_changed = token_keys_changed
        self._max_sas_validity = max_sas_validity_seconds
        self.loaded = False

    # --- cache fill (worker thread) ---------------------------------------------------

    def load(self) -> None:
        """Read everything the gate needs. The change-feed position is read *first*, so
        a change committed while loading is replayed by the next poll (reloads are
        idempotent)."""
        with self._db.read() as conn:
            last_seq = channel_rows.last_audit_seq(conn)
            devices = {d.id: d for d in channel_rows.all_devices(conn)}
            revoked = channel_rows.revoked_serials(conn, self._clock.now())
            types = {t.name: t for t in channel_rows.device_types(conn)}
            revoked_tokens = revoked_rows.live(conn, self._clock.now())
            secrets = (self._secrets_loader.load_all(conn)
                       if self._secrets_loader is not None else {})
        snapshot = self._policies.snapshot()
        self._devices, self._revoked, self._types = devices, revoked, types
        self._secrets, self._revoked_tokens = secrets, revoked_tokens
        self._policy_snapshot = snapshot
        self._last_seq = last_seq
        self.loaded = True
        log.info("trust caches loaded", devices=len(devices), revoked=len(revoked),
                 revoked_tokens=len(revoked_tokens), symmetric_keys=len(secrets),
                 change_feed_seq=last_seq)

    def poll(self) -> CacheUpdate:
        """Read control-plane changes since the last poll (blocking; worker thread)."""
        with self._poll_lock:
            return self._poll()

    def poll_and_schedule(self, schedule: Callable[[CacheUpdate], None]) -> None:
        """``poll`` and hand a non-empty result to ``schedule`` (which queues ``apply``
        on the loop) while still holding the lock: polls may run on several threads
        (the watcher's, and the committing thread of this node's own changes), and
        their updates must be applied in the order they were read, or an older device
        row could overwrite a newer one."""
        with self._poll_lock:
            update = self._poll()
            if not update.empty:
                schedule(update)

    def _poll(self) -> CacheUpdate:
        update = CacheUpdate()
        last = self._last_seq
        more = True
        with self._db.read() as conn:
            while more:  # read the whole backlog: nothing may wait for the next poll
                changes, last, more = channel_rows.changes_since(conn, last, WATCHED_ACTIONS)
                for change in changes:
                    if (change.action in DEVICE_ACTIONS
                            and change.target.startswith("device:")):
                        device_id = change.target.removeprefix("device:")
                        if device_id not in update.devices:
                            update.devices[device_id] = channel_rows.device(conn, device_id)
                            update.revoked |= channel_rows.device_revoked_serials(
                                conn, device_id)
                            if self._secrets_loader is not None:
                                update.secrets[device_id] = self._secrets_loader.load_device(
                                    conn, device_id)
                    elif change.action in TYPE_ACTIONS:
                        update.types = channel_rows.device_types(conn)
                    elif change.action in POLICY_ACTIONS:
                        update.policy_changed = True
                    elif change.action == TOKEN_REVOKED:
                        jti = change.target.removeprefix("access_token:")
                        forget = revoked_rows.forget_after(conn, jti)
                        if forget is not None:
                            update.revoked_tokens[jti] = forget
                    elif change.action in TOKEN_KEY_ACTIONS and self._token_keys_changed:
                        try:
                            self._token_keys_changed()
                        except Exception:
                            # A key this node cannot open must never stop the feed:
                            # revocations behind it would not reach this node (fail open).
                            log.exception("reloading the token signing keys failed")
        if update.policy_changed:
            update.policy_snapshot = self._policies.snapshot()
        self._last_seq = last
        return update

    # --- cache install + live enforcement (event loop) ----------------------------------

    def apply(self, update: CacheUpdate) -> int:
        """Install ``update`` and enforce it on live connections; returns how many
        connections were closed."""
        closed = 0
        if update.types is not None:
            self._types = {t.name: t for t in update.types}
        if update.policy_changed:
            self._policy_snapshot = update.policy_snapshot
        new_revocations = update.revoked - self._revoked
        self._revoked |= update.revoked
        if new_revocations:
            closed += self.live.close_serials(new_revocations, ADMIN_CLOSE,
                                              "certificate revoked")
        if update.revoked_tokens:
            self._revoked_tokens.update(update.revoked_tokens)
            self._forget_revoked_tokens()
            for closer in self.live.all():
                if closer.admission.token_jti in update.revoked_tokens:
                    closer.close(ADMIN_CLOSE, "access token revoked")
                    closed += 1
        for device_id, device in update.devices.items():
            if device is None:
                self._devices.pop(device_id, None)
            else:
                self._devices[device_id] = device
        for device_id, secrets in update.secrets.items():
            if secrets is None:
                self._secrets.pop(device_id, None)
            else:
                self._secrets[device_id] = secrets
        touched = set(update.devices) if not update.policy_changed else None
        for closer in self.live.all():
            if touched is not None and closer.device_id not in touched:
                continue
            verdict = self._decide(closer.admission.serial, closer.device_id, closer.channel,
                                   closer.device_id if closer.channel == "mqtt" else None)
            if isinstance(verdict, Admission):
                stale = self._credential_stale(closer.admission)
                if stale is not None:
                    verdict = Refused(Refusal.BANNED, stale)
            if isinstance(verdict, Refused):
                closer.close(ADMIN_CLOSE, verdict.reason)
                closed += 1
            else:
                admission = closer.admission
                admission.policy = verdict.policy
                admission.state = verdict.state
                admission.quarantined = verdict.quarantined
                admission.firmware_version = verdict.firmware_version
                if closer.policy_changed is not None:
                    closer.policy_changed()
        if closed:
            log.info("live connections closed by control-plane change", count=closed)
        return closed

    def close_expired(self) -> int:
        """Close live connections whose certificate has expired since they connected."""
        now = self._clock.now().timestamp()
        if now < self._next_expiry_check:
            return 0
        self._next_expiry_check = now + EXPIRY_CHECK_SECONDS
        expired = [c for c in self.live.all() if c.admission.not_after_epoch <= now]
        for closer in expired:
            closer.close(ADMIN_CLOSE, "certificate expired; re-enroll")
        return len(expired)

    # --- admission (event loop) ---------------------------------------------------------

    def device_type(self, name: str) -> DeviceType | None:
        return self._types.get(name)

    def message_types_of(self, type_name: str) -> tuple[str, ...] | None:
        device_type = self._types.get(type_name)
        return device_type.message_types if device_type else None

    def is_revoked(self, serial: int) -> bool:
        return serial in self._revoked

    def admit(self, peer_certificate_der: bytes | None, *, channel: str,
              client_id: str | None = None, source: str = "") -> Admission | Refused:
        """See ``DeviceGate.admit``. Refusals are audited, at most once per peer and
        reason per ``[channel] refusal_audit_window_seconds``."""
        if not self.loaded:
            return self._refuse(Refusal.SERVER_UNAVAILABLE, "the server is starting; retry",
                                channel, source, None)
        if not peer_certificate_der:
            return self._refuse(Refusal.BAD_CREDENTIALS,
                                "a client certificate from this server's CA is required",
                                channel, source, None)
        verified = self._verify(peer_certificate_der)
        if verified is None:
            return self._refuse(Refusal.BAD_CREDENTIALS,
                                "the client certificate was not issued by this server's "
                                "device CA (a manufacturer certificate only enrolls)",
                                channel, source, None)
        # OpenSSL checks the validity period on a full handshake only: a TLS session
        # resumed from a ticket presents the original certificate unchecked
        # (RFC 8446 §2.2), so an expired one would otherwise get in.
        now = self._clock.now().timestamp()
        if not verified.not_before_epoch <= now < verified.not_after_epoch:
            return self._refuse(Refusal.BAD_CREDENTIALS,
                                "the client certificate is expired or not yet valid; "
                                "re-enroll", channel, source, verified.device_id,
                                verified.serial)
        verdict = self._decide(verified.serial, verified.device_id, channel, client_id)
        if isinstance(verdict, Refused):
            return self._refuse(verdict.code, verdict.reason, channel, source,
                                verified.device_id, verified.serial)
        verdict.not_after_epoch = verified.not_after_epoch
        return verdict

    def recheck(self, admission: Admission, *, channel: str = "mqtt") -> Admission | Refused:
        """See ``DeviceGate.recheck``; not audited (the listener audits what it drops)."""
        now = self._clock.now().timestamp()
        if now >= admission.not_after_epoch:
            return Refused(Refusal.BAD_CREDENTIALS, "the client certificate has expired")
        if now >= admission.credential_expires_at:
            return Refused(Refusal.BAD_CREDENTIALS, f"the {_credential_name(admission)} "
                                                    "has expired")
        stale = self._credential_stale(admission)
        if stale is not None:
            return Refused(Refusal.BANNED, stale)
        verdict = self._decide(admission.serial, admission.device_id, channel, None)
        if isinstance(verdict, Admission):
            copy_credential(admission, verdict)
        return verdict

    # --- access tokens and SAS (event loop) ---------------------------------------------

    def admit_token(self, token: AccessToken, *, channel: str, source: str = "",
                    client_id: str | None = None, peer_der: bytes | None = None,
                    proof_jkt: str | None = None) -> Admission | Refused:
        """Admit a peer that presents a verified access token (signature, issuer,
        audience and times already checked by ``AccessTokenVerifier``).

        The binding is checked here: a ``x5t#S256`` token only with the very
        certificate on this connection (RFC 8705 §3), a ``jkt`` token only with a
        proof signed by that key (``proof_jkt``, RFC 9449 §7.1), an unbound token
        as it is. Then revocation (the token's jti, the device's credential
        generation) and the device's state and policy, as for certificates; the
        admission also carries the token's scopes.
        """
        if not self.loaded:
            return self._refuse(Refusal.SERVER_UNAVAILABLE, "the server is starting; retry",
                                channel, source, None)
        device_id = token.device_id
        serial = 0
        not_after = math.inf
        if token.binding == "x5t#S256":
            if not peer_der or not hmac.compare_digest(certificate_thumbprint(peer_der),
                                                       token.thumbprint or ""):
                return self._refuse(Refusal.BAD_CREDENTIALS,
                                    "this access token is bound to a certificate (cnf "
                                    "x5t#S256): present it with that client certificate",
                                    channel, source, device_id)
            verified = self._verify(peer_der)
            if verified is None or verified.device_id != device_id:
                return self._refuse(Refusal.BAD_CREDENTIALS,
                                    "the token's certificate is not a device certificate "
                                    "of this server", channel, source, device_id)
            # As in admit(): a resumed TLS session presents its certificate unchecked.
            now = self._clock.now().timestamp()
            if not verified.not_before_epoch <= now < verified.not_after_epoch:
                return self._refuse(Refusal.BAD_CREDENTIALS,
                                    "the client certificate is expired or not yet valid; "
                                    "re-enroll", channel, source, device_id, verified.serial)
            serial, not_after = verified.serial, verified.not_after_epoch
        elif token.binding == "jkt" and (
                proof_jkt is None or not hmac.compare_digest(proof_jkt, token.thumbprint or "")):
            return self._refuse(Refusal.BAD_CREDENTIALS,
                                "this access token is bound to a key (cnf jkt): "
                                "present it with a proof signed by that key",
                                channel, source, device_id)
        if token.jti in self._revoked_tokens:
            return self._refuse(Refusal.BANNED, "the access token is revoked", channel,
                                source, device_id)
        device = self._devices.get(device_id)
        if device is not None and device.credential_generation != token.generation:
            return self._refuse(Refusal.BANNED,
                                "the access token was revoked (the device's credentials "
                                "changed since it was issued); get a new one",
                                channel, source, device_id)
        verdict = self._decide(serial, device_id, channel, client_id,
                               scope=self._scope_for(token, device))
        if isinstance(verdict, Refused):
            return self._refuse(verdict.code, verdict.reason, channel, source, device_id,
                                serial or None)
        if verdict.quarantined and not set(token.scopes) <= RECOVERY_SCOPES:
            return self._refuse(Refusal.NOT_AUTHORIZED,
                                "device is quarantined: get a token with the recovery "
                                "scopes (device:read ota:download)", channel, source,
                                device_id)
        verdict.not_after_epoch = not_after
        verdict.auth = AuthMethod.ACCESS_TOKEN
        verdict.scopes = token.scopes
        verdict.credential_expires_at = float(token.expires_at)
        verdict.token_jti = token.jti
        verdict.token_binding = token.binding
        verdict.generation = token.generation
        return verdict

    def token_standing(self, token: AccessToken, *, channel: str,
                       source: str = "") -> Refused | None:
        """Whether a verified token still stands (not revoked by jti or by the device's
        credential generation, its device in a state that may act), before its proof is
        checked: a proof's jti is spent only for a token that could be admitted, so a
        revoked token cannot fill the replay cache. Refusals are audited as ``admit``'s."""
        device = self._devices.get(token.device_id)
        if token.jti in self._revoked_tokens or (
                device is not None and device.credential_generation != token.generation):
            return self._refuse(Refusal.BANNED, "the access token is revoked", channel,
                                source, token.device_id)
        if device is None or device.state not in (LifecycleState.ACTIVE,
                                                   LifecycleState.QUARANTINED):
            return self._refuse(Refusal.BAD_CREDENTIALS if device is None else
                                Refusal.NOT_AUTHORIZED,
                                "unknown device" if device is None else
                                f"device is {device.state.value}", channel, source,
                                token.device_id)
        return None

    def may_act(self, device_id: str) -> bool:
        """The device exists and is active or quarantined (the token endpoint asks
        before it spends a client assertion's jti)."""
        device = self._devices.get(device_id)
        return device is not None and device.state in (LifecycleState.ACTIVE,
                                                       LifecycleState.QUARANTINED)

    def admit_sas(self, device_id: str, sas: SharedAccessSignature, *, channel: str,
                  source: str = "", client_id: str | None = None) -> Admission | Refused:
        """Admit a peer that presents a SAS token signed with one of ``device_id``'s
        symmetric keys (primary or secondary), for that device, not expired and not
        valid for longer than ``max_sas_validity_seconds``."""
        if not self.loaded:
            return self._refuse(Refusal.SERVER_UNAVAILABLE, "the server is starting; retry",
                                channel, source, None)
        secrets = self._secrets.get(device_id)
        if secrets is None:
            return self._refuse(Refusal.BAD_CREDENTIALS,
                                "the device has no symmetric key (or it was revoked)",
                                channel, source, device_id)
        try:
            slot = check_sas(sas, device_id, secrets.slots(),
                             now=self._clock.now().timestamp(),
                             max_validity_seconds=self._max_sas_validity)
        except SasRefused as exc:
            return self._refuse(Refusal.BAD_CREDENTIALS, exc.reason, channel, source,
                                device_id)
        verdict = self._decide(0, device_id, channel, client_id)
        if isinstance(verdict, Refused):
            return self._refuse(verdict.code, verdict.reason, channel, source, device_id)
        verdict.auth = AuthMethod.SAS
        verdict.credential_expires_at = float(sas.expiry)
        verdict.sas_key = (slot, secrets.version_of(slot))
        return verdict

    def device(self, device_id: str) -> Device | None:
        """The cached device (the token endpoint decides from the same cache)."""
        return self._devices.get(device_id)

    def symmetric_keys(self, device_id: str) -> tuple[bytes, ...]:
        secrets = self._secrets.get(device_id)
        return () if secrets is None else (secrets.primary, secrets.secondary)

    def compile_policy(self, device: Device, serial: int = 0) -> ChannelPolicy:
        """The device's effective policy from the current snapshot (token scopes are
        narrowed against it)."""
        return self._policies.compile(self._policy_snapshot, device, serial)

    def verified_certificate(self, der: bytes) -> VerifiedCertificate | None:
        """``der`` if our issuing CA issued it to a device, it is in its validity period
        and not revoked; else None."""
        verified = self._verify(der)
        if verified is None or verified.serial in self._revoked:
            return None
        now = self._clock.now().timestamp()
        if not verified.not_before_epoch <= now < verified.not_after_epoch:
            return None
        return verified

    def is_token_revoked(self, jti: str) -> bool:
        return jti in self._revoked_tokens

    def _scope_for(self, token: AccessToken, device: Device | None) -> ChannelPolicy | None:
        return None if device is None else compile_scope(token.scopes, device)

    def _credential_stale(self, admission: Admission) -> str | None:
        """Why a token or SAS admission may no longer stand, or None."""
        if admission.auth is AuthMethod.ACCESS_TOKEN:
            if admission.token_jti in self._revoked_tokens:
                return "access token revoked"
            device = self._devices.get(admission.device_id)
            if device is None or device.credential_generation != admission.generation:
                return "access token revoked"
        elif admission.auth is AuthMethod.SAS and admission.sas_key is not None:
            secrets = self._secrets.get(admission.device_id)
            slot, version = admission.sas_key
            if secrets is None or secrets.version_of(slot) != version:
                return "the symmetric key that signed the SAS token was rotated or revoked"
        return None

    def _forget_revoked_tokens(self) -> None:
        now = self._clock.now().timestamp()
        expired = [jti for jti, until in self._revoked_tokens.items() if until <= now]
        for jti in expired:
            del self._revoked_tokens[jti]

    def _decide(self, serial: int, device_id: str, channel: str,
                client_id: str | None,
                scope: ChannelPolicy | None = None) -> Admission | Refused:
        if serial in self._revoked:
            return Refused(Refusal.BANNED, "the client certificate is revoked")
        device = self._devices.get(device_id)
        if device is None:
            return Refused(Refusal.BAD_CREDENTIALS, "unknown device")
        state = device.state
        if state in (LifecycleState.COMPROMISED, LifecycleState.RETIRED):
            return Refused(Refusal.BANNED, f"device is {state.value}")
        if state not in (LifecycleState.ACTIVE, LifecycleState.QUARANTINED):
            return Refused(Refusal.NOT_AUTHORIZED,
                           f"device is {state.value}; an operator must enable it")
        if client_id is not None and client_id != device_id:
            return Refused(Refusal.CLIENT_ID_NOT_VALID,
                           f'client id "{echo_client_id(client_id)}", certificate names '
                           f'"{device_id}": the client id must be the device id')
        policy = self._policies.compile(self._policy_snapshot, device, serial)
        if channel == "mqtt":
            decision = policy.decide(Action.MQTT_CONNECT, device_id)
            if decision.allowed and scope is not None:
                decision = scope.decide(Action.MQTT_CONNECT, device_id)
                if not decision.allowed:
                    return Refused(Refusal.NOT_AUTHORIZED,
                                   "the access token's scope lacks mqtt:connect")
            if not decision.allowed:
                reason = ("device is quarantined: only recovery routes (status, "
                          "re-enrollment, firmware) are open" if
                          state is LifecycleState.QUARANTINED else decision.reason)
                return Refused(Refusal.NOT_AUTHORIZED, reason)
        return Admission(device_id=device_id, device_type=device.type, owner=device.owner,
                         serial=serial, not_after_epoch=float("inf"), state=state.value,
                         quarantined=state is LifecycleState.QUARANTINED, policy=policy,
                         firmware_version=device.firmware_version, scope=scope)

    def _verify(self, der: bytes) -> VerifiedCertificate | None:
        digest = hashlib.sha256(der).digest()
        # The token endpoint calls this from worker threads, the listeners from the loop.
        with self._verified_lock:
            cached = self._verified.get(digest)
            if cached is not None:
                self._verified.move_to_end(digest)
                return cached
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        if not any(_issued_by(cert, issuer) for issuer in self._issuers):
            return None
        device_id = _device_id(cert)
        if device_id is None:
            return None
        verified = VerifiedCertificate(cert.serial_number, device_id,
                                       cert.not_valid_before_utc.timestamp(),
                                       cert.not_valid_after_utc.timestamp())
        with self._verified_lock:
            self._verified[digest] = verified
            if len(self._verified) > VERIFIED_CERT_CACHE_ENTRIES:
                self._verified.popitem(last=False)
        return verified

    def refuse(self, code: Refusal, reason: str, channel: str, source: str,
               device_id: str | None, serial: int | None = None) -> Refused:
        """A refusal, audited like the gate's own (at most once per peer and reason code
        per window): listeners use it for credentials refused before the gate (a token
        that does not verify, a bad proof), never with the credential in ``reason``."""
        return self._refuse(code, reason, channel, source, device_id, serial)

    def _refuse(self, code: Refusal, reason: str, channel: str, source: str,
                device_id: str | None, serial: int | None = None) -> Refused:
        peer = device_id or source.rsplit(":", 1)[0] or "unknown"
        if self._refusal_throttle.allow((peer, f"0x{int(code):02x}")):
            details: dict[str, Any] = {"channel": channel, "reason": reason,
                                       "reason_code": f"0x{int(code):02x}", "source": source}
            if serial is not None:
                details["serial"] = format_serial(serial)
            self._audit_refusal(AuditEvent(
                action="channel.refused", actor=f"remote:{source}" if source else "remote",
                target=f"device:{device_id}" if device_id else f"remote:{peer}",
                outcome="failure", details=details))
        return Refused(code, reason)


def _credential_name(admission: Admission) -> str:
    return {AuthMethod.ACCESS_TOKEN: "access token", AuthMethod.SAS: "SAS token"}.get(
        admission.auth, "credential")


def echo_client_id(client_id: str) -> str:
    """``client_id`` fit to quote in a reason: at most ``MAX_ECHOED_CLIENT_ID_CHARS``
    characters (then "…"); control, format and separator characters (newlines, escape
    sequences, bidirectional overrides), quotes and backslashes as Python escapes."""
    text = "".join(_escape_char(ch) for ch in client_id[:MAX_ECHOED_CLIENT_ID_CHARS])
    return text + ("…" if len(client_id) > MAX_ECHOED_CLIENT_ID_CHARS else "")


def _escape_char(ch: str) -> str:
    if ch in '"\\':
        return "\\" + ch
    return ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _device_id(cert: x509.Certificate) -> str | None:
    """The device id from the SAN URI our CA writes (``urn:fleetward:device:<id>``)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    ids = [uri.removeprefix(DEVICE_URI_PREFIX)
           for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
           if uri.startswith(DEVICE_URI_PREFIX)]
    return ids[0] if len(ids) == 1 else None
