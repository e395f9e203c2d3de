"""``fleetward operator``: admin API tokens."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from fleetward.cli.common import (
    AdminUrl,
    App,
    CaFile,
    DataDir,
    Quiet,
    api,
    err,
    out,
    table,
    token_id_path,
)

app = App(help="Admin API tokens.", no_args_is_help=True)


@app.command("add")
def operator_add(name: str, role: Annotated[str, typer.Option(help="admin|operator|auditor")],
                 quiet: Quiet = False, data_dir: DataDir = None, admin_url: AdminUrl = None,
                 ca_file: CaFile = None) -> None:
    """Create an admin API token; it is printed once (on stdout, alone)."""
    with api(data_dir, admin_url, ca_file) as client:
        created = client.post("/v1/operators", {"name": name, "role": role})
    if not quiet:
        err.print("store this token now; it cannot be shown again:", markup=False)
    sys.stdout.write(created["token"] + "\n")


@app.command("list")
def operator_list(data_dir: DataDir = None, admin_url: AdminUrl = None,
                  ca_file: CaFile = None) -> None:
    """List operator tokens (never the tokens themselves)."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/operators")["items"]
    table("Operator tokens", ["token id", "name", "role", "created", "revoked"],
          [[t["token_id"], t["name"], t["role"], t["created_at"], t["revoked"]]
           for t in items])


@app.command("revoke")
def operator_revoke(token_id: str, data_dir: DataDir = None, admin_url: AdminUrl = None,
                    ca_file: CaFile = None) -> None:
    """Revoke an operator token (its id: the hex between fwa_ and the dot)."""
    token_id = token_id_path(token_id, "operator", "fwa_")
    with api(data_dir, admin_url, ca_file) as client:
        client.request("DELETE", f"/v1/operators/{token_id}")
    out.print(f"token {token_id} revoked", markup=False)
