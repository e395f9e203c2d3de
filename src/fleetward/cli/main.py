"""``fleetward`` commands. Everything here goes through the admin API.

Where the API lives: ``--data-dir`` / ``FLEETWARD_DATA_DIR`` on the server host (the
admin URL, token and CA chain are read from it), otherwise ``--admin-url`` with
``FLEETWARD_ADMIN_TOKEN`` (and ``--ca-file`` / ``FLEETWARD_ADMIN_CA``).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from fleetward.cli.client import AdminClient, resolve_connection
from fleetward.crypto.x509util import load_certificate, to_pem
from fleetward.errors import FleetwardError, InvalidInput

app = typer.Typer(help="Fleetward: device identity, CA and lifecycle for IoT fleets.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
device_app = typer.Typer(help="Register devices and change their lifecycle state.",
                         no_args_is_help=True)
type_app = typer.Typer(help="Device types.", no_args_is_help=True)
cert_app = typer.Typer(help="Issue, list and revoke certificates.", no_args_is_help=True)
ca_app = typer.Typer(help="Certificate authorities.", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
operator_app = typer.Typer(help="Admin API tokens.", no_args_is_help=True)
app.add_typer(device_app, name="device")
app.add_typer(type_app, name="type")
app.add_typer(cert_app, name="cert")
app.add_typer(ca_app, name="ca")
app.add_typer(audit_app, name="audit")
app.add_typer(operator_app, name="operator")

out = Console()
err = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", envvar="FLEETWARD_DATA_DIR",
                                              help="data directory (on the server host)")]
AdminUrl = Annotated[str | None, typer.Option("--admin-url", envvar="FLEETWARD_ADMIN_URL",
                                              help="admin API URL, e.g. https://host:9443")]
CaFile = Annotated[Path | None, typer.Option("--ca-file", envvar="FLEETWARD_ADMIN_CA",
                                             help="CA chain that signed the admin API's cert")]
JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
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
             data_dir: DataDir = None, admin_url: AdminUrl = None, ca_file: CaFile = None
             ) -> None:
    """Create a device type."""
    with api(data_dir, admin_url, ca_file) as client:
        client.post("/v1/device-types", {"name": name, "description": description,
                                         "message_types": message_type or []})
    out.print(f"device type [bold]{name}[/] created")


@type_app.command("list")
def type_list(as_json: JsonFlag = False, data_dir: DataDir = None, admin_url: AdminUrl = None,
              ca_file: CaFile = None) -> None:
    """List device types."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/device-types")["items"]
    if as_json:
        _print_json(items)
        return
    _table("Device types", ["name", "description", "message types"],
           [[t["name"], t["description"], ", ".join(t["message_types"])] for t in items])


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
           ["name", "kind", "subject", "key", "not after", "CRL #", "fingerprint (SHA-256)"],
           [[c["name"], c["kind"], c["subject"],
             f"{c['key_backend'] or '-'}{' (online)' if c['key_online'] else ''}",
             c["not_after"], c["crl_number"], c["fingerprint_sha256"][:16] + "…"]
            for c in items])


@ca_app.command("add-oem")
def ca_add_oem(name: str,
               cert: Annotated[Path, typer.Option("--cert", exists=True, dir_okay=False,
                                                  help="OEM CA certificate (PEM or DER)")],
               device_type: Annotated[str, typer.Option("--device-type")],
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
                                         "device_type": device_type})
    out.print(f"OEM CA [bold]{row['name']}[/] registered for type {row['device_type']}")


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
