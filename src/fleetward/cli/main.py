"""``fleetward`` commands. Everything here goes through the admin API.

Where the API lives: ``--data-dir`` / ``FLEETWARD_DATA_DIR`` on the server host (the
admin URL, token and CA chain are read from it), otherwise ``--admin-url`` with
``FLEETWARD_ADMIN_TOKEN`` (and ``--ca-file`` / ``FLEETWARD_ADMIN_CA``).
"""

from __future__ import annotations

from fleetward.cli import (
    access_tokens,
    audit,
    cas,
    certs,
    credentials,
    device_types,
    devices,
    enroll,
    factory,
    operators,
    policies,
    tokens,
)
from fleetward.cli.common import App
from fleetward.terminal import version_option

app = App(help="Fleetward: device identity, CA and lifecycle for IoT fleets.",
          no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _options(version: bool = version_option()) -> None:
    pass


app.add_typer(devices.app, name="device")
app.add_typer(device_types.app, name="type")
app.add_typer(certs.app, name="cert")
app.add_typer(cas.app, name="ca")
app.add_typer(audit.app, name="audit")
app.add_typer(operators.app, name="operator")
app.add_typer(tokens.app, name="bootstrap-token")
app.add_typer(tokens.app, name="token", help=tokens.ALIAS_HELP, hidden=True)
app.add_typer(access_tokens.app, name="access-token")
app.add_typer(credentials.app, name="credential")
app.add_typer(enroll.app, name="enroll")
app.add_typer(factory.app, name="factory")
app.add_typer(policies.app, name="policy")
