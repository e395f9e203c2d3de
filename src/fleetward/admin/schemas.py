"""JSON Schemas (2020-12, as OpenAPI 3.1 uses them) of what the admin API takes and returns.

Request schemas state the constraints the handlers and services enforce, taken from the
validators themselves (``DEVICE_ID_PATTERN``, ``POLICY_NAME_PATTERN`` ...), so a request
the document calls valid is not refused for its shape. Response schemas mirror the
``to_json`` methods and handler dicts field by field and forbid other fields, so an
undocumented field fails ``tests/integration/test_openapi_schemathesis.py``.
"""

from __future__ import annotations

import re
from typing import Any

from fleetward.admin.base import DEFAULT_TOKEN_TTL_HOURS, MAX_TOKEN_TTL_HOURS
from fleetward.audit.log import PROBLEM_KINDS
from fleetward.ca.reasons import REASONS
from fleetward.ca.setup import CA_NAME_PATTERN
from fleetward.model import LifecycleState, Role
from fleetward.model.device import DEVICE_ID_PATTERN, TYPE_NAME_PATTERN
from fleetward.policy import ACTIONS
from fleetward.policy.document import (
    MAX_ACTIONS,
    MAX_RESOURCE_BYTES,
    MAX_RESOURCES,
    MAX_STATEMENTS,
    POLICY_NAME_PATTERN,
    POLICY_VERSION,
    SID_PATTERN,
    WILDCARD_ACTIONS,
)
from fleetward.store import device_commands as command_rows
from fleetward.store import oem as oem_rows
from fleetward.store.device_credentials import SLOTS
from fleetward.store.policies import TARGET_KINDS
from fleetward.tokens.access import BINDINGS
from fleetward.tokens.api_keys import API_KEY_SCOPES
from fleetward.tokens.credentials import (
    CREDENTIAL_ID_PATTERN,
    KINDS,
    MAX_PUBLIC_KEY_PEM_CHARS,
    SYMMETRIC_KEY_BYTES,
)
from fleetward.tokens.scopes import MAX_SCOPE_CHARS, SCOPES
from fleetward.tokens.service import MAX_JTI_CHARS

Schema = dict[str, Any]


def anchored(pattern: re.Pattern[str]) -> str:
    """An ECMA-262 pattern (what JSON Schema uses) matching what ``pattern.fullmatch``
    accepts: JSON Schema patterns are unanchored searches."""
    text = pattern.pattern.removeprefix("^").removesuffix("$")
    return f"^(?:{text})$"


def obj(properties: dict[str, Schema], optional: tuple[str, ...] = (),
        description: str | None = None) -> Schema:
    """An object with exactly ``properties``, all required except ``optional``."""
    out: Schema = {"type": "object",
                   "required": [k for k in properties if k not in optional],
                   "additionalProperties": False, "properties": properties}
    if description:
        out["description"] = description
    return out


def items_of(schema: Schema, **extra: Schema) -> Schema:
    """A list response: ``{"items": [...]}`` plus ``extra`` members."""
    return obj({"items": {"type": "array", "items": schema}, **extra})


def nullable(schema: Schema) -> Schema:
    """``schema`` or null: for responses' empty fields, and for optional request fields,
    where the handlers read null as "not given" (``require_str(optional=True)``)."""
    out = dict(schema)
    kind = out.get("type")
    if isinstance(kind, str):
        out["type"] = [kind, "null"]
        return out
    if "enum" in out and "type" not in out:
        out["enum"] = [*out["enum"], None]
        return out
    return {"anyOf": [schema, {"type": "null"}]}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


# --- scalars --------------------------------------------------------------------------

