"""``fleetward ca``: certificate authorities."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fleetward.cli.common import (
    AdminUrl,
    App,
    CaFile,
    DataDir,
    JsonFlag,
    api,
    fail,
    out,
    print_json,
    table,
)
from fleetward.crypto.x509util import load_certificate, to_pem
from fleetward.errors import InvalidInput

app = App(help="Certificate authorities.", no_args_is_help=True)


@app.command("show")
def ca_show(as_json: JsonFlag = False, data_dir: DataDir = None, admin_url: AdminUrl = None,
            ca_file: CaFile = None) -> None:
    """Show our CAs and registered OEM CAs."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/ca")["items"]
    if as_json:
        print_json(items)
        return
    table("Certificate authorities",
          ["name", "kind", "subject", "key", "not after", "CRL #", "device type",
           "approval", "fingerprint (SHA-256)"],
          [[c["name"], c["kind"], c["subject"],
            f"{c['key_backend'] or '-'}{' (online)' if c['key_online'] else ''}",
            c["not_after"], c["crl_number"], c["device_type"],
            _approval_label(c.get("require_approval")), c["fingerprint_sha256"]]
           for c in items])


def _approval_label(required: bool | None) -> str:
    """OEM CAs only: whether their new devices wait for `fleetward enroll approve`."""
    if required is None:
        return ""
    return "required" if required else "automatic"


@app.command("add-oem")
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
    out.print(f"OEM CA [bold]{escape(row['name'])}[/] registered for type "
              f"{escape(row['device_type'])}{approval}")
