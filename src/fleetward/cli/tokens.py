"""``fleetward bootstrap-token``: bootstrap tokens for first enrollment (EST, RFC 7030).

Mounted twice (cli/main.py): as ``bootstrap-token``, and as ``token``, its old name,
hidden from the root's help and kept for existing scripts
(``TOKEN=$(fleetward token create --device d1 --quiet)``). The root help shows
``bootstrap-token`` and ``access-token`` side by side so neither is mistaken for the
other.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from fleetward.cli.common import (
    AdminUrl,
    App,
    CaFile,
    DataDir,
    JsonFlag,
    Quiet,
    TtlHours,
    api,
    device_path,
    err,
    fail,
    out,
    print_json,
    token_id_path,
    warn,
)
from fleetward.errors import InvalidInput

HELP = "Bootstrap tokens for first enrollment (EST, RFC 7030)."
ALIAS_HELP = "Alias of bootstrap-token (kept for existing scripts)."
app = App(help=HELP, no_args_is_help=True)


SHOWN_ONCE = ("this token is shown only once: store it now (or hand it to the device); "
              "it cannot be retrieved again")


@app.command("create")
def token_create(device: Annotated[str | None, typer.Option(
                     "--device", help="a single-use token for this registered device")] = None,
                 type_name: Annotated[str | None, typer.Option(
                     "--type", help="a claim-batch token for new devices of this type")] = None,
                 count: Annotated[int | None, typer.Option(
                     "--count", min=1, help="with --type: how many devices it may enroll")
                                  ] = None,
                 owner: Annotated[str | None, typer.Option(
                     "--owner", help="with --type: owner of the devices it registers")] = None,
                 ttl_hours: TtlHours = None, as_json: JsonFlag = False, quiet: Quiet = False,
                 data_dir: DataDir = None, admin_url: AdminUrl = None,
                 ca_file: CaFile = None) -> None:
    """Create a bootstrap token (--device ID, or --type T --count N); printed once.

    stdout holds the token alone (or the JSON with --json); notes go to stderr, none
    with --quiet: TOKEN=$(fleetward bootstrap-token create --device d1 --quiet).
    """
    if (device is None) == (type_name is None):
        fail(InvalidInput("give either --device ID or --type T --count N",
                          hint="fleetward bootstrap-token create --device d1, or "
                               "fleetward bootstrap-token create --type sensor --count 100"))
    body: dict[str, Any] = {} if ttl_hours is None else {"ttl_hours": ttl_hours}
    if device is not None:
        if count is not None or owner is not None:
            fail(InvalidInput("--count and --owner go with --type, not --device",
                              hint="a device token is single-use and the device has an owner"))
        path = f"/v1/devices/{device_path(device)}/bootstrap-tokens"
    else:
        if count is None:
            fail(InvalidInput("--type needs --count", hint="e.g. --type sensor --count 100"))
        path = "/v1/bootstrap-tokens"
        body.update({"type": type_name, "count": count, "owner": owner})
    with api(data_dir, admin_url, ca_file) as client:
        created = client.post(path, body)
    if not quiet:
        warn(SHOWN_ONCE)
    if as_json:
        print_json(created)
        return
    if not quiet:
        scope = (f"device {created['device_id']}" if device is not None else
                 f"up to {created['max_uses']} new {created['device_type']} devices")
        err.print(f"bootstrap token {created['token_id']} for {scope}, expires "
                  f"{created['expires_at']}", markup=False, highlight=False)
    sys.stdout.write(created["token"] + "\n")


@app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(metavar="TOKEN_ID")],
                 data_dir: DataDir = None, admin_url: AdminUrl = None,
                 ca_file: CaFile = None) -> None:
    """Revoke a bootstrap token (its id: the hex between fwb_ and the dot)."""
    token_id = token_id_path(token_id, "bootstrap", "fwb_")
    with api(data_dir, admin_url, ca_file) as client:
        client.delete(f"/v1/bootstrap-tokens/{token_id}")
    out.print(f"bootstrap token {token_id} revoked", markup=False)
