"""``fleetward credential``: device credentials besides certificates, and API keys
(docs/credentials.md).

* a device's **symmetric keys** (``sk_…``: primary and secondary, for SAS tokens and
  ``client_secret_jwt``) and **registered public keys** (``pk_…``, for
  ``private_key_jwt``);
* **API keys** (``fwk_<id>.<secret>``) for back-end services and resource servers;
* ``revoke --jti``: one access token.

A credential's id tells its kind: ``sk_`` / ``pk_`` and 16 hex digits for a device
credential, ``fwk_`` and 16 hex digits (or the 16 hex digits alone) for an API key.
Keys are printed once, on stdout, alone (``--quiet`` for scripts); the server cannot show
them again.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetward.cli.common import (
    TOKEN_ID_PATTERN,
    AdminUrl,
    App,
    CaFile,
    DataDir,
    JsonFlag,
    Quiet,
    api,
    device_path,
    err,
    fail,
    out,
    print_json,
    table,
    warn,
)
from fleetward.errors import InvalidInput

app = App(help="Device symmetric keys and public keys, and API keys (shown once).",
          no_args_is_help=True)

# As tokens.credentials.CREDENTIAL_ID_PATTERN (not imported: it would load the database
# layer into every CLI call).
CREDENTIAL_ID_PATTERN = re.compile(r"(sk|pk)_[0-9a-f]{16}")
API_KEY_PREFIX = "fwk_"
# --kind spellings -> what the API calls them ("api-key" is not a device credential).
KINDS = {"symmetric": "symmetric_key", "symmetric-key": "symmetric_key",
         "public-key": "public_key", "api-key": "api_key"}
SLOTS = ("primary", "secondary")
SHOWN_ONCE_KEYS = ("these keys are shown only once: store them now (or hand them to the "
                   "device); they cannot be retrieved again")
SHOWN_ONCE_KEY = "this key is shown only once: store it now; it cannot be retrieved again"
MAX_ECHOED_ID_CHARS = 40  # an id is ≤ 20 characters; a longer value may be a secret


def credential_ref(value: str) -> tuple[str, str]:
    """``("device", id)`` for ``sk_…`` / ``pk_…``, ``("api-key", hex id)`` for
    ``fwk_<id>`` or the bare id: checked before it becomes a URL path segment.

    A whole API key (``fwk_<id>.<secret>``) is refused without echoing it: the secret
    would land in the terminal's scrollback (and, typed, in the shell history)."""
    if CREDENTIAL_ID_PATTERN.fullmatch(value):
        return "device", value
    key_id = value.removeprefix(API_KEY_PREFIX)
    if TOKEN_ID_PATTERN.fullmatch(key_id):
        return "api-key", key_id
    if "." in value:
        fail(InvalidInput("that looks like a whole key or token, not a credential id",
                          hint="pass only the id (fwk_ and the 16 hex digits before the "
                               "dot); never put a secret on the command line"))
    shown = repr(value) if len(value) <= MAX_ECHOED_ID_CHARS else "given"
    fail(InvalidInput(f"invalid credential id {shown}",
                      hint="sk_… or pk_… for a device credential (fleetward credential list "
                           "--device D), fwk_<16 hex> for an API key (fleetward credential "
                           "list --api-keys)"))


def _kind(value: str) -> str:
    kind = KINDS.get(value)
    if kind is None:
        fail(InvalidInput(f"unknown credential kind {value!r}",
                          hint="use --kind symmetric, --kind public-key or --kind api-key"))
    return kind


def _refuse(given: dict[str, object], kind: str) -> None:
    """Options that do not go with ``--kind kind``."""
    extra = [flag for flag, value in given.items() if value not in (None, [], False)]
    if extra:
        fail(InvalidInput(f"{', '.join(extra)} do not go with --kind {kind}",
                          hint="fleetward credential add --help shows which options go "
                               "with which kind"))


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII PEM"
        fail(InvalidInput(f"cannot read {path}: {reason}",
                          hint=f"pass a readable PEM {what} file"))


