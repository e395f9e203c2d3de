"""Admin API: certificate authorities (ours and registered OEM CAs)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fleetward.admin.base import AdminServices, Reply, Route, actor, body_bool, json_response
from fleetward.admin.schemas import (
    BOOLEAN,
    CA_NAME,
    SHA256_HEX,
    STRING,
    TYPE_NAME,
    items_of,
    obj,
    ref,
)
from fleetward.ca.setup import register_oem_ca
from fleetward.model import Operator, Role
from fleetward.store import cas as ca_rows
from fleetward.web.problem import read_json, reject_unknown_fields, require_str


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
    return json_response({"items": await svc.run(load)})


async def register_oem(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"name", "certificate", "device_type", "require_approval"})
    approval = body_bool(body, "require_approval")

    def register() -> dict[str, Any]:
        with svc.db.transaction() as conn:
            row = register_oem_ca(conn, name=require_str(body, "name"),
                                  cert_pem=require_str(body, "certificate").encode(),
                                  device_type=require_str(body, "device_type"),
                                  actor=actor(op), now=svc.clock.now(), audit=svc.audit,
                                  enrollment_approval=approval)
        return {"name": row.name, "subject": row.subject,
                "fingerprint_sha256": row.fingerprint_sha256, "device_type": row.device_type,
                "require_approval": row.enrollment_approval}
    return json_response(await svc.run(register), 201)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/ca", Role.AUDITOR, ca_info, "CAs: ours and registered OEM CAs",
          responses={200: Reply("every CA", items_of(ref("Ca")))}),
    Route("POST", "/v1/ca/oem", Role.ADMIN, register_oem, "Register a trusted OEM CA",
          {"type": "object", "required": ["name", "certificate", "device_type"],
           "additionalProperties": False,
           "properties": {"name": CA_NAME,
                          "certificate": {"type": "string",
                                          "description": "the OEM CA certificate, PEM"},
                          "device_type": TYPE_NAME,
                          "require_approval": {
                              "type": "boolean",
                              "description": "new devices wait for an operator's approval"}}},
          responses={201: Reply("registered", obj({
              "name": STRING, "subject": STRING, "fingerprint_sha256": SHA256_HEX,
              "device_type": STRING, "require_approval": BOOLEAN}))},
          errors={404: "no such device type",
                  409: "a CA with this name or certificate is registered",
                  422: "the certificate is not a CA certificate (basicConstraints cA)"}),
)
