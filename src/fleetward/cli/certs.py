"""``fleetward cert``: issue, list and revoke certificates."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from fleetward.cli.common import (
    AdminUrl,
    App,
    CaFile,
    DataDir,
    JsonFlag,
    api,
    device_path,
    fail,
    out,
    print_json,
    table,
)
from fleetward.errors import InvalidInput
from fleetward.model import parse_serial, validate_device_id

app = App(help="Issue, list and revoke certificates.", no_args_is_help=True)


def print_certs(certs: list[dict[str, Any]]) -> None:
    table("Certificates", ["serial", "profile", "not after", "status", "reason"],
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


@app.command("issue")
def cert_issue(device: Annotated[str, typer.Option("--device", help="device id")],
               csr: Annotated[Path, typer.Option("--csr", help="PKCS#10 CSR (PEM or DER)",
                                                 exists=True, dir_okay=False)],
               out_file: Annotated[Path, typer.Option("--out", help="where to write the PEM")],
               profile: str = "device",
               chain: Annotated[bool, typer.Option(
                   "--chain", help="append the CA chain to --out")] = False,
               data_dir: DataDir = None, admin_url: AdminUrl = None,
               ca_file: CaFile = None) -> None:
    """Issue a certificate for a registered device from its CSR (PEM or DER)."""
    csr_pem = _csr_as_pem(csr.read_bytes())
    target_dir = out_file.resolve().parent
    if not target_dir.is_dir() or not os.access(target_dir, os.W_OK) or out_file.is_dir():
        fail(InvalidInput(f"cannot write the certificate to {out_file}",
                          hint="pass --out with a file path in a writable directory"))
    with api(data_dir, admin_url, ca_file) as client:
        record = client.post(f"/v1/devices/{device_path(device)}/certificates",
                             {"csr": csr_pem, "profile": profile})
    pem = record["pem"] + (record["chain_pem"] if chain else "")
    try:
        out_file.write_text(pem)
    except OSError as exc:
        # The certificate exists now; never lose it because the file could not be written.
        sys.stdout.write(pem)
        fail(InvalidInput(f"issued serial {record['serial']} but could not write {out_file}: "
                          f"{exc.strerror}", hint="the certificate was printed above instead"))
    out.print(f"issued serial [bold]{escape(record['serial'])}[/] to {escape(device)}, valid "
              f"until {escape(record['not_after'])} → {escape(str(out_file))}")


@app.command("revoke")
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
    # Both are checked before they become a URL path segment ("../operators/…").
    try:
        serial_hex = None if serial is None else format(parse_serial(serial), "x")
        device_id = None if device is None else validate_device_id(device)
    except InvalidInput as exc:
        fail(exc)
    with api(data_dir, admin_url, ca_file) as client:
        if serial_hex is not None:
            record = client.post(f"/v1/certificates/{serial_hex}/revoke", {"reason": reason})
            out.print(f"revoked {record['serial']} ({record['revocation_reason']})",
                      markup=False)
        else:
            items = client.post(f"/v1/devices/{device_id}/revoke-certificates",
                                {"reason": reason})["items"]
            out.print(f"revoked {len(items)} certificate(s) of {device}", markup=False)


@app.command("list")
def cert_list(device: Annotated[str, typer.Option("--device", help="device id")],
              as_json: JsonFlag = False, data_dir: DataDir = None,
              admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """List a device's certificates."""
    with api(data_dir, admin_url, ca_file) as client:
        certs = client.get(f"/v1/devices/{device_path(device)}/certificates")["items"]
    if as_json:
        print_json(certs)
    else:
        print_certs(certs)
