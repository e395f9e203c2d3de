"""``fleetward-agent`` command line, without a server.

Threats: a bootstrap token taken from an ambiguous source (two given: which one was
used?), or from a token file others can read; errors that end in a traceback (leaking
paths and internals, and telling the user nothing) instead of a message and a hint;
a malformed fingerprint that still lets enrollment start writing state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from fleetward.agent.cli import TOKEN_ENV, app, read_token
from fleetward.agent.errors import AgentStateError
from fleetward.errors import InvalidInput
from tests.conftest import free_port

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures structlog process-wide; other tests expect the defaults."""
    yield
    structlog.reset_defaults()


def token_file(tmp_path: Path, text: str = "fwb_abc.def\n", mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_token_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(None, token_file(tmp_path)) == "fwb_abc.def"


def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, " fwb_env.tok\n")
    assert read_token(None, None) == "fwb_env.tok"


def test_a_token_file_wins_over_the_environment(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "fwb_env.tok")
    assert read_token(None, token_file(tmp_path)) == "fwb_abc.def"


def test_two_explicit_token_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="once"):
        read_token("fwb_argv.tok", token_file(tmp_path))


def test_no_token_at_all_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(InvalidInput, match="no bootstrap token") as caught:
        read_token(None, None)
    assert "--token-file" in caught.value.hint


def test_a_world_readable_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AgentStateError, match="readable by other users"):
        read_token(None, token_file(tmp_path, mode=0o644))


def test_help_warns_that_argv_is_visible() -> None:
    result = runner.invoke(app, ["enroll", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "VISIBLE to other users" in result.output


def test_status_of_a_missing_state_dir_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "error:" in result.output and "hint:" in result.output
    assert "fleetward-agent enroll" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_malformed_fingerprint_stops_enroll_before_anything_is_written(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = runner.invoke(app, [
        "enroll", "--server", f"https://127.0.0.1:{free_port()}", "--device-id", "dev-1",
        "--state-dir", str(state), "--ca-fingerprint", "abcd",
        "--token-file", str(token_file(tmp_path))])
    assert result.exit_code == 1
    assert "64 hex digits" in result.output
    assert not state.exists()


def test_an_unreachable_server_stops_enroll_before_anything_is_written(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = runner.invoke(app, [
        "enroll", "--server", f"https://127.0.0.1:{free_port()}", "--device-id", "dev-1",
        "--state-dir", str(state), "--ca-fingerprint", "00" * 32,
        "--token-file", str(token_file(tmp_path))])
    assert result.exit_code == 1
    assert "cannot reach the server" in result.output
    assert not state.exists()


def test_half_the_pkcs11_options_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, [
        "enroll", "--server", "https://127.0.0.1:9", "--device-id", "dev-1",
        "--state-dir", str(tmp_path / "s"), "--ca-fingerprint", "00" * 32,
        "--token-file", str(token_file(tmp_path)), "--pkcs11-module", "/x.so"])
    assert result.exit_code == 1
    assert "--pkcs11-pin-file together" in result.output
