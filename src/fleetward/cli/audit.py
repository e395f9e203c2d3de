"""``fleetward audit``: the tamper-evident audit log."""

from __future__ import annotations

from collections.abc import Callable
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
    err,
    fail,
    out,
    print_json,
    table,
)
from fleetward.errors import FleetwardError

app = App(help="The tamper-evident audit log.", no_args_is_help=True)

# Reads the chain from a data directory without the API (data dir -> the report of
# GET /v1/audit/verify). fleetward.server plugs it in: it needs the database and the
# audit key, which this package never imports.
LocalVerifier = Callable[[Path], dict[str, Any]]
_local_verifier: LocalVerifier | None = None


def use_local_verifier(verifier: LocalVerifier) -> None:
    global _local_verifier
    _local_verifier = verifier


VERIFY_HELP = (  # one string per paragraph: Typer keeps the line breaks of later ones
    "Walk the hash chain; name the first edited, deleted, inserted or reordered row.\n\n"
    "With a data directory (--data-dir or FLEETWARD_DATA_DIR) and no admin URL it reads "
    "the database and the audit key itself, so it works with the server stopped: the "
    "check to run when the server is down or suspected. With --admin-url (or "
    "FLEETWARD_ADMIN_URL) it asks that server's API. Exit status 0: the chain is intact; "
    "3: it is broken (the first bad row is named).")


@app.command("verify", help=VERIFY_HELP)
def audit_verify(data_dir: DataDir = None, admin_url: AdminUrl = None,
                 ca_file: CaFile = None) -> None:
    """Walk the hash chain locally or through the API (see ``VERIFY_HELP``)."""
    if data_dir is not None and admin_url is None and _local_verifier is not None:
        try:
            report = _local_verifier(data_dir)
        except FleetwardError as exc:
            fail(exc)
    else:
        with api(data_dir, admin_url, ca_file) as client:
            report = client.get("/v1/audit/verify")
    if report["ok"]:
        out.print(f"[green]audit chain OK[/]: {report['rows_checked']} rows verified")
        return
    err.print(f"[bold red]audit chain BROKEN[/] at row {report['first_bad_seq']} "
              f"({escape(str(report['kind']))}): {escape(str(report['message']))}",
              highlight=False)
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
