"""Checks on the paths a user passes, before anything is read or written.

A missing path is not a problem here: each command says what it needs there. A path that cannot
even be looked up is: a name longer than the filesystem allows, a loop of symbolic links, a
folder on the way that may not be searched. Python raises those from ``Path.exists()`` itself,
so they would otherwise surface as a traceback wherever the path is first touched.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from edgetrain.errors import UserInputError

_SHOWN = 80  # characters of a path quoted in a message; a 5,000-character name helps nobody


def shown(path: Path | str) -> str:
    """``path`` for a message, shortened in the middle if it is very long.

    >>> shown("runs/latest")
    'runs/latest'
    >>> len(shown("a" * 5000)) <= 81
    True
    """
    text = str(path)
    if len(text) <= _SHOWN:
        return text
    half = _SHOWN // 2
    return f"{text[:half]}…{text[-half:]}"


def path_problem(flag: str, path: Path | str | None) -> str | None:
    """Why ``path`` (given as ``flag``) cannot be used at all, or None if it can be looked up.

    >>> path_problem("--out", "no/such/folder") is None
    True
    >>> path_problem("--out", "x" * 5000).endswith("File name too long. Choose a shorter path.")
    True
    """
    if path is None:
        return None
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        fix = ("Choose a shorter path." if e.errno == errno.ENAMETOOLONG
               else "Choose another path.")
        return f"{flag} {shown(path)}: {e.strerror}. {fix}"
    except ValueError as e:  # e.g. an embedded NUL character
        return f"{flag} {shown(path)!r} is not a valid path ({e}). Choose another path."
    return None


def check_paths(*flag_paths: tuple[str, Path | str | None]) -> None:
    """Raise one UserInputError naming every ``(flag, path)`` pair that cannot be used."""
    problems = [p for flag, path in flag_paths if (p := path_problem(flag, path))]
    if problems:
        raise UserInputError(problems)


def folder_problem(flag: str, path: Path) -> str | None:
    """Why a folder cannot be created (or written) at ``path``, or None; creates nothing.

    >>> folder_problem("--out", Path("edgetrain/paths.py"))
    '--out edgetrain/paths.py is a file, not a folder. Choose another --out.'
    >>> folder_problem("--out", Path("edgetrain/paths.py/run")).split(": ")[1]
    'edgetrain/paths.py is a file. Choose another --out.'
    >>> folder_problem("--out", Path("a/new/folder")) is None
    True
    """
    if problem := path_problem(flag, path):
        return problem
    if path.exists() and not path.is_dir():
        return f"{flag} {shown(path)} is a file, not a folder. Choose another {flag}."
    return _creatable(flag, path, path)


def file_problem(flag: str, path: Path) -> str | None:
    """Why a file cannot be written at ``path`` (its folder created if need be), or None.

    >>> file_problem("--out", Path("edgetrain"))
    '--out edgetrain is a folder. Give a file name in it.'
    >>> file_problem("--out", Path("edgetrain/paths.py/model.onnx")).split(": ")[1]
    'edgetrain/paths.py is a file. Choose another --out.'
    """
    if problem := path_problem(flag, path):
        return problem
    if path.is_dir():
        return f"{flag} {shown(path)} is a folder. Give a file name in it."
    return _creatable(flag, path, path.parent)


def _creatable(flag: str, path: Path, folder: Path) -> str | None:
    # The nearest folder that exists decides: mkdir(parents=True) starts there.
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return (f"{flag} {shown(path)} cannot be created: {shown(parent)} is a file. "
                f"Choose another {flag}.")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return (f"{flag} {shown(path)} cannot be written: no permission in {shown(parent)}. "
                f"Choose a folder you can write to.")
    return None
