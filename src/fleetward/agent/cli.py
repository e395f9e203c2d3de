"""``fleetward-agent``: the device side of Fleetward.

    fleetward-agent enroll --server URL --device-id ID --state-dir DIR --ca-fingerprint HEX
                           [--token-file F | env FLEETWARD_BOOTSTRAP_TOKEN | --token T]
                           [--label L] [--pkcs11-module M --pkcs11-token-label L
                                        --pkcs11-pin-file F]
    fleetward-agent renew  --state-dir DIR [--force]
    fleetward-agent run    --state-dir DIR [--renew-fraction 0.66]
    fleetward-agent status --state-dir DIR

Secrets never go on the command line by default: other users of the device can read
every process's argv (``ps``, ``/proc/<pid>/cmdline``). ``--token`` exists for
one-off tests only; use ``--token-file`` or ``FLEETWARD_BOOTSTRAP_TOKEN``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated, NoReturn

import structlog
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fleetward.agent.enroll import EnrollOptions, Pkcs11Options, enroll
from fleetward.agent.errors import EnrollmentPending
from fleetward.agent.est_client import parse_fingerprint
from fleetward.agent.renewal import DEFAULT_RENEW_FRACTION, open_agent, validate_fraction
from fleetward.agent.state import StateLayout, read_secret_file
from fleetward.errors import FleetwardError, InvalidInput

TOKEN_ENV = "FLEETWARD_BOOTSTRAP_TOKEN"
EXIT_ERROR = 1
EXIT_PENDING = 3  # enrollment accepted, waiting for an operator: run the command again

app = typer.Typer(help="Fleetward device agent: enroll, renew and keep the device "
                       "certificate fresh.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
# soft_wrap: a message is one line in a log or a pipe, not cut at 80 columns
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

StateDir = Annotated[Path, typer.Option("--state-dir", envvar="FLEETWARD_AGENT_STATE_DIR",
                                        help="the agent's state directory (created 0700)")]
Fraction = Annotated[float, typer.Option(
    "--renew-fraction", help="renew after this fraction of the certificate lifetime")]


def fail(exc: FleetwardError) -> NoReturn:
    # escape(): a message may contain [brackets] that Rich would read as markup
    err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
    err.print(f"[yellow]hint:[/] {escape(exc.hint)}", highlight=False)
    raise typer.Exit(EXIT_PENDING if isinstance(exc, EnrollmentPending) else EXIT_ERROR)


def configure_logging(level: int) -> None:
    """JSON lines on stderr (what a service manager's journal wants); stdout stays for
    the command's own output."""
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # sys.stderr looked up per logger: it may be replaced (tests, daemonisers)
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False)


def read_token(token: str | None, token_file: Path | None) -> str:
    """The bootstrap token from exactly one of: --token-file, --token, the environment.

    Raises:
        InvalidInput: none or more than one given.
    """
    env_token = os.environ.get(TOKEN_ENV)
    given = [s for s, v in (("--token", token), ("--token-file", token_file)) if v is not None]
    if len(given) > 1:
        raise InvalidInput("give the bootstrap token once",
                           hint="use either --token-file or --token")
    if token_file is not None:
        return read_secret_file(token_file, "bootstrap token").decode().strip()
    if token is not None:
        return token
    if env_token:
        return env_token.strip()
    raise InvalidInput("no bootstrap token",
                       hint=f"pass --token-file FILE (mode 0600) or set {TOKEN_ENV}; "
                            "the operator creates one with the admin API or CLI")


@app.callback()
def _quiet_by_default() -> None:
    # One-shot commands report on stdout themselves; their logs only matter when
    # something needs attention. `run` raises the level to info.
    configure_logging(logging.WARNING)


