"""What both CLIs print, without a server.

Threats: a fingerprint compared by eye that is not the one checked (Rich read ``:ab:`` in
``3B:AB:C7`` as an emoji code and printed ``3B🆎C7``); server or user data read as Rich
markup (a device named ``[bold]x[/]`` changes what the line says, a ``[/]`` it did not
open ends in a MarkupError traceback); help that makes a flag look like it takes a value
(``--json <bool>``), or a default nobody can type back (``0.6666666666666666``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import structlog
import typer
from rich.console import Console
from typer.main import get_command
from typer.testing import CliRunner

import fleetward.server  # noqa: F401  (adds `init` and `serve` to the admin app)
from fleetward import __version__
from fleetward.agent import cli as agent_cli
from fleetward.cli import common
from fleetward.cli.main import app as admin_app
from fleetward.errors import InvalidInput

runner = CliRunner()
# As the agent's pin-mismatch error spells a digest (est_client.format_fingerprint).
FINGERPRINT = "3A:93:3B:AB:C7:8A:" + ":".join(["AB"] * 26)
MARKUP = "[bold]sensor[/bold] [/]"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The agent CLI configures structlog process-wide; other tests expect the defaults."""
    yield
    structlog.reset_defaults()


@pytest.mark.parametrize("console", [common.out, common.err, agent_cli.out, agent_cli.err],
                         ids=["fleetward-out", "fleetward-err", "agent-out", "agent-err"])
def test_no_console_turns_colon_codes_into_emoji(console: Console) -> None:
    with console.capture() as captured:
        console.print(f"fingerprint {FINGERPRINT} :smile: :ab:", highlight=False)
    assert captured.get() == f"fingerprint {FINGERPRINT} :smile: :ab:\n"


@pytest.mark.parametrize("fail", [common.fail, agent_cli.fail], ids=["fleetward", "agent"])
def test_fail_prints_message_and_hint_verbatim(fail: object,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    exc = InvalidInput(f"no CA has the pinned fingerprint {FINGERPRINT} (device {MARKUP})",
                       hint="pin [red]the root[/red] CA :ab:")
    with pytest.raises(typer.Exit):
        fail(exc)  # type: ignore[operator]
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines == [f"error: no CA has the pinned fingerprint {FINGERPRINT} (device {MARKUP})",
                     "hint: pin [red]the root[/red] CA :ab:"]


def test_table_cells_and_title_are_text_not_markup(capsys: pytest.CaptureFixture[str]) -> None:
    common.table(f"Device {MARKUP}", ["id", "value"],
                 [["dev:ab:1", MARKUP], ["d2", None]])
    printed = capsys.readouterr().out
    for value in (f"Device {MARKUP}", "dev:ab:1", MARKUP):
        assert value in printed, printed
    assert "🆎" not in printed


# A subject from a manufacturer certificate (``enroll pending``) is device-controlled:
# clear screen, retitle the terminal, a right-to-left override.
HOSTILE = "CN=x\x1b[2J\x1b]0;pwned\x07\u202eyz"


def test_control_characters_are_shown_not_sent_to_the_terminal(
        capsys: pytest.CaptureFixture[str]) -> None:
    common.table("Enrollments", ["subject"], [[HOSTILE]])
    common.out.print(f"subject {HOSTILE}", markup=False)
    common.warn(HOSTILE)
    printed = capsys.readouterr()
    for stream in (printed.out, printed.err):
        assert "\x1b" not in stream and "\x07" not in stream and "\u202e" not in stream
    assert "CN=x\\x1b[2J\\x1b]0;pwned\\x07\\u202eyz" in printed.out
    assert "\\x1b[2J" in printed.err


def test_warnings_are_data_too(capsys: pytest.CaptureFixture[str]) -> None:
    common.warn(f"policy {MARKUP} denies :ab:", hint="attach [default] too")
    assert capsys.readouterr().err.splitlines() == [
        f"warning: policy {MARKUP} denies :ab:", "hint: attach [default] too"]


def _help_pages(app: typer.Typer) -> Iterator[tuple[list[str], str]]:
    """``--help`` of every group and command of ``app``, with its argv."""
    def walk(command: object, path: list[str]) -> Iterator[list[str]]:
        yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    for path in walk(get_command(app), []):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        yield path, result.output


@pytest.mark.parametrize("app", [admin_app, agent_cli.app], ids=["fleetward", "agent"])
def test_no_help_page_shows_a_value_for_a_flag(app: typer.Typer) -> None:
    pages = list(_help_pages(app))
    assert len(pages) > 4  # the walk found the commands
    for path, text in pages:
        assert not re.search(r"<bool>|BOOLEAN|\bbool\b", text), (path, text)
        assert "--no-" not in text, (path, text)  # plain --flag unless both make sense
        assert "--help " in text


def test_the_renew_fraction_default_reads_as_a_fraction() -> None:
    for command in ("renew", "run", "status"):
        text = runner.invoke(agent_cli.app, [command, "--help"],
                             env={"COLUMNS": "200"}).output
        assert "0.666" not in text, text
        assert "[default: (2/3)]" in text, text


@pytest.mark.parametrize(("text", "value"), [("2/3", 2 / 3), ("0.75", 0.75), ("3/4", 0.75),
                                             (" 1/2 ", 0.5)])
def test_the_renew_fraction_takes_what_the_help_shows(text: str, value: float) -> None:
    assert agent_cli.parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["two thirds", "1/0", ""])
def test_a_renew_fraction_that_is_not_a_number_is_a_usage_error(
        tmp_path: object, text: str) -> None:
    result = runner.invoke(agent_cli.app, ["status", "--state-dir", str(tmp_path),
                                           "--renew-fraction", text], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "is not a fraction such as 0.66 or 2/3" in result.output, result.output


@pytest.mark.parametrize("app", [admin_app, agent_cli.app], ids=["fleetward", "agent"])
def test_version(app: typer.Typer) -> None:
    result = runner.invoke(app, ["--version"])
    assert (result.exit_code, result.stdout) == (0, f"fleetward {__version__}\n")


def test_device_add_help_names_the_default_type() -> None:
    text = runner.invoke(admin_app, ["device", "add", "--help"],
                         env={"COLUMNS": "200"}).output
    assert "built-in type 'default'" in text and "[default: default]" in text
