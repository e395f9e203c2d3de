"""The console entry point: the ``fleetward`` CLI plus the server-host commands.

Nothing imports this module. It adds the commands that need concrete stores and keys
to the Typer app from ``fleetward.cli`` (which otherwise talks to the admin API only):
``init``, ``serve``, ``ca reissue-server-cert`` and the local mode of ``audit verify``.
Their wiring (``fleetward.node``, ``fleetward.offline``) is imported only when one of
them runs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetward.cli import audit as audit_cli
from fleetward.cli.cas import app as ca_app
from fleetward.cli.common import fail
from fleetward.cli.main import app as cli_app
from fleetward.config import (
    IMPORT_PASSPHRASE_ENV,
    PIN_ENV,
    DataDirLayout,
    ListenerConfig,
    load_settings,
)
from fleetward.errors import FleetwardError

# --- commands -------------------------------------------------------------------------

DataDirOption = Annotated[Path, typer.Option("--data-dir", envvar="FLEETWARD_DATA_DIR",
                                             help="Fleetward data directory")]


# Typer keeps the line breaks of every paragraph but the first: help texts are written as
# one string per paragraph.
INIT_HELP = (
    "Create the CAs, server certificate, database and first admin token (once).\n\n"
    "Run again on an initialised directory it changes nothing, says so, and names each "
    "flag that differs from what the directory has, with what to do instead: other server "
    "names need `fleetward ca reissue-server-cert`; the public URL cannot change after "
    "init (every issued certificate carries it).")


@cli_app.command("init", help=INIT_HELP)
def init_command(
    ctx: typer.Context,
    data_dir: DataDirOption = Path("fleetward-data"),
    hostname: Annotated[list[str] | None, typer.Option(
        "--hostname", help="extra DNS name or IP for the server certificate")] = None,
    organization: Annotated[str, typer.Option(help="organisation name in CA subjects")
                            ] = "Fleetward",
    public_url: Annotated[str, typer.Option(
        help="base URL of the public listener, written into certificates (CDP, AIA)")] = "",
    host: Annotated[str, typer.Option(help="address the listeners bind")] = "127.0.0.1",
    public_port: int = 8080, admin_port: int = 9443, device_port: int = 8443,
    mqtt_port: int = 8883,
    ca_key_backend: Annotated[str, typer.Option(help="file or pkcs11")] = "file",
    pkcs11_module: str = "", pkcs11_token_label: str = "",
    pkcs11_pin_file: Annotated[str, typer.Option(
        help=f"file with the token PIN (or set {PIN_ENV})")] = "",
    import_ca_cert: Annotated[Path | None, typer.Option(help="existing issuing CA cert")] = None,
    import_ca_key: Annotated[Path | None, typer.Option(
        help=f"its key (PEM; passphrase in {IMPORT_PASSPHRASE_ENV})")] = None,
    import_root_cert: Annotated[Path | None, typer.Option(help="the issuing CA's root")] = None,
    database_url: Annotated[str, typer.Option(envvar="FLEETWARD_DATABASE_URL",
                                              help="PostgreSQL URL; default SQLite")] = "",
) -> None:
    """Create the CAs, server certificate, database and first admin token (once)."""
    from fleetward import node

    node.configure_logging("warning")
    listeners = ListenerConfig(host=host, public_port=public_port, admin_port=admin_port,
                               device_port=device_port, mqtt_port=mqtt_port,
                               public_url=public_url or f"http://localhost:{public_port}")
    try:
        created = node.initialise(data_dir, hostnames=hostname or [], organization=organization,
                             listeners=listeners, key_backend=ca_key_backend,
                             pkcs11_module=pkcs11_module, pkcs11_token_label=pkcs11_token_label,
                             pkcs11_pin_file=pkcs11_pin_file, import_ca_cert=import_ca_cert,
                             import_ca_key=import_ca_key, import_root_cert=import_root_cert,
                             database_url=database_url)
    except FleetwardError as exc:
        fail(exc)
    if created:
        layout = DataDirLayout(data_dir)
        typer.echo(f"initialised {data_dir}")
        typer.echo(f"  CA chain:     {layout.chain_file}")
        typer.echo(f"  admin token:  {layout.admin_token_file} (0600)")
        typer.echo(f"  start with:   fleetward serve --data-dir {data_dir}")
    else:
        typer.echo(f"{data_dir} is already initialised; nothing changed")
        from fleetward import offline

        # Only the flags typed: a default that differs from the stored value is no request.
        # (By name: Typer bundles its own click, whose enum is not click's.)
        given = {name: value for name, value in ctx.params.items()
                 if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
        differences = offline.init_differences(data_dir, given)
        if differences:
            typer.echo("  these flags differ from what it has, and were not applied:")
        for diff in differences:
            typer.echo(f"  {diff.flag}: {diff.stored}; asked for {diff.asked}")
            typer.echo(f"    {diff.todo}")


@cli_app.command("serve")
def serve_command(
    data_dir: DataDirOption = Path("fleetward-data"),
    host: Annotated[str | None, typer.Option(help="address to bind")] = None,
    public_port: Annotated[int | None, typer.Option(help="public HTTP port (8080)")] = None,
    admin_port: Annotated[int | None, typer.Option(help="admin HTTPS port (9443)")] = None,
    device_port: Annotated[int | None, typer.Option(help="device HTTPS port (8443)")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="MQTT over TLS port (8883)")] = None,
    log_level: str = "info",
) -> None:
    """Start every listener."""
    from fleetward import node

    node.configure_logging(log_level)
    try:
        base = load_settings(data_dir).listeners
        listeners = replace(
            base,
            host=host if host is not None else base.host,
            public_port=public_port if public_port is not None else base.public_port,
            admin_port=admin_port if admin_port is not None else base.admin_port,
            device_port=device_port if device_port is not None else base.device_port,
            mqtt_port=mqtt_port if mqtt_port is not None else base.mqtt_port,
        )
        node.serve(data_dir, listeners)
    except FleetwardError as exc:
        fail(exc)


REISSUE_HELP = (
    "Issue a new TLS server certificate (new key) for every listener.\n\n"
    "Works on the data directory itself (database, CA key), with the server stopped or "
    "running; the server presents the new certificate from its next start. It names "
    "localhost, 127.0.0.1 and ::1 and the --hostname names (default: those of the current "
    "certificate). The replaced certificate is marked superseded and revoked as superseded "
    "after --revoke-old-after-hours (by a running server's supersede sweep, or at the next "
    "start), so clients of a server that has not restarted yet are not cut off. Audited as "
    "ca.server_certificate_reissued.")


@ca_app.command("reissue-server-cert", help=REISSUE_HELP)
def reissue_server_cert_command(
    data_dir: DataDirOption = Path("fleetward-data"),
    hostname: Annotated[list[str] | None, typer.Option(
        "--hostname", help="DNS name or IP besides localhost, 127.0.0.1 and ::1 (repeatable); "
                           "replaces the current certificate's; default: keep them")] = None,
    revoke_old_after_hours: Annotated[int, typer.Option(
        min=0, help="revoke the replaced certificate (reason superseded) after this many "
                    "hours; 0: at once")] = 24,
) -> None:
    """Issue a new TLS server certificate for the listeners (see ``REISSUE_HELP``)."""
    from fleetward import node, offline

    node.configure_logging("warning")
    try:
        result = offline.reissue_server_certificate(
            data_dir, hostname, revoke_previous_after=dt.timedelta(hours=revoke_old_after_hours),
            actor=offline.local_actor())
    except FleetwardError as exc:
        fail(exc)
    typer.echo(f"issued server certificate {result.serial} for {', '.join(result.names)}")
    typer.echo(f"  certificate:  {result.cert_file} (valid until "
               f"{result.not_after.date().isoformat()})")
    if result.previous_serial and result.previous_revoked_at:
        when = ("revoked now" if revoke_old_after_hours == 0 else
                f"to be revoked at {result.previous_revoked_at.replace(microsecond=0).isoformat()}")
        typer.echo(f"  replaced:     {result.previous_serial}, superseded; {when}")
    typer.echo("  takes effect: when `fleetward serve` next starts (restart a running server)")


def _verify_locally(data_dir: Path) -> dict[str, Any]:
    from fleetward import node, offline

    node.configure_logging("error")
    return offline.verify_audit(data_dir)


audit_cli.use_local_verifier(_verify_locally)


def main() -> None:
    cli_app()


if __name__ == "__main__":
    main()