@app.command("enroll")
def enroll_command(
    server: Annotated[str, typer.Option("--server", help="device listener, https://host:8443")],
    device_id: Annotated[str, typer.Option("--device-id", help="this device's id")],
    state_dir: StateDir,
    ca_fingerprint: Annotated[str, typer.Option(
        "--ca-fingerprint", help="SHA-256 fingerprint of the server's root (or issuing) CA, "
                                 "obtained out of band")],
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="file holding the one-time bootstrap token (mode 0600)")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", help=f"the bootstrap token; VISIBLE to other users in the process list: "
                        f"prefer --token-file or {TOKEN_ENV}")] = None,
    label: Annotated[str | None, typer.Option(
        "--label", help="EST label (certificate profile), e.g. gateway")] = None,
    key_passphrase_file: Annotated[Path | None, typer.Option(
        "--key-passphrase-file", help="passphrase for the encrypted key file (mode 0600); "
                                      "default: generated in the state dir")] = None,
    pkcs11_module: Annotated[str | None, typer.Option(
        "--pkcs11-module", help="PKCS#11 module: keep the key on a token")] = None,
    pkcs11_token_label: Annotated[str | None, typer.Option("--pkcs11-token-label")] = None,
    pkcs11_pin_file: Annotated[Path | None, typer.Option(
        "--pkcs11-pin-file", help="file holding the token's user PIN (mode 0600)")] = None,
) -> None:
    """Enroll this device: pin the CA, generate a key, trade the token for a certificate."""
    try:
        pkcs11 = _pkcs11_options(pkcs11_module, pkcs11_token_label, pkcs11_pin_file)
        if pkcs11 is not None and key_passphrase_file is not None:
            raise InvalidInput("--key-passphrase-file is for the file keystore only",
                               hint="a token key is protected by the token PIN")
        options = EnrollOptions(
            server_url=server, device_id=device_id, token=read_token(token, token_file),
            ca_fingerprint=parse_fingerprint(ca_fingerprint), state_dir=state_dir,
            est_label=label, passphrase_file=key_passphrase_file, pkcs11=pkcs11)
        cert = enroll(options)
    except FleetwardError as exc:
        fail(exc)
    out.print(f"device [bold]{device_id}[/] enrolled: certificate "
              f"{format(cert.serial_number, 'x')}, valid until "
              f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; state in {state_dir}")


def _pkcs11_options(module: str | None, token_label: str | None,
                    pin_file: Path | None) -> Pkcs11Options | None:
    given = [module, token_label, pin_file]
    if all(v is None for v in given):
        return None
    if module is None or token_label is None or pin_file is None:
        raise InvalidInput("a PKCS#11 key needs --pkcs11-module, --pkcs11-token-label and "
                           "--pkcs11-pin-file together",
                           hint="e.g. --pkcs11-module /usr/lib/softhsm/libsofthsm2.so")
    return Pkcs11Options(module=module, token_label=token_label, pin_file=pin_file)


@app.command("renew")
def renew_command(state_dir: StateDir,
                  force: Annotated[bool, typer.Option(
                      "--force", help="renew now even if not due")] = False,
                  renew_fraction: Fraction = DEFAULT_RENEW_FRACTION) -> None:
    """Renew the certificate if it is due (or now, with --force)."""
    try:
        outcome = open_agent(StateLayout(state_dir)).renew(force=force, fraction=renew_fraction)
    except FleetwardError as exc:
        fail(exc)
    cert = outcome.certificate
    if not outcome.renewed:
        out.print(f"not due: certificate {format(cert.serial_number, 'x')} renews at "
                  f"{outcome.next_renewal:%Y-%m-%d %H:%M} UTC (use --force to renew now)")
        return
    how = "new key" if outcome.mode == "new-key" else "same key (the old one had expired)"
    out.print(f"renewed ({how}): certificate {format(cert.serial_number, 'x')}, valid until "
              f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


@app.command("run")
def run_command(state_dir: StateDir, renew_fraction: Fraction = DEFAULT_RENEW_FRACTION,
                verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Keep running: renew at each renewal point, retry failures with backoff."""
    configure_logging(logging.DEBUG if verbose else logging.INFO)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        validate_fraction(renew_fraction)
        agent = open_agent(StateLayout(state_dir), sleep=stop.wait)
        agent.run(fraction=renew_fraction, stop=stop)
    except FleetwardError as exc:
        fail(exc)


@app.command("status")
def status_command(state_dir: StateDir,
                   renew_fraction: Fraction = DEFAULT_RENEW_FRACTION) -> None:
    """Show the device id, certificate serial, expiry and next renewal."""
    try:
        status = open_agent(StateLayout(state_dir)).status(renew_fraction)
    except FleetwardError as exc:
        fail(exc)
    table = Table(title="fleetward-agent", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for name, value in (("device id", status.device_id), ("server", status.server_url),
                        ("keystore", status.keystore), ("serial", status.serial),
                        ("not before", f"{status.not_before:%Y-%m-%d %H:%M:%S} UTC"),
                        ("not after", f"{status.not_after:%Y-%m-%d %H:%M:%S} UTC"),
                        ("next renewal", f"{status.next_renewal:%Y-%m-%d %H:%M:%S} UTC"),
                        ("state", status.state)):
        table.add_row(name, value)
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
