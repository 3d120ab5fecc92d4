"""What every `edgetrain` command prints: results on stdout, errors on stderr."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


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
