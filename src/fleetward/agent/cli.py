"""``fleetward-agent``: the device side of Fleetward.

    fleetward-agent enroll --server URL --device-id ID --state-dir DIR --ca-fingerprint HEX
                           [--token-file F | env FLEETWARD_BOOTSTRAP_TOKEN | --token T]
                           [--label L] [--pkcs11-module M --pkcs11-token-label L
                                        --pkcs11-pin-file F]
    fleetward-agent init   --server URL --device-id ID --state-dir DIR
                           (--ca-fingerprint HEX | --ca-file chain.pem)
                           --auth token [--token-binding auto|certificate|key]
                                        [--pkcs11-module M --pkcs11-token-label L
                                         --pkcs11-pin-file F]      > device-public-key.pem
                         | --auth sas --key-file F
                           [--mqtt-url mqtts://HOST:8883]
    fleetward-agent renew  --state-dir DIR [--force]
    fleetward-agent run    --state-dir DIR [--mqtt | --https] [--mqtt-url mqtts://HOST:8883]
                           [--auth mtls|token|sas] [--token-binding auto|certificate|key]
                           [--source sim|stdin|script:PATH|none] [--interval S] [--count N]
                           [--command-handler PATH] [--exit-on-refusal] [--renew-only] …
    fleetward-agent status --state-dir DIR

Secrets never go on the command line by default: other users of the device can read
every process's argv (``ps``, ``/proc/<pid>/cmdline``). ``--token`` exists for
one-off tests only; use ``--token-file`` or ``FLEETWARD_BOOTSTRAP_TOKEN``. A symmetric
key is read from a 0600 file only (``--key-file``).
"""

from __future__ import annotations

import dataclasses
import fractions
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
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fleetward.agent.enroll import EnrollOptions, Pkcs11Options, enroll
from fleetward.agent.errors import AgentStateError, EnrollmentPending
from fleetward.agent.est_client import parse_fingerprint
from fleetward.agent.provision import InitOptions, init_device
from fleetward.agent.renewal import DEFAULT_RENEW_FRACTION, open_agent, validate_fraction
from fleetward.agent.run import EXIT_REFUSED, RunOptions, run_agent
from fleetward.agent.state import (
    StateLayout,
    load_config,
    read_secret_file,
    save_config,
    state_lock,
    validate_auth_mode,
    validate_mqtt_url,
    validate_token_binding,
)
from fleetward.agent.telemetry import DEFAULT_MESSAGE_TYPE, make_source
from fleetward.agent.tokens import SAS_VALIDITY_SECONDS, auth_summary, token_status_rows
from fleetward.clock import SystemClock
from fleetward.errors import FleetwardError, InvalidInput
from fleetward.terminal import App, console, printable, version_option

TOKEN_ENV = "FLEETWARD_BOOTSTRAP_TOKEN"
EXIT_ERROR = 1
EXIT_PENDING = 3  # enrollment accepted, waiting for an operator: run the command again



app = App(help="Fleetward device agent: enroll, keep the device certificate fresh, send "
                "telemetry and answer commands over MQTT or HTTPS.",
          no_args_is_help=True, pretty_exceptions_enable=False)
# soft_wrap: a message is one line in a log or a pipe, not cut at 80 columns.
# emoji=False: Rich would print the fingerprint "3B:AB:C7" as "3B🆎C7".
out = console()
err = console(stderr=True)


def parse_fraction(value: str | float) -> float:
    """``--renew-fraction`` as a decimal (0.66) or a ratio (2/3, as the help shows the
    default).

    Raises:
        typer.BadParameter: neither.
    """
    if isinstance(value, float):
        return value
    try:
        return float(fractions.Fraction(value.strip()))
    except (ValueError, ZeroDivisionError):
        raise typer.BadParameter(f"{value!r} is not a fraction such as 0.66 or 2/3") from None


# Where the device key lives: the options enroll and init share.
KeyPassphraseFile = Annotated[Path | None, typer.Option(
    "--key-passphrase-file", help="passphrase for the encrypted key file (mode 0600); "
                                  "default: generated in the state dir")]
Pkcs11Module = Annotated[str | None, typer.Option(
    "--pkcs11-module", help="PKCS#11 module: keep the key on a token")]
