"""``fleetward`` commands. Everything here goes through the admin API.

Where the API lives: ``--data-dir`` / ``FLEETWARD_DATA_DIR`` on the server host (the
admin URL, token and CA chain are read from it), otherwise ``--admin-url`` with
``FLEETWARD_ADMIN_TOKEN`` (and ``--ca-file`` / ``FLEETWARD_ADMIN_CA``).
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import json
import os
import re
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any, NoReturn

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetward.cli.client import AdminClient, ApiError, resolve_connection
from fleetward.crypto.x509util import load_certificate, to_pem
from fleetward.errors import ConfigurationError, FleetwardError, InvalidInput
from fleetward.model import validate_device_id
from fleetward.policy import parse_document, validate_policy_name

app = typer.Typer(help="Fleetward: device identity, CA and lifecycle for IoT fleets.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
device_app = typer.Typer(help="Register devices and change their lifecycle state.",
                         no_args_is_help=True)
type_app = typer.Typer(help="Device types.", no_args_is_help=True)
cert_app = typer.Typer(help="Issue, list and revoke certificates.", no_args_is_help=True)
ca_app = typer.Typer(help="Certificate authorities.", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
operator_app = typer.Typer(help="Admin API tokens.", no_args_is_help=True)
token_app = typer.Typer(help="Bootstrap tokens for first enrollment (EST, RFC 7030).",
                        no_args_is_help=True)
enroll_app = typer.Typer(help="Approve or reject enrollments with manufacturer certificates.",
                         no_args_is_help=True)
factory_app = typer.Typer(help="Provision devices in batches on a production line.",
                          no_args_is_help=True)
app.add_typer(device_app, name="device")
app.add_typer(type_app, name="type")
app.add_typer(cert_app, name="cert")
app.add_typer(ca_app, name="ca")
app.add_typer(audit_app, name="audit")
app.add_typer(operator_app, name="operator")
app.add_typer(token_app, name="token")
app.add_typer(enroll_app, name="enroll")
app.add_typer(factory_app, name="factory")
policy_app = typer.Typer(help="Policies: what devices may publish, subscribe to and call.",
                         no_args_is_help=True)
app.add_typer(policy_app, name="policy")

out = Console()
err = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", envvar="FLEETWARD_DATA_DIR",
                                              help="data directory (on the server host)")]
AdminUrl = Annotated[str | None, typer.Option("--admin-url", envvar="FLEETWARD_ADMIN_URL",
                                              help="admin API URL, e.g. https://host:9443")]
CaFile = Annotated[Path | None, typer.Option("--ca-file", envvar="FLEETWARD_ADMIN_CA",
                                             help="CA chain that signed the admin API's cert")]
JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
TtlHours = Annotated[int | None, typer.Option("--ttl-hours", min=1,
                                              help="token lifetime in hours")]
Reason = Annotated[str, typer.Option("--reason", help="why; goes into the audit log")]


def fail(exc: FleetwardError, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
    err.print(f"[yellow]hint:[/] {exc.hint}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def api(data_dir: Path | None, admin_url: str | None, ca_file: Path | None
        ) -> Iterator[AdminClient]:
    try:
        client = AdminClient(resolve_connection(data_dir, admin_url, ca_file))
    except FleetwardError as exc:
        fail(exc)
    try:
        yield client
    except FleetwardError as exc:
        fail(exc)
    finally:
        client.close()


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    out.print(table)


def _labels(values: list[str] | None) -> dict[str, str]:
    labels = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(InvalidInput(f"bad label {item!r}", hint="use --label key=value"))
        labels[key] = value
    return labels


# --- device types ---------------------------------------------------------------------


@type_app.command("add")
def type_add(name: str, description: str = "",
             message_type: Annotated[list[str] | None, typer.Option(
                 "--message-type", help="allowed message type (repeatable)")] = None,
             profile: Annotated[list[str] | None, typer.Option(
                 "--profile", help="certificate profile (EST label) its devices may enroll "
                                   "for (repeatable; default: device)")] = None,
             data_dir: DataDir = None, admin_url: AdminUrl = None, ca_file: CaFile = None
             ) -> None:
    """Create a device type."""
    body: dict[str, Any] = {"name": name, "description": description,
                            "message_types": message_type or []}
    if profile:
        body["enrollment_profiles"] = profile
    with api(data_dir, admin_url, ca_file) as client:
        created = client.post("/v1/device-types", body)
    out.print(f"device type [bold]{name}[/] created (enrollment profiles: "
              f"{', '.join(created['enrollment_profiles'])})")


@type_app.command("list")
def type_list(as_json: JsonFlag = False, data_dir: DataDir = None, admin_url: AdminUrl = None,
              ca_file: CaFile = None) -> None:
    """List device types."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/device-types")["items"]
    if as_json:
        _print_json(items)
        return
    _table("Device types", ["name", "description", "message types", "enrollment profiles"],
           [[t["name"], t["description"], ", ".join(t["message_types"]),
             ", ".join(t["enrollment_profiles"])] for t in items])


# --- devices --------------------------------------------------------------------------


