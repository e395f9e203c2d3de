"""The credential CLI's id parsing, without a server.

Threats: an id that becomes another API call once it is a URL path segment
(``../policies/x``); a whole API key (``fwk_<id>.<secret>``) echoed back to the terminal
when it is passed where its id belongs; the CLI's idea of a credential id drifting from
the server's.
"""

from __future__ import annotations

import pytest
import typer

from fleetward.cli import credentials as cli
from fleetward.tokens.credentials import CREDENTIAL_ID_PATTERN

KEY_ID = "0123456789abcdef"
SECRET = "s" * 43


def test_the_cli_reads_credential_ids_as_the_server_does() -> None:
    assert cli.CREDENTIAL_ID_PATTERN.pattern == CREDENTIAL_ID_PATTERN.pattern


@pytest.mark.parametrize(("given", "expected"), [
    (f"sk_{KEY_ID}", ("device", f"sk_{KEY_ID}")),
    (f"pk_{KEY_ID}", ("device", f"pk_{KEY_ID}")),
    (f"fwk_{KEY_ID}", ("api-key", KEY_ID)),
    (KEY_ID, ("api-key", KEY_ID)),
])
def test_the_prefix_tells_the_kind(given: str, expected: tuple[str, str]) -> None:
    assert cli.credential_ref(given) == expected


@pytest.mark.parametrize("given", [
    "../policies/x", f"sk_{KEY_ID}/rotate", f"sk_{KEY_ID.upper()}", f"xk_{KEY_ID}",
    f"fwk_{KEY_ID}0", "", f"sk_{KEY_ID}\n"])
def test_anything_else_is_refused_before_it_reaches_a_url(
        given: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit):
        cli.credential_ref(given)
    assert "error:" in capsys.readouterr().err


def test_a_whole_api_key_is_refused_without_echoing_its_secret(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit):
        cli.credential_ref(f"fwk_{KEY_ID}.{SECRET}")
    printed = capsys.readouterr()
    assert SECRET not in printed.err + printed.out
    assert "never put a secret on the command line" in " ".join(printed.err.split())