STRING: Schema = {"type": "string"}
# What requests may send where a string reaches a text column or a lookup: anything but
# U+0000, which PostgreSQL text cannot hold (web.problem refuses it with 400).
TEXT: Schema = {"type": "string", "pattern": "^[^\\u0000]*$"}
BOOLEAN: Schema = {"type": "boolean"}
COUNT: Schema = {"type": "integer", "minimum": 0}
DATE_TIME: Schema = {"type": "string", "format": "date-time"}
DATE_TIME_OR_NULL = nullable(DATE_TIME)
STRING_OR_NULL = nullable(STRING)
SHA256_HEX: Schema = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
DEVICE_ID: Schema = {"type": "string", "pattern": anchored(DEVICE_ID_PATTERN),
                     "description": "1-128 characters: letters, digits and . _ : -, "
                                    "starting with a letter or digit"}
TYPE_NAME: Schema = {"type": "string", "pattern": anchored(TYPE_NAME_PATTERN),
                     "description": "1-64 characters: a-z, 0-9, _ and -, starting with a "
                                    "letter or digit"}
POLICY_NAME: Schema = {"type": "string", "pattern": anchored(POLICY_NAME_PATTERN),
                       "description": "1-64 characters: a-z, 0-9, _ and -, starting with a "
                                      "letter or digit"}
CA_NAME: Schema = {"type": "string", "pattern": anchored(CA_NAME_PATTERN)}
OWNER: Schema = {**TEXT, "minLength": 1, "maxLength": 128}
STATE: Schema = {"enum": [s.value for s in LifecycleState]}
ROLE: Schema = {"enum": [r.value for r in Role]}
TOKEN_ID: Schema = {"type": "string", "pattern": "^[0-9a-f]{16}$",
                    "description": "the 16 hex digits after the token's prefix"}
# As the server prints serials (format_serial): lower-case hex, no leading zeros.
SERIAL: Schema = {"type": "string", "pattern": "^[1-9a-f][0-9a-f]*$"}
# As it reads them (parse_serial): also upper case, a 0x prefix and colons between
# digits, as `openssl x509 -serial` and `-text` print them; never zero.
SERIAL_INPUT: Schema = {"type": "string",
                        "pattern": "^(?:0[xX])?[0-9A-Fa-f:]*[1-9A-Fa-f][0-9A-Fa-f:]*$",
                        "description": "hex, e.g. 1a2b or 1A:2B; a 0x prefix is allowed"}
# parse_reason accepts RFC 5280 names in snake_case, camelCase and kebab-case.
REASON: Schema = {"enum": sorted({spelling for name in REASONS for spelling in (
    name, name.replace("_", "-"),
    name.split("_")[0] + "".join(w.capitalize() for w in name.split("_")[1:]))}),
    "description": "RFC 5280 §5.3.1 reason (default unspecified)"}
ACTION: Schema = {"enum": list(ACTIONS)}
# The profiles a device type may list and an operator may issue for (Registry refuses
# "ca" and "server" there).
DEVICE_PROFILES = ("device", "gateway", "bootstrap")
TTL_HOURS: Schema = {"type": "integer", "minimum": 1, "maximum": MAX_TOKEN_TTL_HOURS,
                     "description": f"token lifetime in hours (default "
                                    f"{DEFAULT_TOKEN_TTL_HOURS})"}

# --- model objects ------------------------------------------------------------------------

DEVICE = obj({
    "id": STRING, "type": STRING, "owner": STRING, "state": STATE,
    "labels": {"type": "object", "additionalProperties": STRING},
    "firmware_version": STRING_OR_NULL, "created_at": DATE_TIME_OR_NULL,
    "updated_at": DATE_TIME_OR_NULL, "last_seen_at": DATE_TIME_OR_NULL})

DEVICE_TYPE = obj({
    "name": STRING, "description": STRING,
    "message_types": {"type": "array", "items": STRING},
    "enrollment_profiles": {"type": "array", "items": STRING}})

_CERTIFICATE_FIELDS: dict[str, Schema] = {
    "serial": SERIAL, "fingerprint_sha256": SHA256_HEX, "ca": STRING, "profile": STRING,
    "device_id": STRING_OR_NULL, "subject": STRING, "not_before": DATE_TIME,
    "not_after": DATE_TIME, "status": {"enum": ["valid", "revoked"]},
    "revoked_at": DATE_TIME_OR_NULL, "revocation_reason": STRING_OR_NULL,
    "issued_at": DATE_TIME_OR_NULL, "superseded_by": nullable(SERIAL),
    "revoke_after": DATE_TIME_OR_NULL}
