"""What every ``fleetward`` command group shares: the admin API options, errors, JSON
and tables, progress bars and the checks of ids that become URL path segments.

The output rules of every command live here once:

* dynamic values (ids, names, reasons, fingerprints, subjects) never reach Rich as markup:
  they are escaped (``escape``) or printed as ``Text``; table cells are always ``Text``;
* no emoji codes: Rich would print the fingerprint ``3B:AB:C7`` as ``3B🆎C7``;
* nothing people copy is cut: status lines soft-wrap (one line in a log or a pipe) and
  table columns fold instead of ending in "…";
* stdout holds the result (a secret, an id, JSON); notes and warnings go to stderr;
* flags show no value placeholder in ``--help`` (``App``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fleetward.cli.client import AdminClient, resolve_connection
from fleetward.errors import FleetwardError, InvalidInput
from fleetward.model import validate_device_id
from fleetward.terminal import App, console, printable

__all__ = ["App", "err", "fail", "out", "warn"]

# emoji=False: ':ab:' inside a fingerprint is not an emoji code. soft_wrap: a status
# line stays one line, never broken inside a serial or a path.
out = console()
err = console(stderr=True)

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
Quiet = Annotated[bool, typer.Option("--quiet", "-q",
                                     help="print only the result on stdout, nothing on stderr")]


def fail(exc: FleetwardError, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
    err.print(f"[yellow]hint:[/] {escape(exc.hint)}", highlight=False)
    raise typer.Exit(code)


def warn(message: str, hint: str = "") -> None:
    """A ``warning:`` line (and a ``hint:``) on stderr; both are data, never markup."""
    err.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False)
    if hint:
        err.print(f"[yellow]hint:[/] {escape(hint)}", highlight=False)


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


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Cells are ``Text``, never markup (a device named "[bold]" stays "[bold]"), and
    fold onto the next line rather than end in "…": serials, fingerprints, ids and topics
    are copied from here."""
    table = Table(title=Text(printable(title)))
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[Text("" if v is None else printable(str(v))) for v in row])
    out.print(table)


def parse_labels(values: list[str] | None) -> dict[str, str]:
    labels = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(InvalidInput(f"bad label {item!r}", hint="use --label key=value"))
        labels[key] = value
    return labels


def device_path(device_id: str) -> str:
    """A device id checked before it becomes a URL path segment."""
    try:
        return validate_device_id(device_id)
    except InvalidInput as exc:
        fail(exc)


TOKEN_ID_PATTERN = re.compile(r"[0-9a-f]{16}")  # crypto.secret_token: 8 random bytes in hex


def token_id_path(token_id: str, kind: str, prefix: str) -> str:
    """An operator (``fwa_``) or bootstrap (``fwb_``) token id checked before it becomes a
    URL path segment: "../policies/x" must not turn into another API call."""
    if not TOKEN_ID_PATTERN.fullmatch(token_id):
        fail(InvalidInput(f"invalid {kind} token id {token_id!r}",
                          hint=f"the 16 hex characters between {prefix} and the dot; never "
                               "pass the whole token on the command line"))
    return token_id


def progress() -> Progress:
    # On stderr, and only on a terminal: stdout and logs keep just the summary.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, disable=not err.is_terminal)
