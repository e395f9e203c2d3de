"""The console entry point: the ``fleetward`` CLI plus ``init`` and ``serve``.

Nothing imports this module. It adds the two commands that need concrete stores and
keys to the Typer app from ``fleetward.cli`` (which otherwise talks to the admin API
only) and imports their wiring, ``fleetward.node``, only when one of them runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

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


@cli_app.command("init")
def init_command(
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


def main() -> None:
    cli_app()


if __name__ == "__main__":
    main()
