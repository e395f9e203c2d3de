"""``fleetward enroll``: approve or reject enrollments with manufacturer certificates."""

from __future__ import annotations

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
    out,
    print_json,
    table,
)

app = App(help="Approve or reject enrollments with manufacturer certificates.",
          no_args_is_help=True)


@app.command("pending")
def enroll_pending(limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
                   as_json: JsonFlag = False, data_dir: DataDir = None,
                   admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """List enrollments waiting for approval."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/enrollments", approval="pending", limit=limit)["items"]
    if as_json:
        print_json(items)
        return
    if not items:
        out.print("no enrollments are waiting for approval")
        return
    table("Enrollments waiting for approval",
          ["device", "OEM CA", "manufacturer certificate", "since"],
          [[b["device_id"], b["oem_ca"], b["idevid_subject"], b["created_at"]]
           for b in items])


def _decide(device_id: str, verb: str, data_dir: Path | None, admin_url: str | None,
            ca_file: Path | None) -> dict[str, Any]:
    with api(data_dir, admin_url, ca_file) as client:
        result: dict[str, Any] = client.request(
            "POST", f"/v1/enrollments/{device_path(device_id)}/{verb}")
    return result


@app.command("approve")
def enroll_approve(device_id: Annotated[str, typer.Argument(metavar="ID")],
                   data_dir: DataDir = None, admin_url: AdminUrl = None,
                   ca_file: CaFile = None) -> None:
    """Approve a pending enrollment; the device gets its certificate when it retries."""
    binding = _decide(device_id, "approve", data_dir, admin_url, ca_file)
    out.print(f"enrollment of [bold]{escape(binding['device_id'])}[/] approved; the device "
              "gets its certificate on its next attempt")


@app.command("reject")
def enroll_reject(device_id: Annotated[str, typer.Argument(metavar="ID")],
                  data_dir: DataDir = None, admin_url: AdminUrl = None,
                  ca_file: CaFile = None) -> None:
    """Reject a pending enrollment; every further attempt is refused and audited."""
    binding = _decide(device_id, "reject", data_dir, admin_url, ca_file)
    out.print(f"enrollment of [bold]{escape(binding['device_id'])}[/] rejected; further "
              "attempts are refused")