@app.command("add")
def credential_add(
        kind: Annotated[str, typer.Option(
            "--kind", help="symmetric (two device keys), public-key (a device's EC P-256 "
                           "key) or api-key")],
        device: Annotated[str | None, typer.Option(
            "--device", help="the device (symmetric, public-key)")] = None,
        public_key: Annotated[Path | None, typer.Option(
            "--public-key", exists=True, dir_okay=False,
            help="with --kind public-key: PEM public key file "
                 "(openssl ec -in device.key -pubout)")] = None,
        name: Annotated[str | None, typer.Option(
            "--name", help="with --kind api-key: what the key is for")] = None,
        scope: Annotated[list[str] | None, typer.Option(
            "--scope", metavar="SCOPE",
            help="with --kind api-key: a scope (repeatable): tokens:introspect")
                         ] = None,
        ttl_hours: Annotated[int | None, typer.Option(
            "--ttl-hours", min=1,
            help="with --kind api-key: lifetime in hours (default: until revoked)")] = None,
        as_json: JsonFlag = False, quiet: Quiet = False, data_dir: DataDir = None,
        admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Add a device's symmetric keys or public key, or create an API key.

    Keys are printed once on stdout (symmetric: "primary: KEY" and "secondary: KEY";
    --quiet: the primary key alone; an API key: the key alone); notes go to stderr.
    """
    api_kind = _kind(kind)
    if api_kind == "api_key":
        _refuse({"--device": device, "--public-key": public_key}, kind)
        _add_api_key(name, scope, ttl_hours, as_json, quiet, data_dir, admin_url, ca_file)
        return
    _refuse({"--name": name, "--scope": scope, "--ttl-hours": ttl_hours}, kind)
    if device is None:
        fail(InvalidInput(f"--kind {kind} needs --device ID",
                          hint=f"fleetward credential add --device d1 --kind {kind}"))
    body: dict[str, Any] = {"kind": api_kind}
    if api_kind == "public_key":
        if public_key is None:
            fail(InvalidInput("--kind public-key needs --public-key FILE",
                              hint="export it with: openssl ec -in device.key -pubout "
                                   "-out device.pub"))
        body["public_key"] = _read_text(public_key, "public key")
    elif public_key is not None:
        _refuse({"--public-key": public_key}, kind)
    with api(data_dir, admin_url, ca_file) as client:
        created = client.post(f"/v1/devices/{device_path(device)}/credentials", body)
    if api_kind == "public_key":
        if as_json:
            print_json(created)
            return
        if not quiet:
            err.print(f"public key {created['id']} registered for device "
                      f"{created['device_id']} (thumbprint {created['jkt']})",
                      markup=False, highlight=False)
        out.print(created["id"], markup=False, highlight=False)
        return
    if not quiet:
        warn(SHOWN_ONCE_KEYS)
    if as_json:
        print_json(created)
        return
    if quiet:
        sys.stdout.write(created["primary_key"] + "\n")
        return
    err.print(f"symmetric credential {created['id']} for device {created['device_id']} "
              f"(primary v{created['primary_version']}, secondary "
              f"v{created['secondary_version']})", markup=False, highlight=False)
    sys.stdout.write(f"primary: {created['primary_key']}\n"
                     f"secondary: {created['secondary_key']}\n")


def _add_api_key(name: str | None, scope: list[str] | None, ttl_hours: int | None,
                 as_json: bool, quiet: bool, data_dir: Path | None, admin_url: str | None,
                 ca_file: Path | None) -> None:
    scopes = [s for value in scope or [] for s in value.split()]
    if name is None or not scopes:
        fail(InvalidInput("--kind api-key needs --name and at least one --scope",
                          hint='e.g. fleetward credential add --kind api-key --name '
                               '"gateway introspection" --scope tokens:introspect'))
    body: dict[str, Any] = {"name": name, "scopes": scopes}
    if ttl_hours is not None:
        body["ttl_hours"] = ttl_hours
    with api(data_dir, admin_url, ca_file) as client:
        created = client.post("/v1/api-keys", body)
    if not quiet:
        warn(SHOWN_ONCE_KEY)
    if as_json:
        print_json(created)
        return
    if not quiet:
        err.print(f"API key {created['id']} ({created['name']}; scopes "
                  f"{' '.join(created['scopes'])}; expires "
                  f"{created['expires_at'] or 'never (until revoked)'})",
                  markup=False, highlight=False)
    sys.stdout.write(created["key"] + "\n")


@app.command("list")
def credential_list(
        device: Annotated[str | None, typer.Option(
            "--device", help="this device's symmetric keys and public keys")] = None,
        api_keys: Annotated[bool, typer.Option("--api-keys", help="the API keys")] = False,
        as_json: JsonFlag = False, data_dir: DataDir = None, admin_url: AdminUrl = None,
        ca_file: CaFile = None) -> None:
    """List a device's credentials (--device D) or the API keys (--api-keys); never keys."""
    if (device is None) == (not api_keys):
        fail(InvalidInput("give either --device ID or --api-keys",
                          hint="fleetward credential list --device d1, or "
                               "fleetward credential list --api-keys"))
    with api(data_dir, admin_url, ca_file) as client:
        if device is not None:
            items = client.get(f"/v1/devices/{device_path(device)}/credentials")["items"]
        else:
            items = client.get("/v1/api-keys")["items"]
    if as_json:
        print_json(items)
    elif device is not None:
        # Five columns: a list is read at 80 columns too (`show` has every field).
        table(f"Credentials of {device}", ["id", "kind", "status", "key", "since"],
              [[c["id"], c["kind"], c["status"], _key_column(c),
                c["revoked_at"] or c["rotated_at"] or c["created_at"]] for c in items])
    else:
        table("API keys", ["id", "name", "scopes", "status", "expires"],
              [[f"{API_KEY_PREFIX}{k['id']}", k["name"], " ".join(k["scopes"]),
                _api_key_status(k), k["expires_at"] or "never"] for k in items])


def _key_column(credential: dict[str, Any]) -> str:
    """Symmetric: the slots' versions; public key: its RFC 7638 thumbprint."""
    if credential["kind"] == "public_key":
        return str(credential["jkt"])
    return (f"primary {_version(credential['primary_version'])}, "
            f"secondary {_version(credential['secondary_version'])}")


def _api_key_status(key: dict[str, Any]) -> str:
    if key["revoked_at"]:
        return f"revoked {key['revoked_at']}"
    if key["previous_valid_until"]:
        return f"active (previous secret until {key['previous_valid_until']})"
    return "active"


def _version(value: int | None) -> str | None:
    return None if value is None else f"v{value}"


@app.command("show")
def credential_show(credential_id: Annotated[str, typer.Argument(
                        metavar="ID", help="sk_…, pk_… or fwk_<16 hex> (an API key's id)")],
                    as_json: JsonFlag = False, data_dir: DataDir = None,
                    admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Show a live credential or API key (never its keys: they were shown once).

    Revoked ones are in `credential list --device D` / `--api-keys`.
    """
    where, ident = credential_ref(credential_id)
    path = f"/v1/credentials/{ident}" if where == "device" else f"/v1/api-keys/{ident}"
    with api(data_dir, admin_url, ca_file) as client:
        info = client.get(path)
    if as_json:
        print_json(info)
        return
    title = (f"Credential {ident}" if where == "device"
             else f"API key {API_KEY_PREFIX}{ident}")
    table(title, ["field", "value"],
          [[k, " ".join(v) if isinstance(v, list) else v] for k, v in info.items()])


@app.command("rotate")
def credential_rotate(
        credential_id: Annotated[str, typer.Argument(
            metavar="ID", help="sk_… (a symmetric credential) or fwk_<16 hex> (an API key)")],
        slot: Annotated[str | None, typer.Option(
            "--slot", help="symmetric keys: which key to regenerate, primary or secondary "
                           "(the one devices are not using)")] = None,
        grace_seconds: Annotated[int | None, typer.Option(
            "--grace-seconds", min=0,
            help="API keys: how long the previous secret keeps working (default 0: it "
                 "stops now)")] = None,
        as_json: JsonFlag = False, quiet: Quiet = False, data_dir: DataDir = None,
        admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Regenerate a symmetric key (--slot) or an API key's secret; the new key is printed
    once on stdout."""
    where, ident = credential_ref(credential_id)
    if where == "device" and ident.startswith("pk_"):
        fail(InvalidInput("a registered public key cannot be rotated",
                          hint="register the new key (fleetward credential add --device D "
                               "--kind public-key --public-key FILE), then revoke this one"))
    if where == "device":
        if grace_seconds is not None:
            fail(InvalidInput("--grace-seconds goes with API keys",
                              hint="a symmetric credential has two keys: move devices to "
                                   "one, then regenerate the other with --slot"))
        if slot not in SLOTS:
            fail(InvalidInput("a symmetric credential needs --slot primary or --slot "
                              "secondary",
                              hint="regenerate the key your devices do not use; sessions "
                                   "signed with the old key end"))
        path = f"/v1/credentials/{ident}/rotate"
        body: dict[str, Any] = {"slot": slot}
    else:
        if slot is not None:
            fail(InvalidInput("--slot goes with symmetric credentials (sk_…)",
                              hint="an API key has one secret; use --grace-seconds N to "
                                   "keep the previous one working while clients move"))
        path = f"/v1/api-keys/{ident}/rotate"
        body = {} if grace_seconds is None else {"grace_seconds": grace_seconds}
    with api(data_dir, admin_url, ca_file) as client:
        rotated = client.post(path, body)
    if not quiet:
        warn(SHOWN_ONCE_KEY)
    if as_json:
        print_json(rotated)
        return
    if not quiet:
        if where == "device":
            note = (f"credential {rotated['id']}: {rotated['slot']} key regenerated "
                    f"(version {rotated['version']}); sessions signed with the old key end, "
                    "and so do the device's access tokens")
        elif rotated["previous_valid_until"]:
            note = (f"API key {API_KEY_PREFIX}{rotated['id']} rotated; the previous secret "
                    f"works until {rotated['previous_valid_until']}")
        else:
            note = (f"API key {API_KEY_PREFIX}{rotated['id']} rotated; the previous secret "
                    "no longer works")
        err.print(note, markup=False, highlight=False)
    sys.stdout.write(rotated["key"] + "\n")


@app.command("revoke")
def credential_revoke(
        credential_id: Annotated[str | None, typer.Argument(
            metavar="ID", help="sk_…, pk_… or fwk_<16 hex> (an API key's id)",
            show_default=False)] = None,
        jti: Annotated[str | None, typer.Option(
            "--jti", help="revoke one access token instead, by its jti claim")] = None,
        data_dir: DataDir = None, admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Revoke a credential or an API key at once (ID), or one access token (--jti)."""
    if (credential_id is None) == (jti is None):
        fail(InvalidInput("give either a credential ID or --jti JTI",
                          hint="fleetward credential revoke sk_…, or fleetward credential "
                               "revoke --jti JTI (fleetward access-token inspect shows it)"))
    if jti is not None:
        with api(data_dir, admin_url, ca_file) as client:
            revoked = client.post("/v1/access-tokens/revoke", {"jti": jti})
        out.print(f"access token {revoked['jti']} revoked (refused until "
                  f"{revoked['refused_until']})", markup=False, highlight=False)
        return
    where, ident = credential_ref(credential_id or "")
    with api(data_dir, admin_url, ca_file) as client:
        if where == "device":
            info = client.delete(f"/v1/credentials/{ident}")
            out.print(f"credential {info['id']} of device {info['device_id']} revoked; "
                      "the device's access tokens are refused from now on",
                      markup=False, highlight=False)
        else:
            info = client.delete(f"/v1/api-keys/{ident}")
            out.print(f"API key {API_KEY_PREFIX}{info['id']} ({info['name']}) revoked",
                      markup=False, highlight=False)
