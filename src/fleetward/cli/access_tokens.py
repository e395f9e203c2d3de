"""``fleetward access-token``: device access tokens (ES256 JWTs, RFC 9068) and the keys
that sign them (docs/credentials.md).

Devices get their tokens at the token endpoint; operators issue one here to test a
resource server with, inspect one, revoke one or all of a device's, and rotate the
signing key. Not to be confused with ``fleetward bootstrap-token`` (first enrollment).
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetward.cli.common import (
    AdminUrl,
    App,
    CaFile,
    DataDir,
    JsonFlag,
    Quiet,
    Reason,
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

app = App(help="Device access tokens (OAuth 2.0, RFC 9068) and their signing keys.",
          no_args_is_help=True)

NOT_STORED = ("this token is not stored and cannot be shown again; it is a credential "
              "until it expires: keep it out of logs and tickets")


def _read_pem(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII PEM"
        fail(InvalidInput(f"cannot read {path}: {reason}",
                          hint=f"pass a readable PEM {what} file"))


def _line(text: str) -> None:
    """A line of server or token data: never markup (an unverified token's claims are
    anybody's text), one line even in a narrow terminal."""
    out.print(text, markup=False, highlight=False)


@app.command("issue")
def token_issue(
        device: Annotated[str, typer.Option("--device", help="device id")],
        scope: Annotated[str | None, typer.Option(
            "--scope", help='space-separated scopes, e.g. "telemetry:write mqtt:connect" '
                            "(default: every scope the device's policy opens)")] = None,
        certificate: Annotated[Path | None, typer.Option(
            "--certificate", exists=True, dir_okay=False,
            help="bind to this certificate of the device (PEM; default: its newest valid "
                 "one)")] = None,
        public_key: Annotated[Path | None, typer.Option(
            "--public-key", exists=True, dir_okay=False,
            help="bind to this EC P-256 public key (PEM) instead: a DPoP token")] = None,
        as_json: JsonFlag = False, quiet: Quiet = False, data_dir: DataDir = None,
        admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Issue an access token for a device, to test a resource server with.

    stdout holds the token alone (or the JSON with --json); notes go to stderr, none
    with --quiet: TOKEN=$(fleetward access-token issue --device d1 --quiet).
    """
    if certificate is not None and public_key is not None:
        fail(InvalidInput("give --certificate or --public-key, not both",
                          hint="a token is bound to one certificate or one key"))
    body: dict[str, Any] = {"device_id": device}
    if scope is not None:
        body["scope"] = scope
    if certificate is not None:
        body["certificate"] = _read_pem(certificate, "certificate")
    if public_key is not None:
        body["public_key"] = _read_pem(public_key, "public key")
    with api(data_dir, admin_url, ca_file) as client:
        grant = client.post("/v1/access-tokens", body)
    if not quiet:
        warn(NOT_STORED)
    if as_json:
        print_json(grant)
        return
    if not quiet:
        bound = ("the public key given" if public_key is not None else
                 "the certificate given" if certificate is not None else
                 "its newest valid certificate")
        err.print(f"{grant['token_type']} access token for device {device}, bound to "
                  f"{bound}; scope {grant['scope']!r}; expires in {grant['expires_in']} s; "
                  f"jti {grant['jti']}", markup=False, highlight=False)
    sys.stdout.write(grant["access_token"] + "\n")


@app.command("inspect")
def token_inspect(
        token: Annotated[str, typer.Argument(
            metavar="TOKEN", help="the access token, or - to read it from stdin (keeps it "
                                  "out of the process list and the shell history)")],
        as_json: JsonFlag = False, data_dir: DataDir = None, admin_url: AdminUrl = None,
        ca_file: CaFile = None) -> None:
    """Say whether an access token is valid now, why not, and what it is bound to.

    Exit code 0 when valid, 1 when not.
    """
    if token == "-":
        token = sys.stdin.read().strip()
    if not token:
        fail(InvalidInput("no token given", hint="pass the token, or - and the token on "
                                                 "stdin"))
    with api(data_dir, admin_url, ca_file) as client:
        result = client.post("/v1/access-tokens/inspect", {"token": token})
    if as_json:
        print_json(result)
    else:
        _print_inspection(result)
    raise typer.Exit(0 if result["valid"] else 1)


def _print_inspection(result: dict[str, Any]) -> None:
    _line("VALID" if result["valid"] else f"NOT VALID: {result['reason']}")
    if result.get("device_id") is not None:
        _line(f"device: {result['device_id']}")
    binding = result.get("binding")
    if binding is not None:
        _line(f"bound to: {binding['kind']}"
              + (f" {binding['thumbprint']}" if binding["thumbprint"] else
                 " (nothing: an unbound bearer token)"))
    claims = result.get("claims")
    if not isinstance(claims, dict):
        return
    for name in ("jti", "scope", "iss", "aud"):
        if name in claims:
            _line(f"{name}: {claims[name]}")
    for name in ("iat", "exp"):
        value = claims.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                when = dt.datetime.fromtimestamp(value, dt.UTC).isoformat()
            except (OverflowError, OSError, ValueError):
                when = "out of range"
            _line(f"{name}: {value} ({when})")


@app.command("revoke")
def token_revoke(
        jti: Annotated[str | None, typer.Option(
            "--jti", help="one token, by its jti claim")] = None,
        device: Annotated[str | None, typer.Option(
            "--device", help="every token this device holds")] = None,
        reason: Reason = "", data_dir: DataDir = None, admin_url: AdminUrl = None,
        ca_file: CaFile = None) -> None:
    """Revoke one access token (--jti) or every token of a device (--device); at once,
    on every node."""
    if (jti is None) == (device is None):
        fail(InvalidInput("give either --jti JTI or --device ID",
                          hint="fleetward access-token inspect TOKEN shows a token's jti"))
    if jti is not None and reason:
        fail(InvalidInput("--reason goes with --device",
                          hint="a single token's revocation is audited with its jti"))
    with api(data_dir, admin_url, ca_file) as client:
        if jti is not None:
            revoked = client.post("/v1/access-tokens/revoke", {"jti": jti})
            _line(f"access token {revoked['jti']} revoked (refused until "
                  f"{revoked['refused_until']})")
            return
        body = {"reason": reason} if reason else {}
        result = client.post(f"/v1/devices/{device_path(device or '')}/access-tokens/revoke",
                             body)
    _line(f"every access token of device {result['device_id']} revoked (credential "
          f"generation {result['credential_generation']})")


@app.command("keys")
def token_keys(as_json: JsonFlag = False, data_dir: DataDir = None,
               admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """List the token signing keys: the active one and retired ones that still verify."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/token-keys")["items"]
    if as_json:
        print_json(items)
        return
    table("Token signing keys", ["kid", "active", "created", "retired", "verifies until"],
          [[k["kid"], "yes" if k["active"] else "no", k["created_at"], k["retired_at"],
            k["verify_until"] or "-"] for k in items])


@app.command("rotate-key")
def token_rotate_key(reason: Reason = "", as_json: JsonFlag = False,
                     data_dir: DataDir = None, admin_url: AdminUrl = None,
                     ca_file: CaFile = None) -> None:
    """Create a new token signing key; the old ones verify until their tokens expire."""
    body = {"reason": reason} if reason else {}
    with api(data_dir, admin_url, ca_file) as client:
        key = client.post("/v1/token-keys/rotate", body)
    if as_json:
        print_json(key)
        return
    _line(key["kid"])
    err.print("new token signing key; the previous ones keep verifying until every token "
              "they signed has expired (fleetward access-token keys)", markup=False,
              highlight=False)
