"""``fleetward device``: register devices and change their lifecycle state."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape

from fleetward.cli.certs import print_certs
from fleetward.cli.common import (
    AdminUrl,
    App,
    CaFile,
    DataDir,
    JsonFlag,
    Reason,
    api,
    device_path,
    err,
    fail,
    out,
    parse_labels,
    print_json,
    table,
)
from fleetward.errors import InvalidInput

app = App(help="Register devices and change their lifecycle state.",
          no_args_is_help=True)


@app.command("add")
def device_add(device_id: Annotated[str, typer.Argument(metavar="ID")],
               type_name: Annotated[str, typer.Option(
                   "--type", help="device type (fleetward type list); without it, the "
                                  "built-in type 'default'")] = "default",
               owner: Annotated[str, typer.Option(help="owner / tenant")] = "default",
               label: Annotated[list[str] | None, typer.Option(
                   help="key=value (repeatable)")] = None,
               as_json: JsonFlag = False, data_dir: DataDir = None,
               admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Register a device (state: registered)."""
    with api(data_dir, admin_url, ca_file) as client:
        device = client.post("/v1/devices", {"id": device_id, "type": type_name,
                                             "owner": owner, "labels": parse_labels(label)})
    if as_json:
        print_json(device)
    else:
        out.print(f"device [bold]{escape(device['id'])}[/] registered (type "
                  f"{escape(device['type'])}, owner {escape(device['owner'])})")


@app.command("list")
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
        print_json(page)
        return
    table("Devices", ["id", "type", "owner", "state", "firmware", "last seen"],
          [[d["id"], d["type"], d["owner"], d["state"], d["firmware_version"],
            d["last_seen_at"]] for d in page["items"]])
    if page["next"]:
        out.print(f"more: --after {page['next']}", markup=False, highlight=False)


@app.command("show")
def device_show(device_id: Annotated[str, typer.Argument(metavar="ID")],
                as_json: JsonFlag = False, data_dir: DataDir = None,
                admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Show one device and its certificates."""
    with api(data_dir, admin_url, ca_file) as client:
        device = client.get(f"/v1/devices/{device_path(device_id)}")
        certs = client.get(f"/v1/devices/{device_path(device_id)}/certificates")["items"]
    if as_json:
        print_json({**device, "certificates": certs})
        return
    table(f"Device {device_id}", ["field", "value"], [[k, v] for k, v in device.items()])
    print_certs(certs)


@app.command("command")
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
        command = client.post(f"/v1/devices/{device_path(device_id)}/commands", body)
    if as_json:
        print_json(command)
        return
    out.print(command["id"], markup=False, highlight=False)
    err.print(f"queued [bold]{escape(command['name'])}[/] for {escape(device_id)}; expires "
              f"{escape(command['expires_at'])}", highlight=False)


@app.command("commands")
def device_commands(device_id: Annotated[str, typer.Argument(metavar="ID")],
                    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
                    as_json: JsonFlag = False, data_dir: DataDir = None,
                    admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """List a device's commands, newest first."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get(f"/v1/devices/{device_path(device_id)}/commands",
                           limit=limit)["items"]
    if as_json:
        print_json(items)
        return
    table(f"Commands of {device_id}",
          ["id", "name", "status", "created", "expires", "completed", "result"],
          [[c["id"], c["name"], c["status"], c["created_at"], c["expires_at"],
            c["completed_at"],
            None if c["result"] is None else json.dumps(c["result"])[:60]] for c in items])


@app.command("messages")
def device_messages(device_id: Annotated[str, typer.Argument(metavar="ID")],
                    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
                    after: Annotated[int | None, typer.Option(
                        min=0, help="only messages after this id (follow with 'next')")
                    ] = None,
                    as_json: JsonFlag = False, data_dir: DataDir = None,
                    admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Show a device's stored telemetry and events (the SQL sink), oldest first."""
    with api(data_dir, admin_url, ca_file) as client:
        page = client.get(f"/v1/devices/{device_path(device_id)}/messages", limit=limit,
                          after=after)
    if as_json:
        print_json(page)
        return
    table(f"Messages of {device_id}",
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
            result = client.post(f"/v1/devices/{device_path(device_id)}/state", body)
        out.print(f"device [bold]{escape(device_id)}[/]: {result['previous_state']} → "
                  f"{result['device']['state']}")
        if result["revoked_certificates"]:
            out.print(f"revoked certificates: {', '.join(result['revoked_certificates'])}",
                      markup=False)
    command.__doc__ = doc
    app.command(name)(command)


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