Pkcs11TokenLabel = Annotated[str | None, typer.Option("--pkcs11-token-label")]
Pkcs11PinFile = Annotated[Path | None, typer.Option(
    "--pkcs11-pin-file", help="file holding the token's user PIN (mode 0600)")]
StateDir = Annotated[Path, typer.Option("--state-dir", envvar="FLEETWARD_AGENT_STATE_DIR",
                                        help="the agent's state directory (created 0700)")]
TokenBinding = Annotated[str | None, typer.Option(
    "--token-binding", metavar="auto|certificate|key",
    help="what access tokens are bound to: the certificate (Bearer over mTLS) or the "
         "device key (DPoP); auto: the certificate when the key is a file, else the key")]
Fraction = Annotated[float, typer.Option(
    "--renew-fraction", parser=parse_fraction, metavar="<fraction>", show_default="2/3",
    help="renew after this fraction of the certificate lifetime, e.g. 0.75 or 3/4")]


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
def _quiet_by_default(version: bool = version_option()) -> None:
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
    key_passphrase_file: KeyPassphraseFile = None,
    pkcs11_module: Pkcs11Module = None,
    pkcs11_token_label: Pkcs11TokenLabel = None,
    pkcs11_pin_file: Pkcs11PinFile = None,
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
    out.print(f"device [bold]{escape(device_id)}[/] enrolled: certificate "
              f"{format(cert.serial_number, 'x')}, valid until "
              f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; state in "
              f"{escape(str(state_dir))}")


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


