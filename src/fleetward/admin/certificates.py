"""Admin API: certificates, per device (``/v1/devices/{device_id}/certificates``) and by
serial (``/v1/certificates/{serial}``)."""

from __future__ import annotations

from aiohttp import web

from fleetward.admin.base import AdminServices, Reply, Route, actor, json_response
from fleetward.admin.schemas import (
    CERTIFICATE_WITH_PEM,
    DEVICE_PROFILES,
    ISSUED_CERTIFICATE,
    REASON,
    items_of,
    nullable,
    ref,
)
from fleetward.model import Operator, Role, parse_serial
from fleetward.web.problem import read_json, reject_unknown_fields, require_str


async def list_device_certs(request: web.Request, svc: AdminServices,
                            op: Operator) -> web.Response:
    certs = await svc.run(svc.registry.list_certificates, request.match_info["device_id"])
    return json_response({"items": [c.to_json() for c in certs]})


async def issue_cert(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"csr", "profile"})
    record = await svc.run(svc.registry.issue_certificate, request.match_info["device_id"],
                           require_str(body, "csr").encode(),
                           require_str(body, "profile", optional=True, default="device"),
                           actor(op))
    out = record.to_json(with_pem=True)
    out["chain_pem"] = svc.authority.chain_pem()
    return json_response(out, 201)


async def revoke_device_certs(request: web.Request, svc: AdminServices,
                              op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"reason"})
    revoked = await svc.run(svc.registry.revoke_device_certificates,
                            request.match_info["device_id"],
                            require_str(body, "reason", optional=True, default="unspecified"),
                            actor(op))
    return json_response({"items": [c.to_json() for c in revoked]})


async def get_cert(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    serial = parse_serial(request.match_info["serial"])
    record = await svc.run(svc.registry.get_certificate, serial)
    return json_response(record.to_json(with_pem=True))


async def revoke_cert(request: web.Request, svc: AdminServices, op: Operator) -> web.Response:
    body = await read_json(request)
    reject_unknown_fields(body, {"reason"})
    serial = parse_serial(request.match_info["serial"])
    record = await svc.run(svc.registry.revoke_certificate, serial,
                           require_str(body, "reason", optional=True, default="unspecified"),
                           actor(op))
    return json_response(record.to_json())


REVOKE_BODY = {"type": "object", "additionalProperties": False,
               "properties": {"reason": nullable(REASON)}}
_CSR_REFUSED = ("the CSR is refused: a key type or extension the profile does not allow, a "
                "name other than the device's, or the device's state")

# Two tables: the admin table lists the device routes among the other device routes.
DEVICE_ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/devices/{device_id}/certificates", Role.AUDITOR, list_device_certs,
          "List a device's certificates",
          responses={200: Reply("every certificate of the device",
                                items_of(ref("Certificate")))},
          errors={404: "no such device"}),
    Route("POST", "/v1/devices/{device_id}/certificates", Role.OPERATOR, issue_cert,
          "Issue a certificate from a PKCS#10 CSR (PEM)",
          {"type": "object", "required": ["csr"], "additionalProperties": False,
           "properties": {"csr": {"type": "string",
                                  "description": "PKCS#10 request, PEM (RFC 7468 §7)"},
                          "profile": nullable({"enum": list(DEVICE_PROFILES),
                                               "description": "default device"})}},
          responses={201: Reply("issued; the device becomes active with its first one",
                                ISSUED_CERTIFICATE)},
          errors={404: "no such device", 422: _CSR_REFUSED}),
    Route("POST", "/v1/devices/{device_id}/revoke-certificates", Role.OPERATOR,
          revoke_device_certs, "Revoke every certificate of a device", REVOKE_BODY,
          responses={200: Reply("the certificates this call revoked",
                                items_of(ref("Certificate")))},
          errors={404: "no such device"}),
)
SERIAL_ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/certificates/{serial}", Role.AUDITOR, get_cert, "Show a certificate",
          responses={200: Reply("the certificate", CERTIFICATE_WITH_PEM)},
          errors={400: "not a hex serial", 404: "no certificate with this serial"}),
    Route("POST", "/v1/certificates/{serial}/revoke", Role.OPERATOR, revoke_cert,
          "Revoke a certificate (RFC 5280 reason)", REVOKE_BODY,
          responses={200: Reply("revoked", ref("Certificate"))},
          errors={404: "no certificate with this serial",
                  409: "it is already revoked",
                  422: "a CA or server certificate: not revocable through this route"}),
)
ROUTES: tuple[Route, ...] = DEVICE_ROUTES + SERIAL_ROUTES
