"""``fleetward audit``: the tamper-evident audit log."""

from __future__ import annotations

from typing import Annotated

import typer

from fleetward.cli.common import (
    AdminUrl,
    CaFile,
    DataDir,
    JsonFlag,
    api,
    err,
    out,
    print_json,
    table,
)

app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)


@app.command("verify")
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


@app.command("tail")
def audit_tail(count: Annotated[int, typer.Option("-n", "--count")] = 20,
               action: Annotated[str | None, typer.Option(help="action prefix filter")] = None,
               as_json: JsonFlag = False, data_dir: DataDir = None,
               admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Show the newest audit events."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/audit", limit=count, action=action, order="desc")["items"]
    items.reverse()
    if as_json:
        print_json(items)
        return
    table("Audit log", ["seq", "at", "actor", "action", "target", "outcome"],
          [[e["seq"], e["at"], e["actor"], e["action"], e["target"], e["outcome"]]
           for e in items])
