"""Terminal output rules shared by both command-line programs, ``fleetward`` and
``fleetward-agent`` (the agent imports nothing else from the server side).

* ``console()``: emoji codes off (Rich printed the fingerprint ``3B:AB:C7`` as
  ``3B🆎C7``), soft wrap on (a status line stays one line in a log or a pipe, never
  broken inside a serial or a path), and control characters in printed strings shown as
  escapes (a certificate subject with ESC sequences must not repaint the operator's
  terminal; Rich's ``Text`` strips only BEL, BS, VT, FF and CR). Dynamic values are still
  escaped or printed as ``Text`` by the callers: Rich reads ``[bold]`` in a device id as
  markup. ``printable()`` is the same rule for ``Text`` the callers build.
* ``App``: a ``typer.Typer`` whose help shows flags without a value placeholder
  (``--json``, not ``--json <bool>``), ``--help`` included.
* ``version_option``: the ``--version`` flag of a root command.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup, TyperOption
from typer.models import CommandFunctionType

from fleetward import __version__


def printable(text: str) -> str:
    """``text`` with every non-printable character but the newline as a ``\\x..`` /
    ``\\u....`` escape (terminal escape sequences, bidi overrides, NUL)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\n" else
                   (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
                   for ch in text)


class _Console(Console):
    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects),
                      **kwargs)


def console(*, stderr: bool = False) -> Console:
    return _Console(stderr=stderr, emoji=False, soft_wrap=True)


def _plain_flags(params: list[Any]) -> list[Any]:
    """Typer's Rich help prints a value type after every option, so a flag read
    ``--force <bool>`` as if it took a value; an empty metavar prints none."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class App(typer.Typer):
    """``typer.Typer`` whose commands and groups show flags without a value type."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", _Group)
        super().__init__(**kwargs)

    def command(self, name: str | None = None, **kwargs: Any
                ) -> Callable[[CommandFunctionType], CommandFunctionType]:
        kwargs.setdefault("cls", _Command)
        return super().command(name, **kwargs)


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"fleetward {__version__}\n")
        raise typer.Exit()


def version_option() -> Any:
    """The default of a root callback's ``version: bool`` parameter: ``--version``."""
    return typer.Option(False, "--version", is_eager=True, callback=_print_version,
                        help="print the version and exit")