CERTIFICATE = obj(_CERTIFICATE_FIELDS)
CERTIFICATE_WITH_PEM = obj({**_CERTIFICATE_FIELDS, "pem": STRING})
ISSUED_CERTIFICATE = obj({**_CERTIFICATE_FIELDS, "pem": STRING,
                          "chain_pem": {"type": "string",
                                        "description": "issuing CA, then root, PEM"}})

COMMAND = obj({
    "id": STRING, "device_id": STRING, "name": STRING, "payload": {"type": "object"},
    "status": {"enum": [command_rows.PENDING, command_rows.DELIVERED,
                        command_rows.SUCCEEDED, command_rows.FAILED, command_rows.EXPIRED]},
    "created_by": STRING, "created_at": DATE_TIME, "expires_at": DATE_TIME,
    "delivered_at": DATE_TIME_OR_NULL, "completed_at": DATE_TIME_OR_NULL,
    "result": nullable({"type": "object"})})

MESSAGE = obj({
    "id": {"type": "integer", "minimum": 1}, "device_id": STRING, "device_type": STRING,
    "kind": {"enum": ["telemetry", "event"]}, "message_type": STRING,
    "channel": {"enum": ["mqtt", "https"]}, "topic": STRING_OR_NULL, "payload": {},
    "received_at": DATE_TIME})

APPROVALS = [oem_rows.APPROVAL_NONE, oem_rows.APPROVAL_PENDING, oem_rows.APPROVAL_APPROVED,
             oem_rows.APPROVAL_REJECTED]
OEM_BINDING = obj({
    "device_id": STRING, "oem_ca": STRING, "idevid_subject": STRING,
    "idevid_sha256": SHA256_HEX, "approval": {"enum": APPROVALS}, "created_at": DATE_TIME,
    "decided_at": DATE_TIME_OR_NULL, "decided_by": STRING_OR_NULL})

AUDIT_RECORD = obj({
    "seq": {"type": "integer", "minimum": 1}, "at": DATE_TIME_OR_NULL, "actor": STRING,
    "action": STRING, "target": STRING, "outcome": {"enum": ["success", "failure"]},
    "details": {"type": "object"}, "hash": SHA256_HEX})

AUDIT_VERIFICATION = obj({
    "ok": BOOLEAN, "rows_checked": COUNT, "first_bad_seq": {"type": "integer"},
    "kind": {"enum": sorted(PROBLEM_KINDS)}, "message": STRING},
    optional=("first_bad_seq", "kind", "message"),
    description="ok, or the first bad row and what happened to it")

CA = obj({
    "name": STRING, "kind": {"enum": ["root", "issuing", "oem"]}, "parent": STRING_OR_NULL,
    "subject": STRING, "fingerprint_sha256": SHA256_HEX, "device_type": STRING_OR_NULL,
    "imported": BOOLEAN, "key_backend": STRING_OR_NULL, "key_online": BOOLEAN,
    "not_after": DATE_TIME_OR_NULL, "crl_number": nullable({"type": "integer"}),
    "crl_next_update": DATE_TIME_OR_NULL, "require_approval": nullable(BOOLEAN),
    "certificate_pem": STRING})

OPERATOR = obj({"token_id": TOKEN_ID, "name": STRING, "role": ROLE, "created_at": DATE_TIME,
                "revoked": BOOLEAN})

ATTACHMENT = obj({"kind": {"enum": list(TARGET_KINDS)}, "target": STRING})

