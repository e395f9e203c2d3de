"""``fleetward type``: device types."""

from __future__ import annotations

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
    out,
    print_json,
    table,
)

app = App(help="Device types.", no_args_is_help=True)


@app.command("add")
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
    out.print(f"device type [bold]{escape(name)}[/] created (enrollment profiles: "
              f"{escape(', '.join(created['enrollment_profiles']))})")


@app.command("list")
def type_list(as_json: JsonFlag = False, data_dir: DataDir = None, admin_url: AdminUrl = None,
              ca_file: CaFile = None) -> None:
    """List device types."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/device-types")["items"]
    if as_json:
        print_json(items)
        return
    table("Device types", ["name", "description", "message types", "enrollment profiles"],
          [[t["name"], t["description"], ", ".join(t["message_types"]),
            ", ".join(t["enrollment_profiles"])] for t in items])