@device_app.command("add")
def device_add(device_id: Annotated[str, typer.Argument(metavar="ID")],
               type_name: Annotated[str, typer.Option("--type", help="device type")],
               owner: Annotated[str, typer.Option(help="owner / tenant")] = "default",
               label: Annotated[list[str] | None, typer.Option(
                   help="key=value (repeatable)")] = None,
               as_json: JsonFlag = False, data_dir: DataDir = None,
               admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Register a device (state: registered)."""
    with api(data_dir, admin_url, ca_file) as client:
        device = client.post("/v1/devices", {"id": device_id, "type": type_name,
                                             "owner": owner, "labels": _labels(label)})
    if as_json:
        _print_json(device)
    else:
        out.print(f"device [bold]{device['id']}[/] registered (type {device['type']}, "
                  f"owner {device['owner']})")


@device_app.command("list")
def device_list(state: str | None = None,
                type_name: Annotated[str | None, typer.Option("--type")] = None,
                owner: str | None = None, limit: int = 100,
                after: Annotated[str | None, typer.Option(help="page after this id")] = None,
                as_json: JsonFlag = False, data_dir: DataDir = None,
                admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """List devices, filtered and paged."""
    with api(data_dir, admin_url, ca_file) as client:
        page = client.get("/v1/devices", state=state, type=type_name, owner=owner,
                          limit=limit, after=after)
    if as_json:
        _print_json(page)
        return
    _table("Devices", ["id", "type", "owner", "state", "firmware", "last seen"],
           [[d["id"], d["type"], d["owner"], d["state"], d["firmware_version"],
             d["last_seen_at"]] for d in page["items"]])
    if page["next"]:
        out.print(f"more: --after {page['next']}")


@device_app.command("show")
def device_show(device_id: Annotated[str, typer.Argument(metavar="ID")],
                as_json: JsonFlag = False, data_dir: DataDir = None,
                admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Show one device and its certificates."""
    with api(data_dir, admin_url, ca_file) as client:
        device = client.get(f"/v1/devices/{device_id}")
        certs = client.get(f"/v1/devices/{device_id}/certificates")["items"]
    if as_json:
        _print_json({**device, "certificates": certs})
        return
    _table(f"Device {device_id}", ["field", "value"], [[k, v] for k, v in device.items()])
    _print_certs(certs)


@device_app.command("command")
def device_command(device_id: Annotated[str, typer.Argument(metavar="ID")],
                   name: Annotated[str, typer.Argument(metavar="NAME",
                                                       help="command name, e.g. reboot")],
                   payload: Annotated[str, typer.Option(
                       "--payload", help='a JSON object, e.g. \'{"seconds": 30}\'')] = "{}",
                   ttl_seconds: Annotated[int | None, typer.Option(
                       "--ttl-seconds", min=1,
                       help="expire if not answered by then (default: server setting)")
                   ] = None,
                   as_json: JsonFlag = False, data_dir: DataDir = None,
                   admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Queue a command for a device (delivered over MQTT or the HTTPS long-poll)."""
    try:
        body_payload = json.loads(payload)
    except json.JSONDecodeError as exc:
        fail(InvalidInput(f"--payload is not valid JSON: {exc.msg}",
                          hint='quote it for the shell, e.g. --payload \'{"seconds": 30}\''))
    if not isinstance(body_payload, dict):
        fail(InvalidInput("--payload must be a JSON object",
                          hint='wrap the value, e.g. --payload \'{"value": 5}\''))
    body: dict[str, Any] = {"name": name, "payload": body_payload}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    with api(data_dir, admin_url, ca_file) as client:
        command = client.post(f"/v1/devices/{_device_path(device_id)}/commands", body)
    if as_json:
        _print_json(command)
        return
    out.print(command["id"], highlight=False)
    err.print(f"queued [bold]{command['name']}[/] for {device_id}; expires "
              f"{command['expires_at']}", highlight=False)


@device_app.command("commands")
def device_commands(device_id: Annotated[str, typer.Argument(metavar="ID")],
                    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
                    as_json: JsonFlag = False, data_dir: DataDir = None,
                    admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """List a device's commands, newest first."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get(f"/v1/devices/{_device_path(device_id)}/commands",
                           limit=limit)["items"]
    if as_json:
        _print_json(items)
        return
    _table(f"Commands of {device_id}",
           ["id", "name", "status", "created", "expires", "completed", "result"],
           [[c["id"], c["name"], c["status"], c["created_at"], c["expires_at"],
             c["completed_at"],
             None if c["result"] is None else json.dumps(c["result"])[:60]] for c in items])


@device_app.command("messages")
def device_messages(device_id: Annotated[str, typer.Argument(metavar="ID")],
                    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
                    after: Annotated[int | None, typer.Option(
                        min=0, help="only messages after this id (follow with 'next')")
                    ] = None,
                    as_json: JsonFlag = False, data_dir: DataDir = None,
                    admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Show a device's stored telemetry and events (the SQL sink), oldest first."""
    with api(data_dir, admin_url, ca_file) as client:
        page = client.get(f"/v1/devices/{_device_path(device_id)}/messages", limit=limit,
                          after=after)
    if as_json:
        _print_json(page)
        return
    _table(f"Messages of {device_id}",
           ["id", "received", "kind", "type", "channel", "payload"],
           [[m["id"], m["received_at"], m["kind"], m["message_type"], m["channel"],
             json.dumps(m["payload"], sort_keys=True)[:80]] for m in page["items"]])
    if page["next"] is not None:
        out.print(f"newer: --after {page['next']}", highlight=False)


def _state_command(name: str, target: str, sources: list[str] | None, doc: str) -> None:
    def command(device_id: Annotated[str, typer.Argument(metavar="ID")], reason: Reason = "",
                data_dir: DataDir = None, admin_url: AdminUrl = None,
                ca_file: CaFile = None) -> None:
        with api(data_dir, admin_url, ca_file) as client:
            body: dict[str, Any] = {"state": target, "reason": reason}
            if sources is not None:
                body["from"] = sources
            result = client.post(f"/v1/devices/{device_id}/state", body)
        out.print(f"device [bold]{device_id}[/]: {result['previous_state']} → "
                  f"{result['device']['state']}")
        if result["revoked_certificates"]:
            out.print(f"revoked certificates: {', '.join(result['revoked_certificates'])}")
    command.__doc__ = doc
    device_app.command(name)(command)


# Verbs carry the operator's intent: `enable` never lifts a quarantine and `release`
# never re-enables a disabled device, although both end in `active`.
for _name, _target, _sources, _doc in (
    ("enable", "active", ["registered", "disabled"], "Activate a registered or disabled device."),
    ("disable", "disabled", None, "Disable a device (credentials kept)."),
    ("quarantine", "quarantined", None, "Quarantine a device: recovery routes only."),
    ("release", "active", ["quarantined"], "Release a quarantined device back to active."),
    ("compromise", "compromised", None, "Mark compromised: revokes every certificate."),
    ("retire", "retired", None, "Retire for good: revokes every certificate."),
):
    _state_command(_name, _target, _sources, _doc)


# --- certificates ---------------------------------------------------------------------


def _print_certs(certs: list[dict[str, Any]]) -> None:
    _table("Certificates", ["serial", "profile", "not after", "status", "reason"],
           [[c["serial"], c["profile"], c["not_after"], c["status"], c["revocation_reason"]]
            for c in certs])


def _csr_as_pem(data: bytes) -> str:
    """PEM text for a CSR file in PEM or DER (`openssl req -outform DER`); the server parses it."""
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            return data.decode("ascii")
        except UnicodeDecodeError:
            fail(InvalidInput("the CSR file is not ASCII PEM",
                              hint="re-export it with openssl req"))
    # DER: a PKCS#10 request is an ASN.1 SEQUENCE (tag 0x30, X.690 §8.9).
    if not data.startswith(b"\x30"):
        fail(InvalidInput("the CSR file is neither PEM nor DER",
                          hint="make one with: openssl req -new -key KEY -out req.csr"))
    body = base64.encodebytes(data).decode("ascii")
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


@cert_app.command("issue")
def cert_issue(device: Annotated[str, typer.Option("--device", help="device id")],
               csr: Annotated[Path, typer.Option("--csr", help="PKCS#10 CSR (PEM or DER)",
                                                 exists=True, dir_okay=False)],
               out_file: Annotated[Path, typer.Option("--out", help="where to write the PEM")],
               profile: str = "device",
               chain: Annotated[bool, typer.Option(help="append the CA chain to --out")] = False,
               data_dir: DataDir = None, admin_url: AdminUrl = None,
               ca_file: CaFile = None) -> None:
    """Issue a certificate for a registered device from its CSR (PEM or DER)."""
    csr_pem = _csr_as_pem(csr.read_bytes())
    target_dir = out_file.resolve().parent
    if not target_dir.is_dir() or not os.access(target_dir, os.W_OK) or out_file.is_dir():
        fail(InvalidInput(f"cannot write the certificate to {out_file}",
                          hint="pass --out with a file path in a writable directory"))
    with api(data_dir, admin_url, ca_file) as client:
        record = client.post(f"/v1/devices/{device}/certificates",
                             {"csr": csr_pem, "profile": profile})
    pem = record["pem"] + (record["chain_pem"] if chain else "")
    try:
        out_file.write_text(pem)
    except OSError as exc:
        # The certificate exists now; never lose it because the file could not be written.
        sys.stdout.write(pem)
        fail(InvalidInput(f"issued serial {record['serial']} but could not write {out_file}: "
                          f"{exc.strerror}", hint="the certificate was printed above instead"))
    out.print(f"issued serial [bold]{record['serial']}[/] to {device}, valid until "
              f"{record['not_after']} → {out_file}")


@cert_app.command("revoke")
def cert_revoke(serial: Annotated[str | None, typer.Argument(help="serial in hex")] = None,
                device: Annotated[str | None, typer.Option(
                    "--device", help="revoke every certificate of this device")] = None,
                reason: Annotated[str, typer.Option(help="RFC 5280 reason, e.g. keyCompromise")
                                  ] = "unspecified",
                data_dir: DataDir = None, admin_url: AdminUrl = None,
                ca_file: CaFile = None) -> None:
    """Revoke one certificate by serial, or all of a device's with --device."""
    if (serial is None) == (device is None):
        fail(InvalidInput("give either a SERIAL or --device ID",
                          hint="fleetward cert revoke 1a2b… or fleetward cert revoke --device d1"))
    with api(data_dir, admin_url, ca_file) as client:
        if serial is not None:
            record = client.post(f"/v1/certificates/{serial}/revoke", {"reason": reason})
            out.print(f"revoked {record['serial']} ({record['revocation_reason']})")
        else:
            items = client.post(f"/v1/devices/{device}/revoke-certificates",
                                {"reason": reason})["items"]
            out.print(f"revoked {len(items)} certificate(s) of {device}")


@cert_app.command("list")
def cert_list(device: Annotated[str, typer.Option("--device", help="device id")],
              as_json: JsonFlag = False, data_dir: DataDir = None,
              admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """List a device's certificates."""
    with api(data_dir, admin_url, ca_file) as client:
        certs = client.get(f"/v1/devices/{device}/certificates")["items"]
    if as_json:
        _print_json(certs)
    else:
        _print_certs(certs)


# --- CA -------------------------------------------------------------------------------


@ca_app.command("show")
def ca_show(as_json: JsonFlag = False, data_dir: DataDir = None, admin_url: AdminUrl = None,
            ca_file: CaFile = None) -> None:
    """Show our CAs and registered OEM CAs."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/ca")["items"]
    if as_json:
        _print_json(items)
        return
    _table("Certificate authorities",
           ["name", "kind", "subject", "key", "not after", "CRL #", "device type",
            "approval", "fingerprint (SHA-256)"],
           [[c["name"], c["kind"], c["subject"],
             f"{c['key_backend'] or '-'}{' (online)' if c['key_online'] else ''}",
             c["not_after"], c["crl_number"], c["device_type"],
             _approval_label(c.get("require_approval")), c["fingerprint_sha256"][:16] + "…"]
            for c in items])


def _approval_label(required: bool | None) -> str:
    """OEM CAs only: whether their new devices wait for `fleetward enroll approve`."""
    if required is None:
        return ""
    return "required" if required else "automatic"


@ca_app.command("add-oem")
def ca_add_oem(name: str,
               cert: Annotated[Path, typer.Option("--cert", exists=True, dir_okay=False,
                                                  help="OEM CA certificate (PEM or DER)")],
               device_type: Annotated[str, typer.Option("--device-type")],
               require_approval: Annotated[bool, typer.Option(
                   "--require-approval",
                   help="new devices wait for `fleetward enroll approve`")] = False,
               data_dir: DataDir = None, admin_url: AdminUrl = None,
               ca_file: CaFile = None) -> None:
    """Trust a manufacturer CA for enrollment with factory (IDevID) certificates."""
    try:
        cert_pem = to_pem(load_certificate(cert.read_bytes()))
    except ValueError:
        fail(InvalidInput(f"{cert} is not a PEM or DER certificate",
                          hint="pass the OEM CA certificate as the manufacturer gave it"))
    with api(data_dir, admin_url, ca_file) as client:
        row = client.post("/v1/ca/oem", {"name": name, "certificate": cert_pem,
                                         "device_type": device_type,
                                         "require_approval": require_approval})
    approval = ("; new devices wait for approval (fleetward enroll pending)"
                if row["require_approval"] else "")
    out.print(f"OEM CA [bold]{row['name']}[/] registered for type {row['device_type']}"
              f"{approval}")


# --- audit ----------------------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = None, admin_url: AdminUrl = None,
                 ca_file: CaFile = None) -> None:
    """Walk the hash chain; name the first edited, deleted, inserted or reordered row."""
    with api(data_dir, admin_url, ca_file) as client:
        report = client.get("/v1/audit/verify")
    if report["ok"]:
        out.print(f"[green]audit chain OK[/]: {report['rows_checked']} rows verified")
        return
    err.print(f"[bold red]audit chain BROKEN[/] at row {report['first_bad_seq']} "
              f"({report['kind']}): {report['message']}", highlight=False)
    raise typer.Exit(3)


@audit_app.command("tail")
def audit_tail(count: Annotated[int, typer.Option("-n", "--count")] = 20,
               action: Annotated[str | None, typer.Option(help="action prefix filter")] = None,
               as_json: JsonFlag = False, data_dir: DataDir = None,
               admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Show the newest audit events."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/audit", limit=count, action=action, order="desc")["items"]
    items.reverse()
    if as_json:
        _print_json(items)
        return
    _table("Audit log", ["seq", "at", "actor", "action", "target", "outcome"],
           [[e["seq"], e["at"], e["actor"], e["action"], e["target"], e["outcome"]]
            for e in items])


# --- operators ------------------------------------------------------------------------


@operator_app.command("add")
def operator_add(name: str, role: Annotated[str, typer.Option(help="admin|operator|auditor")],
                 data_dir: DataDir = None, admin_url: AdminUrl = None,
                 ca_file: CaFile = None) -> None:
    """Create an admin API token; it is printed once."""
    with api(data_dir, admin_url, ca_file) as client:
        created = client.post("/v1/operators", {"name": name, "role": role})
    err.print("store this token now; it cannot be shown again:")
    sys.stdout.write(created["token"] + "\n")


@operator_app.command("list")
def operator_list(data_dir: DataDir = None, admin_url: AdminUrl = None,
                  ca_file: CaFile = None) -> None:
    """List operator tokens (never the tokens themselves)."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/operators")["items"]
    _table("Operator tokens", ["token id", "name", "role", "created", "revoked"],
           [[t["token_id"], t["name"], t["role"], t["created_at"], t["revoked"]]
            for t in items])


@operator_app.command("revoke")
def operator_revoke(token_id: str, data_dir: DataDir = None, admin_url: AdminUrl = None,
                    ca_file: CaFile = None) -> None:
    """Revoke an operator token."""
    with api(data_dir, admin_url, ca_file) as client:
        client.request("DELETE", f"/v1/operators/{token_id}")
    out.print(f"token {token_id} revoked")


# --- bootstrap tokens -----------------------------------------------------------------

TOKEN_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
SHOWN_ONCE = ("this token is shown only once: store it now (or hand it to the device); "
              "it cannot be retrieved again")


def _device_path(device_id: str) -> str:
    """A device id checked before it becomes a URL path segment."""
    try:
        return validate_device_id(device_id)
    except InvalidInput as exc:
        fail(exc)


@token_app.command("create")
def token_create(device: Annotated[str | None, typer.Option(
                     "--device", help="a single-use token for this registered device")] = None,
                 type_name: Annotated[str | None, typer.Option(
                     "--type", help="a claim-batch token for new devices of this type")] = None,
                 count: Annotated[int | None, typer.Option(
                     "--count", min=1, help="with --type: how many devices it may enroll")
                                  ] = None,
                 owner: Annotated[str | None, typer.Option(
                     "--owner", help="with --type: owner of the devices it registers")] = None,
                 ttl_hours: TtlHours = None, as_json: JsonFlag = False,
                 data_dir: DataDir = None, admin_url: AdminUrl = None,
                 ca_file: CaFile = None) -> None:
    """Create a bootstrap token (--device ID, or --type T --count N); printed once."""
    if (device is None) == (type_name is None):
        fail(InvalidInput("give either --device ID or --type T --count N",
                          hint="fleetward token create --device d1, or "
                               "fleetward token create --type sensor --count 100"))
    body: dict[str, Any] = {} if ttl_hours is None else {"ttl_hours": ttl_hours}
    if device is not None:
        if count is not None or owner is not None:
            fail(InvalidInput("--count and --owner go with --type, not --device",
                              hint="a device token is single-use and the device has an owner"))
        path = f"/v1/devices/{_device_path(device)}/bootstrap-tokens"
    else:
        if count is None:
            fail(InvalidInput("--type needs --count", hint="e.g. --type sensor --count 100"))
        path = "/v1/bootstrap-tokens"
        body.update({"type": type_name, "count": count, "owner": owner})
    with api(data_dir, admin_url, ca_file) as client:
        created = client.post(path, body)
    err.print(f"[bold yellow]warning:[/] {SHOWN_ONCE}", highlight=False)
    if as_json:
        _print_json(created)
        return
    scope = (f"device {created['device_id']}" if device is not None else
             f"up to {created['max_uses']} new {created['device_type']} devices")
    err.print(f"bootstrap token {created['token_id']} for {scope}, expires "
              f"{created['expires_at']}", highlight=False)
    sys.stdout.write(created["token"] + "\n")


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(metavar="TOKEN_ID")],
                 data_dir: DataDir = None, admin_url: AdminUrl = None,
                 ca_file: CaFile = None) -> None:
    """Revoke a bootstrap token (its id: the hex between fwb_ and the dot)."""
    # Checked before it becomes a path segment: "../operators/…" must not reach the API.
    if not TOKEN_ID_PATTERN.fullmatch(token_id):
        fail(InvalidInput(f"invalid bootstrap token id {token_id!r}",
                          hint="the 16 hex characters between fwb_ and the dot; never pass "
                               "the whole token on the command line"))
    with api(data_dir, admin_url, ca_file) as client:
        client.delete(f"/v1/bootstrap-tokens/{token_id}")
    out.print(f"bootstrap token {token_id} revoked")