_POLICY_FIELDS: dict[str, Schema] = {
    "name": STRING, "version": {"type": "integer", "minimum": 0,
                                "description": "0 for built-in policies, +1 on every put"},
    "builtin": BOOLEAN, "statements": COUNT,
    "attachments": {"type": "array", "items": ATTACHMENT},
    "created_at": DATE_TIME_OR_NULL, "updated_at": DATE_TIME_OR_NULL,
    "error": {"type": "string", "description": "the stored document no longer validates"}}
POLICY_SUMMARY = obj(_POLICY_FIELDS, optional=("error",))
POLICY = obj({**_POLICY_FIELDS, "document": ref("PolicyDocument")}, optional=("error",))

_STATEMENT = obj({
    "sid": nullable({"type": "string", "pattern": anchored(SID_PATTERN),
                     "description": "names the statement in decisions; unique"}),
    "effect": {"enum": ["allow", "deny"]},
    "actions": {"type": "array", "minItems": 1, "maxItems": MAX_ACTIONS,
                "uniqueItems": True, "items": {"enum": [*ACTIONS, *WILDCARD_ACTIONS]}},
    "resources": {"type": "array", "minItems": 1, "maxItems": MAX_RESOURCES, "items": {
        **TEXT, "minLength": 1, "maxLength": MAX_RESOURCE_BYTES,
        "description": "an MQTT topic filter (MQTT 5.0 §4.7) that may hold ${device.id}, "
                       "${device.type}, ${device.owner}, ${cert.serial}; at most "
                       f"{MAX_RESOURCE_BYTES} UTF-8 bytes; HTTP resources without a "
                       "leading '/'"}}}, optional=("sid",))
POLICY_DOCUMENT = obj({
    "version": {"enum": [POLICY_VERSION]},
    "statements": {"type": "array", "minItems": 1, "maxItems": MAX_STATEMENTS,
                   "items": _STATEMENT,
                   "description": "statement ids (sid) are unique within a document"}},
    optional=("version",),
    description="at most 64 KiB; the server also checks each resource's topic-filter "
                "syntax and variables")

_KIND = {"enum": list(TARGET_KINDS)}
_NAMES: Schema = {"type": "array", "items": STRING}
EFFECTIVE_POLICIES = obj({
    "kind": _KIND, "target": STRING, "device_type": STRING,
    "policies": {**_NAMES, "description": "in the order the data plane compiles them"},
    "device_policies": _NAMES, "type_policies": _NAMES,
    "implicit_default": {"type": "boolean", "description": "nothing is attached: the "
                                                           "built-in default applies"},
    "mqtt_connect": BOOLEAN, "quarantined": BOOLEAN})
ATTACHMENT_CHANGE = obj({
    "policy": STRING, "kind": _KIND, "target": STRING,
    "changed": {"type": "boolean", "description": "false: it already was attached"},
    "effective": EFFECTIVE_POLICIES,
    "warnings": {"type": "array", "items": obj({"code": STRING, "message": STRING,
                                                "hint": STRING})}})

_MATCH = obj({"policy": STRING, "statement": STRING, "effect": {"enum": ["allow", "deny"]},
              "resource": STRING, "template": STRING})
_UNUSABLE = obj({"policy": STRING, "statement": STRING, "effect": {"enum": ["allow", "deny"]},
                 "template": STRING, "reason": STRING,
                 "treated_as": {"enum": ["dropped", "deny everything"]}})
EXPLANATION = obj({
    "device_id": STRING, "device_type": STRING, "owner": STRING, "state": STATE,
    "quarantined": BOOLEAN, "action": ACTION, "resource": STRING,
    "policies": {"type": "array", "items": STRING}, "allowed": BOOLEAN, "reason": STRING,
    "policy": STRING_OR_NULL, "statement": STRING_OR_NULL,
    "matched": {"type": "array", "items": _MATCH},
    "unusable_resources": {"type": "array", "items": _UNUSABLE}})

# --- device credentials, API keys and access tokens (docs/credentials.md) -----------------

BASE64URL_SHA256: Schema = {"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$",
                            "description": "base64url SHA-256, no padding (RFC 7638 "
                                           "thumbprint)"}
