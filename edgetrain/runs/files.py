"""Atomic file writes: write to a temporary name in the same folder, then rename.

A run killed mid-write leaves either the old file or the new one, never half of one; the
temporary file it leaves (``.NAME.<random>.tmp``) is removed by the next run in that folder
(ownership.py). Weights have their own module (weights.py): this one imports no torch, so the
bench driver can use it without loading a framework.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path

OUT_OF_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
# mkstemp creates files readable by their owner only; a finished file gets the permissions any
# other new file would (0o666 less the umask, read once here where no thread can race it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def is_out_of_space(error: BaseException) -> bool:
    """Whether ``error`` means the disk (or the quota) is full."""
    return isinstance(error, OSError) and error.errno in OUT_OF_SPACE


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str, sync: bool = False) -> None:
    """Append ``line`` (one JSON object, no newline) and a newline to a JSON-lines log.

    A crash can leave the log's last line cut short; readers skip that line
    (records.read_jsonl), but a record appended to it would join it and make a damaged line in
    the middle of the log. So an unterminated tail, a fragment no reader uses, is cut off first.
    O_NOFOLLOW: a link planted in place of the log must not make edgetrain write elsewhere;
    and a log with other names (a copy made with hard links, ``cp -al``, ``rsync
    --link-dest``) is first copied to a file of its own, so that appending to this run's log
    never writes into the other copy's.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, FILE_MODE)
    if os.fstat(fd).st_nlink > 1:
        with os.fdopen(fd, "rb") as shared:
            data = shared.read()
        write_bytes_atomic(path, data)
        fd = os.open(path, flags, FILE_MODE)
    with os.fdopen(fd, "r+b") as f:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            start = max(0, size - (1 << 20))
            tail = os.pread(fd, size - start, start)
            os.ftruncate(fd, start + tail.rfind(b"\n") + 1 if b"\n" in tail else start)
        f.write(line.encode() + b"\n")
        f.flush()
        if sync:
            os.fsync(fd)


def write_figure_atomic(fig, path: Path, dpi: int = 120) -> None:
    """A matplotlib figure as a PNG at ``path``, written whole or not at all, and never through
    a link planted at ``path`` (``savefig(path)`` would follow it and write over its target)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_bytes_atomic(path, buffer.getvalue())


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