# --- approvals of manufacturer-certificate enrollments -----------------------------------


@enroll_app.command("pending")
def enroll_pending(limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
                   as_json: JsonFlag = False, data_dir: DataDir = None,
                   admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """List enrollments waiting for approval."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/enrollments", approval="pending", limit=limit)["items"]
    if as_json:
        _print_json(items)
        return
    if not items:
        out.print("no enrollments are waiting for approval")
        return
    _table("Enrollments waiting for approval",
           ["device", "OEM CA", "manufacturer certificate", "since"],
           [[b["device_id"], b["oem_ca"], b["idevid_subject"], b["created_at"]]
            for b in items])


def _decide(device_id: str, verb: str, data_dir: Path | None, admin_url: str | None,
            ca_file: Path | None) -> dict[str, Any]:
    with api(data_dir, admin_url, ca_file) as client:
        result: dict[str, Any] = client.request(
            "POST", f"/v1/enrollments/{_device_path(device_id)}/{verb}")
    return result


@enroll_app.command("approve")
def enroll_approve(device_id: Annotated[str, typer.Argument(metavar="ID")],
                   data_dir: DataDir = None, admin_url: AdminUrl = None,
                   ca_file: CaFile = None) -> None:
    """Approve a pending enrollment; the device gets its certificate when it retries."""
    binding = _decide(device_id, "approve", data_dir, admin_url, ca_file)
    out.print(f"enrollment of [bold]{binding['device_id']}[/] approved; the device gets its "
              "certificate on its next attempt")


@enroll_app.command("reject")
def enroll_reject(device_id: Annotated[str, typer.Argument(metavar="ID")],
                  data_dir: DataDir = None, admin_url: AdminUrl = None,
                  ca_file: CaFile = None) -> None:
    """Reject a pending enrollment; every further attempt is refused and audited."""
    binding = _decide(device_id, "reject", data_dir, admin_url, ca_file)
    out.print(f"enrollment of [bold]{binding['device_id']}[/] rejected; further attempts "
              "are refused")


# --- factory provisioning ---------------------------------------------------------------

FACTORY_CHUNK = 500  # devices per API call (the server's per-request maximum)
FACTORY_TIMEOUT_SECONDS = 300.0  # one chunk is one transaction of 500 devices and tokens
MANIFEST_COLUMNS = ["device_id", "token", "token_id", "expires_at"]
CSR_SUFFIXES = (".csr", ".pem", ".der")


def _progress() -> Progress:
    # On stderr, and only on a terminal: stdout and logs keep just the summary.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, disable=not err.is_terminal)


def _create_exclusive(path: Path) -> IO[str]:
    """Open a new file 0600; never an existing one (tokens are written exactly once).

    O_EXCL with O_CREAT also refuses a symlink planted at ``path`` (POSIX open(2)).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fail(InvalidInput(f"{path} already exists; it may hold tokens that cannot be "
                          "retrieved again", hint="choose another --out file"))
    except OSError as exc:
        fail(InvalidInput(f"cannot create {path}: {exc.strerror}",
                          hint="pass --out with a file path in a writable directory"))
    os.fchmod(fd, 0o600)  # whatever the umask says
    return os.fdopen(fd, "w", newline="", encoding="utf-8")


@factory_app.command("tokens")
def factory_tokens(type_name: Annotated[str, typer.Option("--type", help="device type")],
                   count: Annotated[int, typer.Option("--count", min=1,
                                                      help="how many devices")],
                   out_file: Annotated[Path, typer.Option(
                       "--out", help="new CSV manifest (0600): device_id,token,token_id,"
                                     "expires_at")],
                   owner: Annotated[str, typer.Option(help="owner / tenant")] = "default",
                   id_prefix: Annotated[str, typer.Option(
                       "--id-prefix", help="device ids are this + 12 random hex")] = "",
                   ttl_hours: TtlHours = None, data_dir: DataDir = None,
                   admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Register COUNT new devices, each with a single-use bootstrap token, into a manifest.

    The manifest is the only copy of the tokens: keep it safe and delete it once the
    devices are flashed.
    """
    created = 0
    body: dict[str, Any] = {"type": type_name, "owner": owner, "id_prefix": id_prefix}
    if ttl_hours is not None:
        body["ttl_hours"] = ttl_hours
    with api(data_dir, admin_url, ca_file) as client, _create_exclusive(out_file) as manifest:
        writer = csv.writer(manifest)
        writer.writerow(MANIFEST_COLUMNS)
        manifest.flush()
        try:
            with _progress() as progress:
                task = progress.add_task("registering devices", total=count)
                while created < count:
                    chunk = min(FACTORY_CHUNK, count - created)
                    items = client.post("/v1/factory/tokens", {**body, "count": chunk},
                                        timeout=FACTORY_TIMEOUT_SECONDS)["items"]
                    writer.writerows([[i[c] for c in MANIFEST_COLUMNS] for i in items])
                    manifest.flush()
                    os.fsync(manifest.fileno())  # the rows outlive a crash of this process
                    created += len(items)
                    progress.advance(task, len(items))
        except (FleetwardError, OSError, KeyboardInterrupt) as exc:
            _factory_tokens_failed(exc, created, count, out_file)
    out.print(f"registered {created} {type_name} devices; their tokens are in {out_file} "
              "(mode 0600), the only copy", highlight=False)


def _factory_tokens_failed(exc: BaseException, created: int, count: int,
                           out_file: Path) -> NoReturn:
    """Say what exists after a failed run: the rows already written stay in the manifest."""
    if created == 0:
        out_file.unlink(missing_ok=True)  # holds no token: do not block a re-run
        kept = "nothing was created"
    else:
        kept = f"created {created} of {count} devices; their rows are in {out_file}"
    # An API error means the server answered and rolled the request back. Otherwise
    # (connection lost, interrupted, manifest not writable) the last request may have
    # registered devices whose tokens never reached the manifest.
    orphans = ("" if isinstance(exc, ApiError) else
               "; the last request may have registered devices that are not in the "
               "manifest: find them with `fleetward device list --state registered` and "
               "give them tokens with `fleetward token create --device ID`")
    if isinstance(exc, KeyboardInterrupt):
        fail(InvalidInput(f"interrupted: {kept}", hint=f"run again for the rest{orphans}"), 130)
    if isinstance(exc, OSError):
        fail(InvalidInput(f"cannot write {out_file}: {exc.strerror} ({kept})",
                          hint=f"free space or fix permissions, then run again{orphans}"))
    if isinstance(exc, FleetwardError):
        fail(InvalidInput(f"{exc.message} ({kept})", hint=f"{exc.hint}{orphans}"))
    raise exc


@dataclass(frozen=True, slots=True)
class _SignJob:
    device_id: str
    csr_file: Path


class _Abort(Exception):
    """An error that every further request would hit too (no server, bad token)."""


def _sign_jobs(csr_dir: Path, manifest: Path | None) -> list[_SignJob]:
    """What to sign: the manifest's rows, else every <device-id>.csr/.pem/.der in the folder."""
    if manifest is None:
        jobs = [_SignJob(p.stem, p) for p in sorted(csr_dir.iterdir())
                if p.is_file() and p.suffix.lower() in CSR_SUFFIXES]
    else:
        try:
            with manifest.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not {"csr_file", "device_id"} <= set(reader.fieldnames or ()):
                    fail(InvalidInput(f"{manifest} needs the columns csr_file,device_id",
                                      hint="first line: csr_file,device_id"))
                jobs = [_SignJob((row["device_id"] or "").strip(),
                                 csr_dir / (row["csr_file"] or "").strip()) for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            fail(InvalidInput(f"cannot read the manifest {manifest}: {exc}",
                              hint="a UTF-8 CSV file with the columns csr_file,device_id"))
    if not jobs:
        fail(InvalidInput(f"no CSRs to sign in {manifest or csr_dir}",
                          hint="name the files <device-id>.csr (or .pem, .der), or pass "
                               "--manifest with the columns csr_file,device_id"))
    seen: dict[str, Path] = {}
    for job in jobs:
        if job.device_id in seen:
            fail(InvalidInput(f"two CSRs for device {job.device_id!r}: {seen[job.device_id]} "
                              f"and {job.csr_file}",
                              hint="one CSR per device; remove or rename one of them"))
        seen[job.device_id] = job.csr_file
    return jobs


def _load_csr(path: Path) -> x509.CertificateSigningRequest:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}",
                           hint="check the file name and permissions") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        raise InvalidInput(f"{path.name} is not a PKCS#10 CSR (PEM or DER)",
                           hint="make one with: openssl req -new -key KEY -out ID.csr") from None


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _already_signed(cert_file: Path, csr: x509.CertificateSigningRequest) -> bool:
    """True if ``cert_file`` holds a current certificate for the CSR's key."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False  # missing or unreadable: ask the server (which is idempotent)
    return (_spki(cert.public_key()) == _spki(csr.public_key())
            and cert.not_valid_after_utc > dt.datetime.now(dt.UTC))


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text, encoding="ascii")
    os.replace(tmp, path)


def _write_chain(client: AdminClient, out_dir: Path) -> None:
    order = {"issuing": 0, "root": 1}
    cas = sorted((c for c in client.get("/v1/ca")["items"] if c["kind"] in order),
                 key=lambda c: order[c["kind"]])
    chain = "".join(c["certificate_pem"] for c in cas)
    target = out_dir / "chain.pem"
    if not target.exists() or target.read_text(encoding="ascii", errors="replace") != chain:
        _write_atomically(target, chain)


def _sign_one(client: AdminClient, job: _SignJob, type_name: str, owner: str,
              out_dir: Path) -> bool:
    """Sign one CSR; True if a new certificate was issued, False if it already existed.

    Raises:
        InvalidInput, ApiError: this CSR failed.
        _Abort: the server cannot be used at all.
    """
    validate_device_id(job.device_id)
    csr = _load_csr(job.csr_file)
    target = out_dir / f"{job.device_id}.pem"
    if _already_signed(target, csr):
        return False
    try:
        result = client.post("/v1/factory/sign", {
            "type": type_name, "device_id": job.device_id, "owner": owner,
            "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode("ascii")})
    except ApiError as exc:
        if exc.status in (401, 403):
            raise _Abort(exc.message) from exc
        raise
    except ConfigurationError as exc:
        raise _Abort(exc.message) from exc
    try:
        _write_atomically(target, result["pem"])
    except OSError as exc:
        # The certificate exists on the server; a re-run fetches it again (reused).
        raise InvalidInput(f"signed serial {result['serial']} but cannot write {target}: "
                           f"{exc.strerror}", hint="fix the output folder and run again") from exc
    return not result["reused"]


@factory_app.command("sign")
def factory_sign(type_name: Annotated[str, typer.Option("--type", help="device type")],
                 csr_dir: Annotated[Path, typer.Option(
                     "--csr-dir", exists=True, file_okay=False,
                     help="folder of CSRs named <device-id>.csr / .pem / .der")],
                 out_dir: Annotated[Path, typer.Option(
                     "--out-dir", help="where <device-id>.pem and chain.pem are written")],
                 manifest: Annotated[Path | None, typer.Option(
                     "--manifest", exists=True, dir_okay=False,
                     help="CSV with columns csr_file,device_id instead of the naming rule")
                                     ] = None,
                 owner: Annotated[str, typer.Option(help="owner of newly registered devices")
                                  ] = "default",
                 data_dir: DataDir = None, admin_url: AdminUrl = None,
                 ca_file: CaFile = None) -> None:
    """Sign a folder of factory CSRs, registering the devices; safe to run again.

    A CSR whose certificate is already in --out-dir is skipped; the server returns the
    certificate it already issued for a CSR instead of issuing another.
    """
    jobs = _sign_jobs(csr_dir, manifest)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(InvalidInput(f"cannot create {out_dir}: {exc.strerror}",
                          hint="pass --out-dir with a writable folder"))
    signed, already, failures = 0, 0, []
    aborted: str | None = None
    with api(data_dir, admin_url, ca_file) as client:
        _write_chain(client, out_dir)
        with _progress() as progress:
            task = progress.add_task("signing", total=len(jobs))
            for index, job in enumerate(jobs):
                try:
                    if _sign_one(client, job, type_name, owner, out_dir):
                        signed += 1
                    else:
                        already += 1
                except _Abort as exc:
                    aborted = f"{exc}; {len(jobs) - index} CSR(s) not attempted"
                    break
                except FleetwardError as exc:
                    failures.append(f"{job.csr_file.name} ({job.device_id}): {exc.message}")
                progress.advance(task)
    for failure in failures:
        err.print(f"[bold red]failed:[/] {failure}", highlight=False)
    out.print(f"signed {signed}, already signed {already}, failed {len(failures)} "
              f"→ {out_dir}", highlight=False)
    if aborted:
        fail(InvalidInput(f"stopped: {aborted}",
                          hint="check the admin API and token, then run again; signed CSRs "
                               "are skipped"))
    if failures:
        raise typer.Exit(1)


# --- policies -------------------------------------------------------------------------


def _policy_name(name: str) -> str:
    """A policy name checked before it becomes a URL path segment."""
    try:
        return validate_policy_name(name)
    except InvalidInput as exc:
        fail(exc)


def _policy_target(type_name: str | None, device: str | None) -> tuple[str, str]:
    if (type_name is None) == (device is None):
        fail(InvalidInput("give either --type T or --device D",
                          hint="e.g. fleetward policy attach sensors-v2 --type sensor"))
    return ("type", type_name) if type_name is not None else ("device", device or "")


def _read_policy_file(path: Path) -> dict[str, Any]:
    """The document in ``path`` (JSON for .json, YAML for .yaml/.yml, else guessed),
    validated here first so that mistakes are named before anything is sent."""
    suffix = path.suffix.lower()
    fmt = "json" if suffix == ".json" else "yaml" if suffix in (".yaml", ".yml") else None
    try:
        data = path.read_bytes()
    except OSError as exc:
        fail(InvalidInput(f"cannot read {path}: {exc.strerror}",
                          hint="pass a readable JSON or YAML file"))
    try:
        return parse_document(data, fmt).to_json()
    except InvalidInput as exc:
        fail(InvalidInput(f"{path}: {exc.message}", hint=exc.hint))


def _attachments_text(items: list[dict[str, str]]) -> str:
    return ", ".join(f"{a['kind']}:{a['target']}" for a in items) or "-"


@policy_app.command("put")
def policy_put(name: str,
               file: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                                    help="policy document (JSON or YAML)")],
               data_dir: DataDir = None, admin_url: AdminUrl = None,
               ca_file: CaFile = None) -> None:
    """Create or replace a policy from a JSON or YAML file."""
    document = _read_policy_file(file)
    with api(data_dir, admin_url, ca_file) as client:
        stored = client.request("PUT", f"/v1/policies/{_policy_name(name)}", json=document)
    verb = "created" if stored["version"] == 1 else "replaced"
    out.print(f"policy [bold]{name}[/] {verb} (version {stored['version']}, "
              f"{stored['statements']} statements; attached to "
              f"{_attachments_text(stored['attachments'])})", highlight=False)


@policy_app.command("get")
def policy_get(name: str, as_json: JsonFlag = False, data_dir: DataDir = None,
               admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Show a policy's statements and where it is attached."""
    with api(data_dir, admin_url, ca_file) as client:
        policy = client.get(f"/v1/policies/{_policy_name(name)}")
    if as_json:
        _print_json(policy)
        return
    kind = "built-in" if policy["builtin"] else f"version {policy['version']}"
    out.print(f"policy [bold]{name}[/] ({kind}); attached to "
              f"{_attachments_text(policy['attachments'])}", highlight=False)
    _table(f"Policy {name}", ["sid", "effect", "actions", "resources"],
           [[st.get("sid", f"#{i}"), st["effect"], ", ".join(st["actions"]),
             "\n".join(st["resources"])]
            for i, st in enumerate(policy["document"]["statements"], start=1)])
    if policy.get("error"):
        err.print(f"[bold red]this stored document no longer validates[/] "
                  f"({policy['error']}); devices it applies to are denied everything",
                  highlight=False)


@policy_app.command("list")
def policy_list(as_json: JsonFlag = False, data_dir: DataDir = None,
                admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """List policies and where they are attached."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/policies")["items"]
    if as_json:
        _print_json(items)
        return
    _table("Policies", ["name", "version", "statements", "attached to"],
           [[p["name"], "built-in" if p["builtin"] else p["version"], p["statements"],
             _attachments_text(p["attachments"])] for p in items])


@policy_app.command("delete")
def policy_delete(name: str, data_dir: DataDir = None, admin_url: AdminUrl = None,
                  ca_file: CaFile = None) -> None:
    """Delete a policy (detach it everywhere first)."""
    with api(data_dir, admin_url, ca_file) as client:
        client.delete(f"/v1/policies/{_policy_name(name)}")
    out.print(f"policy [bold]{name}[/] deleted", highlight=False)


PolicyType = Annotated[str | None, typer.Option("--type", help="a device type")]
PolicyDevice = Annotated[str | None, typer.Option("--device", help="a device id")]


@policy_app.command("attach")
def policy_attach(name: str, type_name: PolicyType = None, device: PolicyDevice = None,
                  data_dir: DataDir = None, admin_url: AdminUrl = None,
                  ca_file: CaFile = None) -> None:
    """Attach a policy to a device type or a device; applies to live sessions."""
    kind, target = _policy_target(type_name, device)
    with api(data_dir, admin_url, ca_file) as client:
        result = client.post(f"/v1/policies/{_policy_name(name)}/attachments",
                             {kind: target})
    note = "" if result["changed"] else " (it already was)"
    out.print(f"policy [bold]{name}[/] attached to {kind} {target}{note}", highlight=False)


@policy_app.command("detach")
def policy_detach(name: str, type_name: PolicyType = None, device: PolicyDevice = None,
                  data_dir: DataDir = None, admin_url: AdminUrl = None,
                  ca_file: CaFile = None) -> None:
    """Detach a policy from a device type or a device."""
    kind, target = _policy_target(type_name, device)
    with api(data_dir, admin_url, ca_file) as client:
        client.request("DELETE", f"/v1/policies/{_policy_name(name)}/attachments",
                       params={kind: target})
    out.print(f"policy [bold]{name}[/] detached from {kind} {target}", highlight=False)


def _print_explanation(result: dict[str, Any], action: str, resource: str,
                       device: str) -> None:
    """One line per fact, never truncated (a table would cut resources at 80 columns).
    Every value is escaped: a topic may contain Rich markup such as "[bold]"."""
    def line(text: str) -> None:
        out.print(text, highlight=False, soft_wrap=True)

    e = rich_escape
    verdict = "[bold green]ALLOW[/]" if result["allowed"] else "[bold red]DENY[/]"
    line(f"{verdict} {e(action)} on {e(repr(resource))} for device {e(device)}")
    line(f"reason: {e(result['reason'])}")
    line("policies applied: " + ("quarantine (the device is quarantined)"
                                 if result["quarantined"] else e(", ".join(result["policies"]))))
    if not result["matched"]:
        line("no statement matched: denied by default")
    for m in result["matched"]:
        colour = "green" if m["effect"] == "allow" else "red"
        line(f"  matched: [{colour}]{m['effect']}[/] policy '{e(m['policy'])}' statement "
             f"'{e(m['statement'])}' resource {e(repr(m['resource']))} "
             f"(written {e(repr(m['template']))})")
    for u in result["unusable_resources"]:
        line(f"  unusable: {u['effect']} policy '{e(u['policy'])}' statement "
             f"'{e(u['statement'])}' resource {e(repr(u['template']))}: {e(u['reason'])} "
             f"→ {u['treated_as']}")


@policy_app.command("test")
def policy_test(device: Annotated[str, typer.Option("--device", help="device id")],
                action: Annotated[str, typer.Option(
                    "--action", help="mqtt:connect|publish|subscribe|receive, http:<METHOD>, "
                                     "est:reenroll, ota:download")],
                resource: Annotated[str, typer.Option(
                    "--resource", help="topic, topic filter (subscribe), client id "
                                       "(connect), request path without '/' (http)")],
                cert_serial: Annotated[str | None, typer.Option(
                    "--cert-serial", help="hex serial, to resolve ${cert.serial}")] = None,
                as_json: JsonFlag = False, data_dir: DataDir = None,
                admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Explain whether a device may do something, and which statement decided it.

    Exit code 0 when allowed, 1 when denied.
    """
    body: dict[str, Any] = {"device_id": device, "action": action, "resource": resource}
    if cert_serial is not None:
        body["cert_serial"] = cert_serial
    with api(data_dir, admin_url, ca_file) as client:
        result = client.post("/v1/policies/test", body)
    if as_json:
        _print_json(result)
    else:
        _print_explanation(result, action, resource, device)
    raise typer.Exit(0 if result["allowed"] else 1)