CREDENTIAL_ID: Schema = {"type": "string", "pattern": anchored(CREDENTIAL_ID_PATTERN),
                         "description": "sk_ (symmetric keys) or pk_ (a public key) and 16 "
                                        "hex digits"}
SYMMETRIC_CREDENTIAL_ID: Schema = {"type": "string", "pattern": "^sk_[0-9a-f]{16}$",
                                   "description": "a symmetric credential: sk_ and 16 hex "
                                                  "digits"}
API_KEY_ID: Schema = {"type": "string", "pattern": "^[0-9a-f]{16}$",
                      "description": "the 16 hex digits between fwk_ and the dot"}
SLOT: Schema = {"enum": list(SLOTS)}
# Standard base64 with padding, as Azure IoT Hub shows device keys.
_B64_CHARS = 4 * ((SYMMETRIC_KEY_BYTES + 2) // 3)
_B64_PAD = (3 - SYMMETRIC_KEY_BYTES % 3) % 3
SYMMETRIC_KEY: Schema = {
    "type": "string", "pattern": f"^[A-Za-z0-9+/]{{{_B64_CHARS - _B64_PAD}}}={{{_B64_PAD}}}$",
    "description": f"{SYMMETRIC_KEY_BYTES} random bytes, base64; shown once, stored only "
                   "encrypted"}
PUBLIC_KEY_PEM: Schema = {**TEXT, "minLength": 1, "maxLength": MAX_PUBLIC_KEY_PEM_CHARS,
                          "description": "an EC P-256 public key, PEM SubjectPublicKeyInfo "
                                         "(-----BEGIN PUBLIC KEY-----)"}
CERTIFICATE_PEM: Schema = {**TEXT, "minLength": 1,
                           "description": "a certificate of the device, PEM"}
_SCOPE_NAME = "(?:" + "|".join(re.escape(s) for s in SCOPES) + ")"
SCOPE: Schema = {"type": "string", "maxLength": MAX_SCOPE_CHARS,
                 "pattern": f"^(?:{_SCOPE_NAME}(?: {_SCOPE_NAME})*)?$",
                 "description": "scopes separated by single spaces (RFC 6749 §3.3): "
                                f"{' '.join(SCOPES)}; empty or absent: every scope the "
                                "device's policy opens something of"}
JTI: Schema = {"type": "string", "pattern": f"^[A-Za-z0-9_-]{{1,{MAX_JTI_CHARS}}}$",
               "description": "an access token's jti claim"}
# What TokenService.inspect / introspect compare with the token's cnf: what the client
# presented (RFC 7662 extension parameter, docs/credentials.md "Introspection").
PRESENTED_CNF: Schema = {
    "type": "object", "additionalProperties": False, "maxProperties": 1,
    "properties": {"x5t#S256": TEXT, "jkt": TEXT},
    "description": "what the client presented: {} (nothing), {\"x5t#S256\": …} (a "
                   "certificate) or {\"jkt\": …} (a DPoP key)"}

_CREDENTIAL_FIELDS: dict[str, Schema] = {
    "id": CREDENTIAL_ID, "device_id": STRING, "kind": {"enum": list(KINDS)},
    "status": {"enum": ["active", "revoked"]}, "jkt": nullable(BASE64URL_SHA256),
    "primary_version": nullable({"type": "integer", "minimum": 1,
                                 "description": "symmetric keys: +1 on every rotation"}),
    "secondary_version": nullable({"type": "integer", "minimum": 1}),
    "created_at": DATE_TIME, "created_by": STRING, "rotated_at": DATE_TIME_OR_NULL,
    "revoked_at": DATE_TIME_OR_NULL}
CREDENTIAL = obj(_CREDENTIAL_FIELDS, description="never key material")
NEW_SYMMETRIC_CREDENTIAL = obj({**_CREDENTIAL_FIELDS, "primary_key": SYMMETRIC_KEY,
                                "secondary_key": SYMMETRIC_KEY})
NEW_SLOT_KEY = obj({"id": SYMMETRIC_CREDENTIAL_ID, "device_id": STRING, "slot": SLOT,
                    "version": {"type": "integer", "minimum": 2}, "key": SYMMETRIC_KEY})

_API_KEY_FIELDS: dict[str, Schema] = {
    "id": API_KEY_ID, "name": STRING,
    "scopes": {"type": "array", "items": {"enum": list(API_KEY_SCOPES)}},
    "created_at": DATE_TIME, "created_by": STRING, "expires_at": DATE_TIME_OR_NULL,
    "rotated_at": DATE_TIME_OR_NULL, "revoked_at": DATE_TIME_OR_NULL,
    "previous_valid_until": {**DATE_TIME_OR_NULL,
                             "description": "the previous secret works until then"}}
API_KEY = obj(_API_KEY_FIELDS, description="never the secret or its hash")
NEW_API_KEY = obj({**_API_KEY_FIELDS, "key": {
    "type": "string", "pattern": "^fwk_[0-9a-f]{16}\\.[A-Za-z0-9_-]{43}$",
    "description": "shown once; stored only as a SHA-256"}})

TOKEN_KEY = obj({
    "kid": BASE64URL_SHA256,
    "active": {"type": "boolean", "description": "new tokens are signed with it"},
    "created_at": DATE_TIME, "retired_at": DATE_TIME_OR_NULL,
    "verify_until": {**DATE_TIME_OR_NULL,
                     "description": "tokens it signed are refused from then on; null "
                                    "while it signs"}})

ACCESS_TOKEN_GRANT = obj({
    "access_token": {"type": "string", "description": "an ES256 JWT (RFC 9068); not stored"},
    "token_type": {"enum": ["Bearer", "DPoP"]},
    "expires_in": {"type": "integer", "minimum": 1, "description": "seconds"},
    "scope": STRING, "jti": STRING})
_JSON_OBJECT_OR_NULL = nullable({"type": "object"})
TOKEN_INSPECTION = obj({
    "valid": BOOLEAN,
    "reason": {"type": "string", "description": "\"valid\", or why not"},
    "header": {**_JSON_OBJECT_OR_NULL, "description": "the JWS header, unverified"},
    "claims": {**_JSON_OBJECT_OR_NULL, "description": "the claims, unverified"},
    "binding": obj({"kind": {"enum": list(BINDINGS)}, "thumbprint": STRING_OR_NULL}),
    "device_id": STRING}, optional=("binding", "device_id"),
    description="binding and device_id when the signature and claims verified")

# RFC 9457 §3.1 members, as web/problem.py and FleetwardError.to_problem() write them.
PROBLEM: Schema = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "hint", "instance"],
    "properties": {
        "type": {"type": "string", "format": "uri-reference",
                 "description": "https://fleetward.dev/problems/<kind>, or about:blank "
                                "for routing errors"},
        "title": STRING,
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": STRING,
        "hint": {"type": "string", "description": "what the caller can do about it"},
        "instance": {"type": "string", "format": "uri-reference",
                     "description": "the request path"},
    },
    # Extension members (RFC 9457 §3.2), e.g. "allowed" on an illegal transition or
    # "attachments" when a policy cannot be deleted.
    "additionalProperties": True,
}

COMPONENTS: dict[str, Schema] = {
    "Problem": PROBLEM, "Device": DEVICE, "DeviceType": DEVICE_TYPE,
    "Certificate": CERTIFICATE, "Command": COMMAND, "Message": MESSAGE,
    "OemBinding": OEM_BINDING, "AuditRecord": AUDIT_RECORD, "Ca": CA,
    "Operator": OPERATOR, "Policy": POLICY, "PolicySummary": POLICY_SUMMARY,
    "PolicyDocument": POLICY_DOCUMENT, "PolicyExplanation": EXPLANATION,
    "AttachmentChange": ATTACHMENT_CHANGE, "Credential": CREDENTIAL, "ApiKey": API_KEY,
    "TokenKey": TOKEN_KEY,
}
