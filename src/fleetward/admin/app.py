"""Admin HTTPS API (aiohttp): devices, certificates, CAs, audit, operators.

Every route is declared once in ``ROUTES`` with the role it needs; the OpenAPI document
is generated from the same table, so the two cannot drift. Deny by default: a route
without a role entry does not exist.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

from fleetward import __version__
from fleetward.admin.auth import OperatorTokens, require_role
from fleetward.audit import AuditLog, record_to_json
from fleetward.ca import Authority
from fleetward.ca.setup import register_oem_ca
from fleetward.clock import Clock
from fleetward.enroll import BootstrapTokens, EnrollmentService, IssuedToken
from fleetward.enroll.bootstrap import MAX_BATCH as MAX_CLAIM_BATCH
from fleetward.enroll.factory import MAX_FACTORY_BATCH, FactoryService
from fleetward.errors import Forbidden, InvalidInput
from fleetward.model import AuditEvent, DeviceType, Operator, Role, parse_serial, parse_state
from fleetward.registry import Registry
from fleetward.registry.device_commands import MAX_TTL_SECONDS as MAX_COMMAND_TTL_SECONDS
from fleetward.registry.device_commands import DeviceCommandService, command_json
from fleetward.registry.policies import PolicyService
from fleetward.store import Database
from fleetward.store import audit as audit_rows
from fleetward.store import cas as ca_rows
from fleetward.store import messages as message_rows
from fleetward.web.problem import (
    problem_middleware,
    read_json,
    reject_unknown_fields,
    require_str,
)

T = TypeVar("T")
MAX_BODY_BYTES = 1024 * 1024  # bytes; a CSR is ~1 KiB, an OEM CA certificate ~2 KiB
DEFAULT_TOKEN_TTL_HOURS = 72  # a device is usually installed within days of its token
MAX_TOKEN_TTL_HOURS = 24 * 90  # hours; BootstrapTokens allows at most 90 days
DEFAULT_FACTORY_TTL_HOURS = 24 * 30  # factory units wait in stock before installation
OPERATOR_KEY = web.AppKey("operator", Operator)
SERVICES_KEY: web.AppKey[AdminServices] = web.AppKey("services")


@dataclass(frozen=True, slots=True)
class AdminServices:
    db: Database
    registry: Registry
    tokens: OperatorTokens
    authority: Authority
    audit: AuditLog
    clock: Clock
    executor: Executor  # one worker: serialises SQL writes and keeps them off the loop
    bootstrap: BootstrapTokens
    enrollment: EnrollmentService
    policies: PolicyService
    commands: DeviceCommandService

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(fn, *args, **kwargs))


Handler = Callable[[web.Request, AdminServices, Operator], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    role: Role | None  # None: public (health, OpenAPI document)
    handler: Callable[..., Awaitable[web.StreamResponse]]
    summary: str
    body: dict[str, Any] | None = None  # JSON Schema of the request body
    query: tuple[str, ...] = ()


def _actor(op: Operator) -> str:
    return f"operator:{op.name}"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _body_int(body: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int:
    """An integer field in ``low..high``; ``default`` None makes it required."""
    example = f'e.g. {{"{key}": {default if default is not None else low}}}'
    value = body.get(key, default)
    if value is None:
        raise InvalidInput(f"missing field {key!r}", hint=example)
    # bool is an int in Python; JSON true must not mean 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"field {key!r} must be an integer", hint=example)
    if not low <= value <= high:
        raise InvalidInput(f"field {key!r} must be between {low} and {high}", hint=example)
    return value


def _body_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"field {key!r} must be true or false",
                           hint=f'e.g. {{"{key}": true}}')
    return value


def _str_list(body: dict[str, Any], key: str, example: str) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{key} must be a list of strings", hint=f"e.g. {example}")
    return value


def _query_int(request: web.Request, key: str, default: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {key} must be an integer",
                           hint=f"e.g. ?{key}={default}") from None


# --- handlers -------------------------------------------------------------------------


async def health(request: web.Request, svc: AdminServices, op: Operator | None) -> web.Response:
    return _json({"status": "ok", "version": __version__})


async def whoami(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    return _json({"name": op.name, "role": op.role.value, "token_id": op.token_id})


def _type_json(t: DeviceType) -> dict[str, Any]:
    return {"name": t.name, "description": t.description,
            "message_types": list(t.message_types),
            "enrollment_profiles": list(t.enrollment_profiles)}


async def list_types(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    types = await svc.run(svc.registry.list_types)
    return _json({"items": [_type_json(t) for t in types]})


async def create_type(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"name", "description", "message_types", "enrollment_profiles"})
    message_types = _str_list(body, "message_types", '["telemetry", "event"]') or []
    profiles = _str_list(body, "enrollment_profiles", '["device", "gateway"]')
    t = await svc.run(svc.registry.create_type, require_str(body, "name"),
                      require_str(body, "description", optional=True), message_types,
                      _actor(op), enrollment_profiles=profiles)
    return _json(_type_json(t), 201)


async def create_device(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"id", "type", "owner", "labels"})
    labels = body.get("labels", {})
    if not isinstance(labels, dict):
        raise InvalidInput("labels must be a JSON object of strings", hint='{"site": "plant-3"}')
    device = await svc.run(svc.registry.create_device, require_str(body, "id"),
                           require_str(body, "type"),
                           require_str(body, "owner", optional=True, default="default"),
                           labels, _actor(op))
    return _json(device.to_json(), 201)


async def list_devices(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    q = request.query
    limit = _query_int(request, "limit", 100)
    state = parse_state(q["state"]) if "state" in q else None
    devices = await svc.run(svc.registry.list_devices, state=state, type_name=q.get("type"),
                            owner=q.get("owner"), after=q.get("after"), limit=limit)
    return _json({"items": [d.to_json() for d in devices],
                  "next": devices[-1].id if len(devices) == limit else None})


async def get_device(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    device = await svc.run(svc.registry.get_device, request.match_info["device_id"])
    return _json(device.to_json())


async def change_state(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"state", "reason", "from"})
    target = parse_state(require_str(body, "state"))
    expected_from = None
    if "from" in body:
        sources = body["from"]
        if not isinstance(sources, list) or not sources or not all(
                isinstance(s, str) for s in sources):
            raise InvalidInput("'from' must be a non-empty list of states",
                               hint='e.g. {"state": "active", "from": ["quarantined"]}')
        expected_from = frozenset(parse_state(s) for s in sources)
    change = await svc.run(svc.registry.change_state, request.match_info["device_id"], target,
                           _actor(op), require_str(body, "reason", optional=True),
                           expected_from)
    return _json({"device": change.device.to_json(), "previous_state": change.previous.value,
                  "revoked_certificates": [c.serial_hex for c in change.revoked]})


async def list_device_certs(request: web.Request, svc: AdminServices,
                            op: Operator) -> web.Response:
    certs = await svc.run(svc.registry.list_certificates, request.match_info["device_id"])
    return _json({"items": [c.to_json() for c in certs]})


async def issue_cert(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"csr", "profile"})
    record = await svc.run(svc.registry.issue_certificate, request.match_info["device_id"],
                           require_str(body, "csr").encode(),
                           require_str(body, "profile", optional=True, default="device"),
                           _actor(op))
    out = record.to_json(with_pem=True)
    out["chain_pem"] = svc.authority.chain_pem()
    return _json(out, 201)


async def revoke_device_certs(request: web.Request, svc: AdminServices,
                              op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"reason"})
    revoked = await svc.run(svc.registry.revoke_device_certificates,
                            request.match_info["device_id"],
                            require_str(body, "reason", optional=True, default="unspecified"),
                            _actor(op))
    return _json({"items": [c.to_json() for c in revoked]})


async def get_cert(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    serial = parse_serial(request.match_info["serial"])
    record = await svc.run(svc.registry.get_certificate, serial)
    return _json(record.to_json(with_pem=True))


async def revoke_cert(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"reason"})
    serial = parse_serial(request.match_info["serial"])
    record = await svc.run(svc.registry.revoke_certificate, serial,
                           require_str(body, "reason", optional=True, default="unspecified"),
                           _actor(op))
    return _json(record.to_json())


async def ca_info(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    def load() -> list[dict[str, Any]]:
        with svc.db.read() as conn:
            rows = ca_rows.list_cas(conn)
        handles = svc.authority.handles
        return [{
            "name": r.name, "kind": r.kind, "parent": r.parent_name, "subject": r.subject,
            "fingerprint_sha256": r.fingerprint_sha256, "device_type": r.device_type,
            "imported": r.imported,
            "key_backend": (r.key_ref or {}).get("backend"),
            "key_online": bool(handles.get(r.name) and handles[r.name].signer is not None),
            "not_after": handles[r.name].certificate.not_valid_after_utc.isoformat()
            if r.name in handles else None,
            "crl_number": r.crl_number if r.kind != "oem" else None,
            "crl_next_update": r.crl_next_update.isoformat() if r.crl_next_update else None,
            "require_approval": r.enrollment_approval if r.kind == "oem" else None,
            "certificate_pem": r.cert_pem,
        } for r in rows]
    return _json({"items": await svc.run(load)})


async def register_oem(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"name", "certificate", "device_type", "require_approval"})
    approval = _body_bool(body, "require_approval")

    def register() -> dict[str, Any]:
        with svc.db.transaction() as conn:
            row = register_oem_ca(conn, name=require_str(body, "name"),
                                  cert_pem=require_str(body, "certificate").encode(),
                                  device_type=require_str(body, "device_type"),
                                  actor=_actor(op), now=svc.clock.now(), audit=svc.audit,
                                  enrollment_approval=approval)
        return {"name": row.name, "subject": row.subject,
                "fingerprint_sha256": row.fingerprint_sha256, "device_type": row.device_type,
                "require_approval": row.enrollment_approval}
    return _json(await svc.run(register), 201)


async def audit_query(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    limit = _query_int(request, "limit", 100)
    if not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000", hint="e.g. ?limit=100")
    after = _query_int(request, "after", 0) if "after" in request.query else None

    def query() -> list[dict[str, Any]]:
        with svc.db.read() as conn:
            rows = audit_rows.query_events(conn, after=after, action=request.query.get("action"),
                                           limit=limit,
                                           newest_first=request.query.get("order") == "desc")
        return [record_to_json(r) for r in rows]
    return _json({"items": await svc.run(query)})


async def audit_verify(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    def verify() -> dict[str, Any]:
        with svc.db.read() as conn:
            return svc.audit.verify(conn).to_json()
    return _json(await svc.run(verify))


async def list_operators(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    rows = await svc.run(svc.tokens.list)
    return _json({"items": [{"token_id": r.token_id, "name": r.name, "role": r.role.value,
                             "created_at": r.created_at.isoformat(),
                             "revoked": r.revoked_at is not None} for r in rows]})


async def create_operator(request: web.Request, svc: AdminServices,
                          op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"name", "role"})
    role_name = require_str(body, "role")
    try:
        role = Role(role_name)
    except ValueError:
        raise InvalidInput(f"unknown role {role_name!r}",
                           hint=f"use one of: {', '.join(r.value for r in Role)}") from None
    token = await svc.run(svc.tokens.create, require_str(body, "name"), role, _actor(op))
    return _json({"name": body["name"], "role": role.value, "token": token,
                  "note": "store this token now; it cannot be shown again"}, 201)


async def revoke_operator(request: web.Request, svc: AdminServices,
                          op: Operator) -> web.Response:
    await svc.run(svc.tokens.revoke, request.match_info["token_id"], _actor(op))
    return web.Response(status=204)


# --- bootstrap tokens, approvals, factory (enrollment, RFC 7030) ----------------------


def _ttl(body: dict[str, Any], default_hours: int = DEFAULT_TOKEN_TTL_HOURS) -> dt.timedelta:
    # The service enforces 1 minute .. 90 days; whole hours are what operators type.
    return dt.timedelta(hours=_body_int(body, "ttl_hours", default_hours, 1,
                                        MAX_TOKEN_TTL_HOURS))


def _token_json(issued: IssuedToken) -> dict[str, Any]:
    return {"token": issued.token, "token_id": issued.token_id,
            "expires_at": issued.expires_at.isoformat(), "max_uses": issued.max_uses}


async def create_device_token(request: web.Request, svc: AdminServices,
                              op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"ttl_hours"})
    device_id = request.match_info["device_id"]
    issued = await svc.run(svc.bootstrap.issue_for_device, device_id, _ttl(body), _actor(op))
    return _json({**_token_json(issued), "device_id": device_id}, 201)


async def create_batch_token(request: web.Request, svc: AdminServices,
                             op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"type", "count", "ttl_hours", "owner"})
    device_type = require_str(body, "type")
    count = _body_int(body, "count", None, 1, MAX_CLAIM_BATCH)
    owner = body.get("owner")
    if owner is not None and (not isinstance(owner, str) or not 1 <= len(owner) <= 128):
        raise InvalidInput("owner must be a string of 1-128 characters", hint='"owner": "acme"')
    issued = await svc.run(svc.bootstrap.issue_batch, device_type, count, _ttl(body),
                           _actor(op), owner=owner)
    return _json({**_token_json(issued), "device_type": device_type, "owner": owner}, 201)


async def revoke_bootstrap_token(request: web.Request, svc: AdminServices,
                                 op: Operator) -> web.Response:
    await svc.run(svc.bootstrap.revoke, request.match_info["token_id"], _actor(op))
    return web.Response(status=204)


async def list_enrollments(request: web.Request, svc: AdminServices,
                           op: Operator) -> web.Response:
    bindings = await svc.run(svc.enrollment.list_bindings, request.query.get("approval"),
                             _query_int(request, "limit", 100))
    return _json({"items": [b.to_json() for b in bindings]})


async def approve_enrollment(request: web.Request, svc: AdminServices,
                             op: Operator) -> web.Response:
    binding = await svc.run(svc.enrollment.decide, request.match_info["device_id"], True,
                            _actor(op))
    return _json(binding.to_json())


async def reject_enrollment(request: web.Request, svc: AdminServices,
                            op: Operator) -> web.Response:
    binding = await svc.run(svc.enrollment.decide, request.match_info["device_id"], False,
                            _actor(op))
    return _json(binding.to_json())


def _factory(svc: AdminServices) -> FactoryService:
    return FactoryService(svc.db, svc.registry, svc.bootstrap, svc.audit, svc.clock)


async def factory_tokens(request: web.Request, svc: AdminServices,
                         op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"type", "count", "owner", "id_prefix", "ttl_hours"})
    created = await svc.run(_factory(svc).create_batch, require_str(body, "type"),
                            _body_int(body, "count", None, 1, MAX_FACTORY_BATCH),
                            require_str(body, "owner", optional=True, default="default"),
                            require_str(body, "id_prefix", optional=True),
                            _ttl(body, DEFAULT_FACTORY_TTL_HOURS), _actor(op))
    return _json({"items": [{"device_id": device_id, "token": t.token,
                             "token_id": t.token_id, "expires_at": t.expires_at.isoformat()}
                            for device_id, t in created]}, 201)


async def factory_sign(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"type", "device_id", "csr_pem", "owner"})
    record, reused = await svc.run(
        _factory(svc).sign, require_str(body, "type"), require_str(body, "device_id"),
        require_str(body, "csr_pem").encode(),
        require_str(body, "owner", optional=True, default="default"), _actor(op))
    return _json({"serial": record.serial_hex, "device_id": record.device_id,
                  "not_after": record.not_after.isoformat(), "pem": record.pem,
                  "reused": reused}, 200 if reused else 201)


# --- policies ---------------------------------------------------------------------------

POLICY_YAML_TYPES = ("application/yaml", "application/x-yaml")


async def list_policies(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    items = await svc.run(svc.policies.list)
    return _json({"items": [p.to_json(with_document=False) for p in items]})


async def get_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    info = await svc.run(svc.policies.get, request.match_info["name"])
    return _json(info.to_json())


async def put_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    """The body is the document itself: JSON, or YAML with a YAML content type."""
    if request.content_type == "application/json":
        fmt = "json"
    elif request.content_type in POLICY_YAML_TYPES:
        fmt = "yaml"
    else:
        raise InvalidInput(f"expected a JSON or YAML policy document, got "
                           f"{request.content_type or 'nothing'}",
                           hint="send Content-Type: application/json or application/yaml")
    # Read raw: the policy parser refuses duplicate keys, which request.json() would hide.
    text = await request.read()
    info = await svc.run(svc.policies.put, request.match_info["name"], text, _actor(op),
                         fmt=fmt)
    return _json(info.to_json(), 201 if info.version == 1 else 200)


async def delete_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    await svc.run(svc.policies.delete, request.match_info["name"], _actor(op))
    return web.Response(status=204)


def _attachment_target(values: dict[str, Any], example: str) -> tuple[str, str]:
    """Exactly one of ``type`` / ``device``, a non-empty string."""
    given = [(k, v) for k, v in values.items() if k in ("type", "device")]
    unknown = sorted(set(values) - {"type", "device"})
    if unknown or len(given) != 1 or not isinstance(given[0][1], str) or not given[0][1]:
        raise InvalidInput("give exactly one of 'type' (a device type) or 'device' "
                           "(a device id)", hint=f"e.g. {example}")
    return given[0][0], given[0][1]


async def attach_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    kind, target = _attachment_target(body, '{"type": "sensor"} or {"device": "dev-1"}')
    name = request.match_info["name"]
    created = await svc.run(svc.policies.attach, name, kind, target, _actor(op))
    return _json({"policy": name, "kind": kind, "target": target, "changed": created},
                 201 if created else 200)


async def detach_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    kind, target = _attachment_target(dict(request.query), "?type=sensor or ?device=dev-1")
    await svc.run(svc.policies.detach, request.match_info["name"], kind, target, _actor(op))
    return web.Response(status=204)


async def explain_policy(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"device_id", "action", "resource", "cert_serial"})
    serial = body.get("cert_serial")
    if serial is not None and not isinstance(serial, str):
        raise InvalidInput("cert_serial must be a hex string", hint='e.g. "cert_serial": "1a2b"')
    result = await svc.run(svc.policies.test, require_str(body, "device_id"),
                           require_str(body, "action"), require_str(body, "resource"), serial)
    return _json(result)


# --- device commands ----------------------------------------------------------------------


async def queue_command(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"name", "payload", "ttl_seconds"})
    ttl = body.get("ttl_seconds")
    ttl_seconds = (None if ttl is None else
                   _body_int(body, "ttl_seconds", None, 1, MAX_COMMAND_TTL_SECONDS))
    row = await svc.run(svc.commands.queue, request.match_info["device_id"],
                        require_str(body, "name"), body.get("payload", {}), ttl_seconds,
                        _actor(op))
    return _json(command_json(row), 201)


async def list_device_commands(request: web.Request, svc: AdminServices,
                               op: Operator) -> web.Response:
    items = await svc.run(svc.commands.list, request.match_info["device_id"],
                          _query_int(request, "limit", 100))
    return _json({"items": [command_json(r) for r in items]})


# --- device messages (the SQL sink) -------------------------------------------------------

MAX_MESSAGES_PAGE = 1000  # messages per admin read


async def list_device_messages(request: web.Request, svc: AdminServices,
                               op: Operator) -> web.Response:
    device_id = request.match_info["device_id"]
    limit = _query_int(request, "limit", 100)
    if not 1 <= limit <= MAX_MESSAGES_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_MESSAGES_PAGE}",
                           hint="e.g. ?limit=100")
    after = _query_int(request, "after", 0) if "after" in request.query else None

    def load() -> list[message_rows.StoredMessage]:
        svc.registry.get_device(device_id)  # NotFound for an unknown device
        with svc.db.read() as conn:
            return message_rows.list_for_device(conn, device_id, limit, after)
    items = await svc.run(load)
    # "next" continues after the newest message shown: poll with ?after=<next> to follow.
    return _json({"items": [m.to_json() for m in items],
                  "next": items[-1].id if items else after})


async def openapi(request: web.Request, svc: AdminServices, op: Operator | None) -> web.Response:
    return _json(openapi_document())


_STR = {"type": "string"}
_TTL = {"type": "integer", "minimum": 1, "maximum": 24 * 90,
        "description": "token lifetime in hours (default 72)"}
ROUTES: tuple[Route, ...] = (
    Route("GET", "/openapi.json", None, openapi, "This OpenAPI 3 document"),
    Route("GET", "/v1/health", None, health, "Liveness"),
    Route("GET", "/v1/whoami", Role.AUDITOR, whoami, "The calling operator and role"),
    Route("GET", "/v1/device-types", Role.AUDITOR, list_types, "List device types"),
    Route("POST", "/v1/device-types", Role.OPERATOR, create_type, "Create a device type",
          {"type": "object", "required": ["name"], "additionalProperties": False,
           "properties": {"name": _STR, "description": _STR,
                          "message_types": {"type": "array", "items": _STR},
                          "enrollment_profiles": {
                              "type": "array", "items": _STR,
                              "description": "profiles (EST labels) its devices may enroll "
                                             "for; default [\"device\"]"}}}),
    Route("GET", "/v1/devices", Role.AUDITOR, list_devices, "List devices (keyset paging)",
          query=("state", "type", "owner", "after", "limit")),
    Route("POST", "/v1/devices", Role.OPERATOR, create_device, "Register a device",
          {"type": "object", "required": ["id", "type"], "additionalProperties": False,
           "properties": {"id": _STR, "type": _STR, "owner": _STR,
                          "labels": {"type": "object", "additionalProperties": _STR}}}),
    Route("GET", "/v1/devices/{device_id}", Role.AUDITOR, get_device, "Show a device"),
    Route("POST", "/v1/devices/{device_id}/state", Role.OPERATOR, change_state,
          "Change a device's lifecycle state",
          {"type": "object", "required": ["state"], "additionalProperties": False,
           "properties": {"state": {"enum": ["registered", "active", "disabled", "quarantined",
                                             "compromised", "retired"]},
                          "reason": _STR,
                          "from": {"type": "array", "items": _STR,
                                   "description": "apply only if the device is in one of these"}
                          }}),
    Route("GET", "/v1/devices/{device_id}/certificates", Role.AUDITOR, list_device_certs,
          "List a device's certificates"),
    Route("POST", "/v1/devices/{device_id}/certificates", Role.OPERATOR, issue_cert,
          "Issue a certificate from a PKCS#10 CSR (PEM)",
          {"type": "object", "required": ["csr"], "additionalProperties": False,
           "properties": {"csr": _STR, "profile": {"enum": ["device", "gateway", "bootstrap"]}}}),
    Route("POST", "/v1/devices/{device_id}/revoke-certificates", Role.OPERATOR,
          revoke_device_certs, "Revoke every certificate of a device",
          {"type": "object", "additionalProperties": False, "properties": {"reason": _STR}}),
    Route("POST", "/v1/devices/{device_id}/commands", Role.OPERATOR, queue_command,
          "Queue a command for a device (delivered over MQTT or the HTTPS long-poll)",
          {"type": "object", "required": ["name"], "additionalProperties": False,
           "properties": {"name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_.-]{0,63}$"},
                          "payload": {"type": "object", "description": "default {}"},
                          "ttl_seconds": {"type": "integer", "minimum": 1,
                                          "maximum": MAX_COMMAND_TTL_SECONDS,
                                          "description": "undelivered commands expire "
                                                         "after this (default: "
                                                         "[device_api] command_ttl_seconds)"}}}),
    Route("GET", "/v1/devices/{device_id}/commands", Role.AUDITOR, list_device_commands,
          "List a device's commands, newest first", query=("limit",)),
    Route("GET", "/v1/devices/{device_id}/messages", Role.AUDITOR, list_device_messages,
          "A device's stored telemetry and events (SQL sink), oldest first: the newest "
          "`limit`, or the first `limit` after id `after`", query=("limit", "after")),
    Route("GET", "/v1/certificates/{serial}", Role.AUDITOR, get_cert, "Show a certificate"),
    Route("POST", "/v1/certificates/{serial}/revoke", Role.OPERATOR, revoke_cert,
          "Revoke a certificate (RFC 5280 reason)",
          {"type": "object", "additionalProperties": False, "properties": {"reason": _STR}}),
    Route("GET", "/v1/ca", Role.AUDITOR, ca_info, "CAs: ours and registered OEM CAs"),
    Route("POST", "/v1/ca/oem", Role.ADMIN, register_oem, "Register a trusted OEM CA",
          {"type": "object", "required": ["name", "certificate", "device_type"],
           "additionalProperties": False,
           "properties": {"name": _STR, "certificate": _STR, "device_type": _STR,
                          "require_approval": {
                              "type": "boolean",
                              "description": "new devices wait for an operator's approval"}}}),
    Route("POST", "/v1/devices/{device_id}/bootstrap-tokens", Role.OPERATOR,
          create_device_token, "Issue a single-use bootstrap token for a device (shown once)",
          {"type": "object", "additionalProperties": False, "properties": {"ttl_hours": _TTL}}),
    Route("POST", "/v1/bootstrap-tokens", Role.OPERATOR, create_batch_token,
          "Issue a claim-batch bootstrap token for N new devices of a type (shown once)",
          {"type": "object", "required": ["type", "count"], "additionalProperties": False,
           "properties": {"type": _STR,
                          "count": {"type": "integer", "minimum": 1,
                                    "maximum": MAX_CLAIM_BATCH},
                          "ttl_hours": _TTL, "owner": {"type": ["string", "null"]}}}),
    Route("DELETE", "/v1/bootstrap-tokens/{token_id}", Role.OPERATOR, revoke_bootstrap_token,
          "Revoke a bootstrap token"),
    Route("GET", "/v1/enrollments", Role.AUDITOR, list_enrollments,
          "Manufacturer-certificate (IDevID) enrollments, e.g. ?approval=pending",
          query=("approval", "limit")),
    Route("POST", "/v1/enrollments/{device_id}/approve", Role.OPERATOR, approve_enrollment,
          "Approve a pending manufacturer-certificate enrollment"),
    Route("POST", "/v1/enrollments/{device_id}/reject", Role.OPERATOR, reject_enrollment,
          "Reject a pending manufacturer-certificate enrollment"),
    Route("POST", "/v1/factory/tokens", Role.OPERATOR, factory_tokens,
          "Register N new devices with one single-use bootstrap token each (shown once)",
          {"type": "object", "required": ["type", "count"], "additionalProperties": False,
           "properties": {"type": _STR,
                          "count": {"type": "integer", "minimum": 1,
                                    "maximum": MAX_FACTORY_BATCH},
                          "owner": _STR, "id_prefix": _STR,
                          "ttl_hours": {**_TTL, "description": "token lifetime in hours "
                                                               "(default 720)"}}}),
    Route("POST", "/v1/factory/sign", Role.OPERATOR, factory_sign,
          "Sign a factory CSR for a device, registering it if new (idempotent per CSR: "
          "200 with reused=true if already signed)",
          {"type": "object", "required": ["type", "device_id", "csr_pem"],
           "additionalProperties": False,
           "properties": {"type": _STR, "device_id": _STR, "csr_pem": _STR, "owner": _STR}}),
    Route("GET", "/v1/policies", Role.AUDITOR, list_policies,
          "List policies (built-in ones included) and where they are attached"),
    Route("POST", "/v1/policies/test", Role.AUDITOR, explain_policy,
          "Explain a policy decision for a device (read-only: changes nothing)",
          {"type": "object", "required": ["device_id", "action", "resource"],
           "additionalProperties": False,
           "properties": {"device_id": _STR,
                          "action": {"type": "string",
                                     "description": "e.g. mqtt:publish, http:GET"},
                          "resource": {"type": "string",
                                       "description": "topic, topic filter (subscribe), "
                                                      "client id (connect), request path "
                                                      "without '/' (http)"},
                          "cert_serial": {"type": "string",
                                          "description": "hex, for ${cert.serial}"}}}),
    Route("GET", "/v1/policies/{name}", Role.AUDITOR, get_policy,
          "Show a policy: document, version, attachments"),
    Route("PUT", "/v1/policies/{name}", Role.ADMIN, put_policy,
          "Create or replace a policy (JSON body, or YAML with Content-Type "
          "application/yaml); 201 when created",
          {"type": "object", "required": ["statements"], "additionalProperties": False,
           "properties": {
               "version": {"enum": ["2026-11"]},
               "statements": {"type": "array", "minItems": 1, "maxItems": 100, "items": {
                   "type": "object", "required": ["effect", "actions", "resources"],
                   "additionalProperties": False,
                   "properties": {"sid": _STR, "effect": {"enum": ["allow", "deny"]},
                                  "actions": {"type": "array", "items": _STR},
                                  "resources": {"type": "array", "items": _STR,
                                                "maxItems": 100}}}}}}),
    Route("DELETE", "/v1/policies/{name}", Role.ADMIN, delete_policy,
          "Delete a policy that is not attached anywhere"),
    Route("POST", "/v1/policies/{name}/attachments", Role.ADMIN, attach_policy,
          "Attach a policy to a device type or a device (idempotent; 201 when new)",
          {"type": "object", "additionalProperties": False,
           "properties": {"type": _STR, "device": _STR},
           "description": "exactly one of type, device"}),
    Route("DELETE", "/v1/policies/{name}/attachments", Role.ADMIN, detach_policy,
          "Detach a policy from ?type=T or ?device=D", query=("type", "device")),
    Route("GET", "/v1/audit", Role.AUDITOR, audit_query, "Query the audit log",
          query=("after", "action", "limit", "order")),
    Route("GET", "/v1/audit/verify", Role.AUDITOR, audit_verify, "Verify the audit chain"),
    Route("GET", "/v1/operators", Role.ADMIN, list_operators, "List operator tokens"),
    Route("POST", "/v1/operators", Role.ADMIN, create_operator,
          "Create an operator token (shown once)",
          {"type": "object", "required": ["name", "role"], "additionalProperties": False,
           "properties": {"name": _STR, "role": {"enum": ["admin", "operator", "auditor"]}}}),
    Route("DELETE", "/v1/operators/{token_id}", Role.ADMIN, revoke_operator,
          "Revoke an operator token"),
)


def openapi_document() -> dict[str, Any]:
    problem_ref = {"$ref": "#/components/responses/Problem"}
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "responses": {"200": {"description": "OK"}, "default": problem_ref},
        }
        if route.role is None:
            op["security"] = []
        else:
            op["x-fleetward-role"] = route.role.value
        params = [{"name": name, "in": "path", "required": True, "schema": _STR}
                  for name in _path_params(route.path)]
        params += [{"name": name, "in": "query", "required": False, "schema": _STR}
                   for name in route.query]
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": route.body}}}
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Fleetward admin API", "version": __version__},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Problem": {
                "description": "RFC 9457 problem details",
                "content": {"application/problem+json": {"schema": {"type": "object"}}}}},
        },
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def build_admin_app(services: AdminServices) -> web.Application:
    app = web.Application(middlewares=[problem_middleware], client_max_size=MAX_BODY_BYTES)
    app[SERVICES_KEY] = services
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _guard(route, services))
    return app


def _guard(route: Route, svc: AdminServices) -> Callable[[web.Request],
                                                         Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        if route.role is None:
            return await route.handler(request, svc, None)
        source = request.remote or "unknown"
        operator = await svc.run(svc.tokens.authenticate,
                                 request.headers.get("Authorization"), source)
        try:
            require_role(operator, route.role)
        except Forbidden as exc:
            await svc.run(_audit_forbidden, svc, operator, route, request.path)
            raise exc
        return await route.handler(request, svc, operator)
    return handle


def _audit_forbidden(svc: AdminServices, operator: Operator, route: Route, path: str) -> None:
    with svc.db.transaction() as conn:
        svc.audit.append(conn, AuditEvent(
            action="admin.forbidden", actor=_actor(operator), target=path, outcome="failure",
            details={"method": route.method, "role": operator.role.value,
                     "needed": route.role.value if route.role else None}))