@app.command("init")
def init_command(
    server: Annotated[str, typer.Option("--server", help="device listener, https://host:8443")],
    device_id: Annotated[str, typer.Option("--device-id", help="this device's id")],
    state_dir: StateDir,
    auth: Annotated[str, typer.Option(
        "--auth", metavar="token|sas",
        help="token: generate a key pair and use access tokens (prints the public key to "
             "register); sas: use SAS tokens signed with the symmetric key in --key-file")],
    ca_fingerprint: Annotated[str | None, typer.Option(
        "--ca-fingerprint", help="SHA-256 fingerprint of the server's root (or issuing) CA, "
                                 "obtained out of band")] = None,
    ca_file: Annotated[Path | None, typer.Option(
        "--ca-file", help="the server's CA certificates (PEM), obtained out of band, "
                          "instead of --ca-fingerprint")] = None,
    key_file: Annotated[Path | None, typer.Option(
        "--key-file", help="--auth sas: file holding the device's symmetric key, base64 as "
                           "the server showed it (mode 0600)")] = None,
    mqtt_url: Annotated[str | None, typer.Option(
        "--mqtt-url", help="MQTT listener, mqtts://host:8883 (default: the server's host, "
                           "port 8883)")] = None,
    token_binding: TokenBinding = None,
    key_passphrase_file: KeyPassphraseFile = None,
    pkcs11_module: Pkcs11Module = None,
    pkcs11_token_label: Pkcs11TokenLabel = None,
    pkcs11_pin_file: Pkcs11PinFile = None,
) -> None:
    """Set up a device that authenticates with access tokens or SAS tokens (no
    enrollment): pin the CA, record the mode, create the key pair or store the key."""
    try:
        pkcs11 = _pkcs11_options(pkcs11_module, pkcs11_token_label, pkcs11_pin_file)
        result = init_device(InitOptions(
            server_url=server, device_id=device_id, state_dir=state_dir, auth=auth,
            ca_fingerprint=parse_fingerprint(ca_fingerprint) if ca_fingerprint else None,
            ca_file=ca_file, mqtt_url=mqtt_url, key_file=key_file,
            token_binding=token_binding or "auto", passphrase_file=key_passphrase_file,
            pkcs11=pkcs11))
    except FleetwardError as exc:
        fail(exc)
    if result.public_key_pem is not None:
        # stdout is the public key alone, so `init … > device.pub` gives the file to
        # register; the guidance goes to stderr.
        sys.stdout.write(result.public_key_pem.decode("ascii"))
        sys.stdout.flush()
        what = "generated" if result.created_key else "kept"
        err.print(f"device [bold]{escape(device_id)}[/] set up for access tokens (key pair "
                  f"{what}; state in {escape(str(state_dir))}). Register the public key "
                  f"above on the server:\n  fleetward credential add --device "
                  f"{escape(device_id)} --kind public-key --public-key FILE", highlight=False)
        return
    out.print(f"device [bold]{escape(device_id)}[/] set up for SAS tokens; its symmetric key "
              f"is stored in {escape(str(state_dir))} (mode 0600)", highlight=False)


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
def run_command(
    state_dir: StateDir,
    mqtt: Annotated[bool, typer.Option("--mqtt", help="talk MQTT over TLS (default for a "
                                                      "key file)")] = False,
    https: Annotated[bool, typer.Option("--https", help="use the HTTPS device API (default "
                                                        "for a PKCS#11 key)")] = False,
    mqtt_url: Annotated[str | None, typer.Option(
        "--mqtt-url", help="MQTT listener, mqtts://host:8883 (saved in agent.toml; default: "
                           "the server's host, port 8883)")] = None,
    mqtt_version: Annotated[str, typer.Option("--mqtt-version", help="5 or 3.1.1")] = "5",
    auth: Annotated[str | None, typer.Option(
        "--auth", metavar="mtls|token|sas",
        help="authenticate with the certificate (mtls), access tokens (token) or SAS tokens "
             "(sas); saved in agent.toml")] = None,
    token_binding: TokenBinding = None,
    sas_validity: Annotated[int, typer.Option(
        "--sas-validity", help="--auth sas: seconds each SAS token is valid (a new one is "
                               "used after two thirds of that)")] = SAS_VALIDITY_SECONDS,
    qos: Annotated[int, typer.Option("--qos", help="MQTT QoS of telemetry: 0 or 1")] = 1,
    keepalive: Annotated[int, typer.Option("--keepalive", help="MQTT keep-alive, seconds")] = 60,
    source: Annotated[str, typer.Option(
        "--source", help="telemetry: sim, stdin (a JSON object per line), script:PATH "
                         "(run every interval; stdout = one JSON object) or none")] = "sim",
    seed: Annotated[int | None, typer.Option("--seed", help="seed of the sim source")] = None,
    interval: Annotated[float, typer.Option("--interval", help="seconds between readings "
                                                               "(sim, script)")] = 10.0,
    message_type: Annotated[str, typer.Option(
        "--message-type", help="telemetry message type (topic level)")] = DEFAULT_MESSAGE_TYPE,
    count: Annotated[int | None, typer.Option(
        "--count", help="exit after N records have been sent")] = None,
    buffer_size: Annotated[int, typer.Option(
        "--buffer-size", help="records kept while offline; the oldest are dropped "
                              "beyond")] = 1000,
    command_handler: Annotated[Path | None, typer.Option(
        "--command-handler", help="executable for commands other than ping and "
                                  "set-interval: command JSON on stdin, exit 0 = "
                                  "succeeded, stdout JSON = result")] = None,
    command_timeout: Annotated[float, typer.Option(
        "--command-timeout", help="seconds before the handler is killed")] = 60.0,
    poll_wait: Annotated[int, typer.Option(
        "--poll-wait", help="HTTPS: seconds a command long-poll waits")] = 20,
    exit_on_refusal: Annotated[bool, typer.Option(
        "--exit-on-refusal", help=f"exit with status {EXIT_REFUSED} when the server refuses this "
                                  "device (revoked, banned, not authorized) instead of "
                                  "retrying slowly")] = False,
    renew_only: Annotated[bool, typer.Option(
        "--renew-only", help="only keep the certificate fresh (no channel)")] = False,
    renew_fraction: Fraction = DEFAULT_RENEW_FRACTION,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Connect, send telemetry, answer commands, reconnect with backoff, renew."""
    configure_logging(logging.DEBUG if verbose else logging.INFO)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    layout = StateLayout(state_dir)
    try:
        validate_fraction(renew_fraction)
        if renew_only:
            agent = open_agent(layout, sleep=stop.wait)
            agent.run(fraction=renew_fraction, stop=stop)
            return
        if mqtt and https:
            raise InvalidInput("choose one channel", hint="give either --mqtt or --https")
        if mqtt_url is not None:
            _save_mqtt_url(layout, mqtt_url)
        if auth is not None or token_binding is not None:
            _save_auth(layout, auth, token_binding)
        options = RunOptions(
            channel="mqtt" if mqtt else "https" if https else None, mqtt_version=mqtt_version,
            qos=qos, keepalive_seconds=keepalive, message_type=message_type,
            interval_seconds=interval, count=count, buffer_max_records=buffer_size,
            exit_on_refusal=exit_on_refusal, renew_fraction=renew_fraction,
            command_handler=command_handler, handler_timeout_seconds=command_timeout,
            poll_wait_seconds=poll_wait, sas_validity_seconds=sas_validity)
        telemetry = make_source(source, message_type=message_type, seed=seed,
                                stdin=sys.stdin.buffer)
        stats = run_agent(layout, options, stop, source=telemetry)
    except FleetwardError as exc:
        fail(exc)
    if stats.exit_code:
        raise typer.Exit(stats.exit_code)


def _save_mqtt_url(layout: StateLayout, url: str) -> None:
    """Record ``--mqtt-url`` in agent.toml (before anything else reads the config)."""
    validate_mqtt_url(url)
    load_config(layout)  # not enrolled: a clear error before the lock file is created
    with state_lock(layout):
        config = load_config(layout)
        if config.mqtt_url != url:
            save_config(layout, dataclasses.replace(config, mqtt_url=url))


def _save_auth(layout: StateLayout, auth: str | None, token_binding: str | None) -> None:
    """Record ``--auth`` / ``--token-binding`` in agent.toml, after checking that the
    state has what the mode needs.

    Raises:
        InvalidInput: an unknown mode or binding.
        AgentStateError: the state lacks the certificate, key pair or symmetric key.
    """
    if auth is not None:
        validate_auth_mode(auth)
    if token_binding is not None:
        validate_token_binding(token_binding)
    load_config(layout)  # not set up: a clear error before the lock file is created
    with state_lock(layout):
        config = load_config(layout)
        changed = dataclasses.replace(config, auth=auth or config.auth,
                                      token_binding=token_binding or config.token_binding)
        if changed.auth == "mtls" and not layout.cert.exists():
            raise AgentStateError("--auth mtls needs a certificate, and this device has none",
                                  hint="enroll first (fleetward-agent enroll), or use "
                                       "--auth token / --auth sas")
        if changed.auth == "sas" and not layout.symmetric_key.exists():
            raise AgentStateError("--auth sas needs the device's symmetric key",
                                  hint="store it with fleetward-agent init --auth sas "
                                       "--key-file FILE …")
        if changed != config:
            save_config(layout, changed)


@app.command("status")
def status_command(state_dir: StateDir,
                   renew_fraction: Fraction = DEFAULT_RENEW_FRACTION) -> None:
    """Show the device id, how it authenticates, its certificate (serial, expiry, next
    renewal) and, with access tokens, the current token's binding and expiry."""
    layout = StateLayout(state_dir)
    try:
        agent = open_agent(layout)
        config = load_config(layout)
        has_certificate = layout.cert.exists()
        status = agent.status(renew_fraction) if has_certificate else None
    except FleetwardError as exc:
        fail(exc)
    rows = [("device id", config.device_id), ("server", config.server_url),
            ("mqtt", config.effective_mqtt_url()),
            ("auth", auth_summary(config, agent.keystore.kind, has_certificate)),
            ("keystore", agent.keystore.kind)]
    if status is not None:
        rows += [("serial", status.serial),
                 ("not before", f"{status.not_before:%Y-%m-%d %H:%M:%S} UTC"),
                 ("not after", f"{status.not_after:%Y-%m-%d %H:%M:%S} UTC"),
                 ("next renewal", f"{status.next_renewal:%Y-%m-%d %H:%M:%S} UTC"),
                 ("state", status.state)]
    else:
        rows.append(("certificate", "none (this device authenticates without one)"))
    if config.auth == "token":
        rows += token_status_rows(layout, SystemClock().now())
    elif config.auth == "sas":
        rows.append(("symmetric key", "stored (0600)" if layout.symmetric_key.exists()
                     else "MISSING: fleetward-agent init --auth sas --key-file FILE"))
    table = Table(title="fleetward-agent", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")  # serials are copied: fold, never "…"
    for name, value in rows:
        table.add_row(name, Text(printable(value)))  # a value is never markup
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
