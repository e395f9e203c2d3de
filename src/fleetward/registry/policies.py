"""The policy service: store, attach, audit, snapshot and explain policies.

Every change is audited in the same transaction that makes it, with exactly these
actions (the data plane's change feed listens for them, ``edge/gate.py``):
``policy.put``, ``policy.deleted``, ``policy.attached``, ``policy.detached``, each with
target ``policy:<name>``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from fleetward.audit import AuditLog
from fleetward.clock import Clock
from fleetward.errors import InvalidInput, NotFound, PolicyViolation
from fleetward.model import AuditEvent, Device, LifecycleState, parse_serial
from fleetward.policy import (
    ACTIONS,
    BUILTIN_POLICIES,
    DEFAULT_POLICY_NAME,
    QUARANTINE_POLICY_NAME,
    CompiledPolicy,
    Decision,
    NamedPolicy,
    PolicyDocument,
    PolicySnapshot,
    PolicyVariables,
    compile_for_device,
    compile_policies,
    effective_policies,
    parse_document,
    policies_for,
    validate_policy_name,
)
from fleetward.store import Database
from fleetward.store import devices as device_rows
from fleetward.store import policies as rows

log = structlog.get_logger("fleetward.policy")

# Policies attached to one device type or one device. Each one a device connects with
# is compiled per connection; AWS IoT allows 10 per certificate, for the same reason.
MAX_POLICIES_PER_TARGET = 10
MAX_TEST_RESOURCE_BYTES = 65535  # MQTT 5.0 §1.5.4: the longest UTF-8 string
MQTT_CONNECT = "mqtt:connect"
# A device of a type "in general", for judging a type's policies: each value is usable in
# every resource (engine.unusable_reason), so ${device.id}, ${device.owner} and
# ${cert.serial} count as satisfiable, and it connects with its id as client id (the
# gate requires client id = device id).
ANY_DEVICE_ID = "any-device-of-the-type"
ANY_OWNER = "any-owner"
ANY_SERIAL = "01"


@dataclass(frozen=True, slots=True)
class Attachment:
    kind: str  # "type" | "device"
    target: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "target": self.target}


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """A policy as the admin API shows it. Built-in policies have version 0."""

    name: str
    document: dict[str, Any]  # normalised JSON
    version: int
    builtin: bool
    attachments: tuple[Attachment, ...] = ()
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    error: str | None = None  # the stored document no longer validates

    def to_json(self, *, with_document: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "version": self.version, "builtin": self.builtin,
            "statements": len(self.document.get("statements", [])),
            "attachments": [a.to_json() for a in self.attachments],
            "created_at": _iso(self.created_at), "updated_at": _iso(self.updated_at)}
        if with_document:
            out["document"] = self.document
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True, slots=True)
class PolicyWarning:
    """Something an operator should know about a change that was nonetheless made."""

    code: str  # "mqtt-connect-denied"
    message: str
    hint: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


@dataclass(frozen=True, slots=True)
class EffectivePolicies:
    """What governs a device now, or for a type what its devices without policies of
    their own get; returned by attach and detach so the operator sees the result."""

    kind: str  # "type" | "device"
    target: str
    device_type: str
    policies: tuple[str, ...]  # in the order the data plane compiles them
    device_policies: tuple[str, ...]  # attached to the device itself (() for a type)
    type_policies: tuple[str, ...]  # attached to the device type
    mqtt_connect: bool  # may such a device connect over MQTT (mqtt:connect)
    quarantined: bool  # the device is quarantined: the quarantine policy alone applies now
    warnings: tuple[PolicyWarning, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "device_type": self.device_type,
                "policies": list(self.policies),
                "device_policies": list(self.device_policies),
                "type_policies": list(self.type_policies),
                "implicit_default": not (self.device_policies or self.type_policies),
                "mqtt_connect": self.mqtt_connect, "quarantined": self.quarantined}


class PolicyService:
    def __init__(self, db: Database, audit: AuditLog, clock: Clock) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock

    # --- documents ----------------------------------------------------------------------

    def put(self, name: str, source: str | bytes | Mapping[str, Any], actor: str, *,
            fmt: str | None = None) -> PolicyInfo:
        """Create or replace policy ``name``; audited as ``policy.put``.

        Args:
            name: ``[a-z0-9][a-z0-9_-]{0,63}``; not a built-in name.
            source: JSON or YAML text, or a decoded mapping.
            actor: who, for the audit log.
            fmt: "json" or "yaml" for text (None: guessed).

        Raises:
            InvalidInput: bad name or document (the hint names the rule).
            PolicyViolation: a built-in name ("default", "quarantine").

        Returns:
            The stored policy; ``version`` 1 means it was created.
        """
        validate_policy_name(name)
        _refuse_builtin(name, "replaced")
        document = parse_document(source, fmt).to_json()
        with self.db.transaction() as conn:
            version = rows.put_policy(conn, name, document, self.clock.now())
            self.audit.append(conn, AuditEvent(
                action="policy.put", actor=actor, target=f"policy:{name}",
                details={"version": version,
                         "statements": len(document["statements"])}))
            return self._info(conn, name)

    def get(self, name: str) -> PolicyInfo:
        """A stored or built-in policy with its attachments.

        Raises:
            NotFound: no such policy.
        """
        validate_policy_name(name)
        with self.db.read() as conn:
            return self._info(conn, name)

    def list(self) -> list[PolicyInfo]:
        """Every policy, built-ins included, by name."""
        with self.db.read() as conn:
            names = {r.name for r in rows.list_policies(conn)} | set(BUILTIN_POLICIES)
            return [self._info(conn, name) for name in sorted(names)]

    def delete(self, name: str, actor: str) -> None:
        """Delete an unattached policy; audited as ``policy.deleted``.

        Raises:
            PolicyViolation: a built-in policy.
            NotFound: no such policy.
            Conflict: it is attached somewhere (the problem lists where).
        """
        validate_policy_name(name)
        _refuse_builtin(name, "deleted")
        with self.db.transaction() as conn:
            row = rows.get_policy(conn, name)
            if row is None or not rows.delete_policy(conn, name):
                raise _not_found(name)
            self.audit.append(conn, AuditEvent(
                action="policy.deleted", actor=actor, target=f"policy:{name}",
                details={"version": row.version}))

    # --- attachments --------------------------------------------------------------------

    def attach(self, name: str, kind: str, target: str, actor: str) -> bool:
        """Attach ``name`` to a device type (``kind`` "type") or a device ("device");
        audited as ``policy.attached``. Idempotent: False if it already was attached.

        Raises:
            InvalidInput: bad name or kind.
            PolicyViolation: "quarantine" (applied automatically), or the target has
                ``MAX_POLICIES_PER_TARGET`` policies already.
            NotFound: no such policy, type or device.
        """
        validate_policy_name(name)
        _check_kind(kind)
        if name == QUARANTINE_POLICY_NAME:
            raise PolicyViolation(
                "the quarantine policy cannot be attached",
                hint="it applies by itself to quarantined devices: fleetward device "
                     "quarantine ID")
        with self.db.transaction() as conn:
            now = self.clock.now()
            if name == DEFAULT_POLICY_NAME:
                # Attachments reference a row; the built-in's content is never read from it.
                rows.ensure_policy(conn, name,
                                   BUILTIN_POLICIES[name].document.to_json(), now)
            elif rows.get_policy(conn, name) is None:
                raise _not_found(name)
            _require_target(conn, kind, target)
            if rows.count_attached_to(conn, kind, target) >= MAX_POLICIES_PER_TARGET:
                raise PolicyViolation(
                    f"{kind} {target} already has {MAX_POLICIES_PER_TARGET} policies",
                    hint="merge some of them into one document; each is compiled for "
                         "every connection")
            created = rows.attach(conn, name, kind, target, now)
            if created:
                self.audit.append(conn, AuditEvent(
                    action="policy.attached", actor=actor, target=f"policy:{name}",
                    details={"kind": kind, "target": target}))
        return created

    def detach(self, name: str, kind: str, target: str, actor: str) -> None:
        """Remove one attachment; audited as ``policy.detached``.

        Raises:
            InvalidInput: bad name or kind.
            NotFound: it was not attached there.
        """
        validate_policy_name(name)
        _check_kind(kind)
        with self.db.transaction() as conn:
            if not rows.detach(conn, name, kind, target):
                raise NotFound(f"policy {name!r} is not attached to {kind} {target!r}",
                               hint=f"see where it is attached: fleetward policy get {name}")
            self.audit.append(conn, AuditEvent(
                action="policy.detached", actor=actor, target=f"policy:{name}",
                details={"kind": kind, "target": target}))

    def effective(self, kind: str, target: str) -> EffectivePolicies:
        """What applies to a device type or a device now, by the data plane's own rule
        (``policies_for``): a device gets the policies attached to it and to its type
        (device ones first, each once), and the built-in ``default`` only when neither has
        any. For a quarantined device this is what applies once it is released; until
        then the quarantine policy alone governs it, which ``quarantined`` says (the
        warnings are about the attached set, the operator's change). For a type, what a
        device of the type without policies of its own gets.

        Warns when such a device may not connect over MQTT any more: a policy attached
        to a type or device replaces ``default``, so a deny-only policy alone cuts every
        device of the type off. Variables are taken as satisfiable for a type
        (``ANY_DEVICE_ID``); a device is judged with its own id, type and owner.

        Raises:
            InvalidInput: bad kind.
            NotFound: no such type or device.
        """
        _check_kind(kind)
        with self.db.read() as conn:
            _require_target(conn, kind, target)
            device = device_rows.get_device(conn, target) if kind == "device" else None
            snapshot = _parse_snapshot(rows.load_snapshot(conn))
        own: tuple[str, ...] = ()
        if device is None:
            type_name = target
            variables = PolicyVariables(ANY_DEVICE_ID, target, ANY_OWNER, ANY_SERIAL)
            # a type's view: the policies of no particular device
            snapshot = dataclasses.replace(snapshot, by_device={})
        else:
            type_name, own = device.type, snapshot.by_device.get(device.id, ())
            variables = PolicyVariables.for_device(device, ANY_SERIAL)
        policies = policies_for(snapshot, variables.device_id, type_name)
        decision = compile_policies(policies, variables).decide(MQTT_CONNECT,
                                                                variables.device_id)
        names = tuple(p.name for p in policies)
        warnings = () if decision.allowed else (
            _connect_warning(kind, target, names, decision),)
        return EffectivePolicies(
            kind, target, type_name, names, own, snapshot.by_type.get(type_name, ()),
            decision.allowed,
            device is not None and device.state is LifecycleState.QUARANTINED, warnings)

    # --- the data plane's view ----------------------------------------------------------

    def snapshot(self) -> PolicySnapshot:
        """Every stored policy and attachment, parsed (blocking SQL: off the event loop).

        A stored document that no longer validates becomes a policy that denies
        everything for the devices it is attached to (it might have held a deny).
        """
        with self.db.read() as conn:
            loaded = rows.load_snapshot(conn)
        return _parse_snapshot(loaded)

    def compile(self, snapshot: PolicySnapshot, device: Device,
                serial: int | None) -> CompiledPolicy:
        """The device's effective policy for one connection (the quarantine policy while
        it is quarantined). Pure: implements ``edge.gate.PolicyCompiler.compile``."""
        return compile_for_device(snapshot, device, serial)

    def test(self, device_id: str, action: str, resource: str,
             cert_serial: str | int | None = None) -> dict[str, Any]:
        """Explain what ``device_id`` may do: the decision, the statements that matched,
        and resources its variables made unusable (``fleetward policy test``).

        Args:
            device_id: a registered device.
            action: a concrete action (``mqtt:publish``, ``http:GET`` …).
            resource: what ``CompiledPolicy.decide`` takes for that action.
            cert_serial: hex or int, for ``${cert.serial}``; None leaves it unresolved.

        Raises:
            InvalidInput: unknown action, empty or over-long resource, bad serial.
            NotFound: no such device.
        """
        if action not in ACTIONS:
            raise InvalidInput(f"unknown action {action[:40]!r}",
                               hint="use one of: " + ", ".join(ACTIONS))
        if not resource or len(resource.encode("utf-8", "surrogatepass")) > \
                MAX_TEST_RESOURCE_BYTES:
            raise InvalidInput("the resource must be 1-65535 bytes",
                               hint="e.g. devices/<id>/telemetry/temp, or v1/devices/self")
        serial = parse_serial(cert_serial) if isinstance(cert_serial, str) else cert_serial
        with self.db.read() as conn:
            device = device_rows.get_device(conn, device_id)
        if device is None:
            raise NotFound(f"device {device_id[:128]!r} does not exist",
                           hint="list devices: fleetward device list")
        policies = effective_policies(self.snapshot(), device)
        compiled = compile_policies(policies, PolicyVariables.for_device(device, serial))
        explanation = compiled.explain(action, resource)
        return {"device_id": device.id, "device_type": device.type, "owner": device.owner,
                "state": device.state.value,
                "quarantined": policies[0].name == QUARANTINE_POLICY_NAME,
                "action": action, "resource": resource,
                "policies": [p.name for p in policies], **explanation.to_json()}

    # --- helpers ------------------------------------------------------------------------

    def _info(self, conn: Any, name: str) -> PolicyInfo:
        attachments = tuple(Attachment(a.target_kind, a.target)
                            for a in rows.attachments_of(conn, name))
        builtin = BUILTIN_POLICIES.get(name)
        if builtin is not None:
            return PolicyInfo(name, builtin.document.to_json(), 0, True, attachments)
        row = rows.get_policy(conn, name)
        if row is None:
            raise _not_found(name)
        error = None
        try:
            document = parse_document(row.document).to_json()
        except InvalidInput as exc:
            document, error = row.document, exc.message
        return PolicyInfo(name, document, row.version, False, attachments, row.created_at,
                          row.updated_at, error)


def _parse_snapshot(loaded: rows.SnapshotRows) -> PolicySnapshot:
    """Policies and attachments as the engine takes them (see ``PolicyService.snapshot``)."""
    documents: dict[str, NamedPolicy] = {}
    for row in loaded.policies:
        if row.name in BUILTIN_POLICIES:
            continue
        try:
            documents[row.name] = NamedPolicy(row.name, parse_document(row.document),
                                              row.version)
        except InvalidInput as exc:
            log.error("stored policy does not validate; it denies everything",
                      policy=row.name, error=exc.message)
            documents[row.name] = NamedPolicy(row.name, PolicyDocument(()), row.version,
                                              error=exc.message)
    by_type: dict[str, list[str]] = {}
    by_device: dict[str, list[str]] = {}
    for attachment in loaded.attachments:
        index = by_type if attachment.target_kind == "type" else by_device
        index.setdefault(attachment.target, []).append(attachment.policy_name)
    return PolicySnapshot(documents, {k: tuple(v) for k, v in by_type.items()},
                          {k: tuple(v) for k, v in by_device.items()})


def _connect_warning(kind: str, target: str, policies: tuple[str, ...],
                     decision: Decision) -> PolicyWarning:
    who = (f"devices of type {target!r} (those without policies of their own)"
           if kind == "type" else f"device {target!r}")
    if decision.statement is not None:  # an explicit deny
        why = decision.reason
        hint = ("a deny wins over every allow: narrow or remove that statement; check "
                f"with fleetward policy test --action {MQTT_CONNECT}")
    elif decision.policy is not None:  # a stored document that no longer validates
        why = decision.reason
        hint = f"fix it: fleetward policy get {decision.policy}, then policy put"
    else:
        why = f"no statement in {', '.join(policies)} allows {MQTT_CONNECT}"
        hint = (f"policies attached to a {kind} replace the built-in 'default' policy, "
                f"which allows {MQTT_CONNECT}: attach it as well (fleetward policy attach "
                f"default --{kind} {target}) or allow {MQTT_CONNECT} on ${{device.id}} in "
                "one of them")
    return PolicyWarning("mqtt-connect-denied",
                         f"{who} cannot connect over MQTT: {why}", hint)


def _refuse_builtin(name: str, verb: str) -> None:
    if name in BUILTIN_POLICIES:
        raise PolicyViolation(
            f"the built-in policy {name!r} cannot be {verb}",
            hint="put your rules under another name and attach it; attach 'default' too "
                 "to keep its rules" if name == DEFAULT_POLICY_NAME else
                 "it is what quarantined devices get; release a device to lift it")


def _check_kind(kind: str) -> None:
    if kind not in rows.TARGET_KINDS:
        raise InvalidInput(f"unknown attachment kind {str(kind)[:20]!r}",
                           hint="attach to a device type ('type') or a device ('device')")


def _require_target(conn: Any, kind: str, target: str) -> None:
    if kind == "type":
        if device_rows.get_type(conn, target) is None:
            raise NotFound(f"device type {target[:64]!r} does not exist",
                           hint="list types: fleetward type list")
    elif device_rows.get_device(conn, target) is None:
        raise NotFound(f"device {target[:128]!r} does not exist",
                       hint="list devices: fleetward device list")


def _not_found(name: str) -> NotFound:
    return NotFound(f"policy {name!r} does not exist",
                    hint=f"create it: fleetward policy put {name} FILE; "
                         "list them: fleetward policy list")


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
