"""One writer per run folder: an advisory ``flock`` held for the whole life of a command.

``fit`` (new run, ``--resume``, ``--overwrite``) takes the folder's lock exclusively before it
writes or deletes anything there, and holds it until it returns; readers (``export``,
``export-artifacts``) take it shared, so a run cannot be replaced under them; a reader opens the
lock file read-only, so a run on read-only storage can still be read. A second process
gets a clear error naming the holder's pid instead of interleaving its writes. The kernel drops
the lock when the holder dies (SIGKILL included), so a crash never leaves a folder locked; the
lock file itself stays, which is harmless.

Where ``fcntl`` does not exist (Windows) the lock is a no-op and says so in ``RunLock.kind``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from edgetrain.errors import UserInputError
from edgetrain.paths import shown

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".edgetrain.lock"


class RunLockedError(UserInputError):
    """Another process holds the run folder."""


class RunLock:
    """``with RunLock(folder, "--out"):``: hold ``folder``'s lock (exclusive by default).

    The lock file is opened without following a symbolic link, so a planted link cannot make
    edgetrain create or truncate a file elsewhere.
    """

    def __init__(self, folder: Path, flag: str, shared: bool = False):
        self.folder = Path(folder)
        self.flag = flag
        self.shared = shared
        self._fd: int | None = None
        self.kind = "flock" if fcntl is not None else "none"

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        safe = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = None
            if self.shared:
                # A reader needs no write access: flock works on a read-only descriptor, so a
                # run on read-only storage (or someone else's) can still be exported.
                try:
                    fd = os.open(self.path, os.O_RDONLY | safe)
                except FileNotFoundError:
                    pass
            if fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | safe, 0o644)
        except OSError as e:
            if self.shared and e.errno == errno.EROFS:
                self.kind = "none (read-only file system: nobody writes there)"
                return self
            what = ("Choose a folder you can read." if self.shared
                    else "Choose a folder you can write to.")
            raise UserInputError(f"{self.flag} {shown(self.folder)}: cannot open its lock file "
                                 f"{LOCK_FILE} ({e.strerror}). {what}") from None
        if not self.shared and (problem := _not_a_lock_file(fd)):
            os.close(fd)
            raise UserInputError(f"{self.flag} {shown(self.folder)}: its {LOCK_FILE} {problem}, "
                                 "so it is not edgetrain's lock file, and edgetrain would write "
                                 "over it. Move it away, or choose another "
                                 f"{self.flag}.")
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise RunLockedError(
                f"{self.flag} {shown(self.folder)} is in use by another edgetrain process "
                f"({who}). Wait for it to finish or stop it, or choose another {self.flag}."
            ) from None
        if not self.shared:
            # The holder's pid, for the message above; written only once the lock is ours.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _not_a_lock_file(fd: int) -> str | None:
    """Why the open file ``fd`` is not a lock file edgetrain made (empty, or a pid), or None:
    the holder writes its pid into it, which must never truncate a file of the user's (one
    of that name, or a hard link to one). A hard link to a real lock file (a backup made
    with ``cp -al``) holds a pid and is fine."""
    text = os.pread(fd, 33, 0).strip()
    if len(text) > 32 or (text and not text.isdigit()):
        return "holds something else than a process id"
    return None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None
