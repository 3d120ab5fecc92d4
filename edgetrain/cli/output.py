"""What every `edgetrain` command prints: results on stdout, errors on stderr."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

PIPE_WIDTH = 200
"""Columns of output that is not a terminal (a log file, CI, a pipe): wide enough that no
table column is cut (rich would otherwise assume 80 and shorten headers to `micro-ba…`)."""


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=stderr)  # the terminal's width (or the one COLUMNS asks for)
    return Console(stderr=stderr, width=PIPE_WIDTH)


console = _console()
err_console = _console(stderr=True)


def fail(message: str, code: int) -> None:
    """Print ``error: message`` and exit with ``code``; never a traceback."""
    # escape: the message quotes what the user typed, which is not rich markup ("[/]" would
    # raise, "[[grid]]" would vanish). soft_wrap: the terminal wraps it, so a long path in it
    # stays one piece to copy.
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def say(message: str) -> None:
    """Print plain text (no markup interpretation)."""
    console.print(message, markup=False, highlight=False)


def out_of_space(error: BaseException, what: str) -> bool:
    """If ``error`` is a full disk, say so (``what`` was being written) and exit with code 2;
    otherwise return False so the caller re-raises."""
    from edgetrain.runs.files import is_out_of_space

    if not is_out_of_space(error):
        return False
    where = getattr(error, "filename", None) or what
    fail(f"Ran out of disk space writing {where}. Nothing half-written was left behind; free "
         "space there (or choose another --out) and run the command again.", code=2)
    return True
