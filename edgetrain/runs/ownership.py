"""What edgetrain owns, and the only code that deletes anything in a folder it writes.

A folder is edgetrain's only if it holds edgetrain's **marker** (``edgetrain-run.json`` for a
run, ``edgetrain-artifacts.json`` for ``export-artifacts``, ``edgetrain-bench.json`` and
``edgetrain-profile.json`` for the folders of ``bench run`` and ``profile``): a JSON object
with the kind, a random run id, the format version and when it was made. A file named
``config.json`` or ``artifacts.json`` proves nothing: users have those too.

Inside an owned folder, edgetrain deletes only the entries its :class:`Layout` names (the files
it writes, by name pattern, and the temporary files of its atomic writes), and only as what
they are: a regular file is unlinked, a directory is entered and removed once empty, and a
symbolic link is never followed nor removed (edgetrain writes no links, so a link is not
edgetrain's). Anything else is left where it is and reported. ``--overwrite`` is refused
outright for the current folder, its parents, a home folder and a repository root, marker or
not: those are places where one mistyped flag would cost too much.

    layout.remove(root)          # returns what it left: entries edgetrain did not write
    layout.symlink_problem(flag, root)   # a planted link, or a folder (FIFO, ...) where
                                         # edgetrain writes a file
"""

from __future__ import annotations

import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edgetrain.paths import path_problem, shown
from edgetrain.records import Fields, RecordError, read_json_object
from edgetrain.runs.lock import LOCK_FILE

MARKER_VERSION = 1
RUN_MARKER = "edgetrain-run.json"
ARTIFACTS_MARKER = "edgetrain-artifacts.json"
BENCH_MARKER = "edgetrain-bench.json"
PROFILE_MARKER = "edgetrain-profile.json"
RUN_KIND = "edgetrain-run"
ARTIFACTS_KIND = "edgetrain-artifacts"
BENCH_KIND = "edgetrain-bench"
PROFILE_KIND = "edgetrain-profile"
_MARKER_FILES = {RUN_KIND: RUN_MARKER, ARTIFACTS_KIND: ARTIFACTS_MARKER,
                 BENCH_KIND: BENCH_MARKER, PROFILE_KIND: PROFILE_MARKER}


# ---------------------------------------------------------------------------------------------
# The marker
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Marker:
    kind: str
    run_id: str
    format_version: int
    created: str

    @classmethod
    def new(cls, kind: str) -> Marker:
        return cls(kind, uuid.uuid4().hex, MARKER_VERSION,
                   datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def as_dict(self) -> dict:
        return {"kind": self.kind, "run_id": self.run_id, "format_version": self.format_version,
                "created": self.created,
                "note": "written by edgetrain: this folder and the files edgetrain wrote in it "
                        "may be replaced by edgetrain (--overwrite); nothing else in it is"}


def marker_path(folder: Path, kind: str) -> Path:
    return folder / _MARKER_FILES[kind]


def write_marker(folder: Path, kind: str) -> Marker:
    from edgetrain.runs.files import write_json_atomic

    marker = Marker.new(kind)
    write_json_atomic(marker_path(folder, kind), marker.as_dict())
    return marker


def read_marker(folder: Path, kind: str) -> Marker | None:
    """The folder's marker of ``kind``; None if there is none; RecordError if it is damaged or
    from a newer edgetrain."""
    path = marker_path(folder, kind)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise RecordError(f"{shown(path)} is not a regular file, so it is not edgetrain's "
                          "marker. Remove it or choose another folder.")
    f = Fields(read_json_object(path), path)
    if f.str("kind") != kind:
        raise RecordError(f"{shown(path)}: field 'kind' must be {kind!r}.")
    version = f.int("format_version", low=1)
    if version > MARKER_VERSION:
        raise RecordError(f"{shown(path)} was written by a newer edgetrain (format version "
                          f"{version}; this one knows {MARKER_VERSION}). Upgrade edgetrain.")
    run_id = f.str("run_id")
    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise RecordError(f"{shown(path)}: field 'run_id' must be 32 hex digits.")
    return Marker(kind, run_id, version, f.str("created"))


# ---------------------------------------------------------------------------------------------
# Layouts: what edgetrain writes in a folder, by name
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """The entries edgetrain writes in one folder: file name patterns and sub-layouts.

    Every file pattern also covers the temporary names of its atomic writes:
    ``.NAME.<random>.tmp`` (edgetrain/runs/files.py) and ``NAME.tmp`` (the cache writer).
    """

    files: tuple[str, ...] = ()
    dirs: dict[str, Layout] = field(default_factory=dict)

    def file_kind(self, name: str) -> str | None:
        """'final' or 'temp' if edgetrain writes a file of this name here, else None. ASCII
        only: \\d must not match a user's file named with other scripts' digits."""
        for pattern in self.files:
            if re.fullmatch(pattern, name, re.ASCII):
                return "final"
            if re.fullmatch(rf"\.(?:{pattern})\.[A-Za-z0-9_]+\.tmp", name, re.ASCII) or \
                    re.fullmatch(rf"(?:{pattern})\.tmp", name, re.ASCII):
                return "temp"
        return None

    def subdir(self, name: str) -> Layout | None:
        for pattern, sub in self.dirs.items():
            if re.fullmatch(pattern, name, re.ASCII):
                return sub
        return None

    def remove(self, folder: Path, temp_only: bool = False, keep: tuple[str, ...] = ()
               ) -> list[Path]:
        """Delete what edgetrain wrote in ``folder`` (or only its temporary files); return the
        entries left because edgetrain did not write them. ``folder`` itself stays."""
        left: list[Path] = []
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return left
        for entry in entries:
            path = Path(entry.path)
            if entry.name in keep:
                continue
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                left.append(path)  # never followed, never removed: edgetrain writes no links
                continue
            kind = self.file_kind(entry.name)
            sub = self.subdir(entry.name)
            if kind and stat.S_ISREG(info.st_mode):
                if kind == "temp" or not temp_only:
                    path.unlink()
            elif sub is not None and stat.S_ISDIR(info.st_mode):
                inner = sub.remove(path, temp_only)
                left += inner
                if not temp_only and not inner:
                    try:
                        path.rmdir()
                    except OSError:
                        left.append(path)
            else:
                left.append(path)
        return left

    def obstacles(self, folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
        """What stands where edgetrain reads or writes in ``folder``: symbolic links, and
        entries of the wrong kind (a folder, FIFO or device under the name of a file edgetrain
        writes; a file under the name of a folder it writes in), each with what it is.
        edgetrain never follows, reads, replaces or removes either."""
        links: list[Path] = []
        wrong: list[tuple[Path, str]] = []
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return links, wrong
        for entry in entries:
            kind, sub = self.file_kind(entry.name), self.subdir(entry.name)
            if not (kind or sub is not None or entry.name == LOCK_FILE):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                links.append(path)
            elif sub is not None:
                if entry.is_dir(follow_symlinks=False):
                    inner_links, inner_wrong = sub.obstacles(path)
                    links += inner_links
                    wrong += inner_wrong
                else:
                    wrong.append((path, f"{_kind_of(path)}, where edgetrain keeps a folder"))
            elif (kind == "final" or entry.name == LOCK_FILE) and \
                    not entry.is_file(follow_symlinks=False):
                wrong.append((path, f"{_kind_of(path)}, where edgetrain writes a file"))
        return links, wrong

    def symlinks(self, folder: Path) -> list[Path]:
        """Symbolic links standing where edgetrain reads or writes in ``folder``."""
        return self.obstacles(folder)[0]

    def symlink_problem(self, flag: str, folder: Path) -> str | None:
        """Why edgetrain cannot read and write in ``folder`` without following a link or
        writing over an entry that is not a file of its own (None if it can)."""
        if folder.is_symlink():
            return (f"{flag} {shown(folder)} is a symbolic link. edgetrain does not follow links "
                    f"for the folders it writes and deletes in; pass the real folder "
                    f"({shown(folder.resolve())}) instead.")
        links, wrong = self.obstacles(folder)
        if links:
            names = ", ".join(shown(p.relative_to(folder)) for p in links[:5])
            return (f"{flag} {shown(folder)} holds symbolic links where edgetrain writes "
                    f"({names}). edgetrain never follows them out of the folder; remove them, "
                    f"or choose another {flag}.")
        if wrong:
            names = "; ".join(f"{shown(p.relative_to(folder))} is {what}" for p, what in wrong[:5])
            return (f"{flag} {shown(folder)} holds entries edgetrain cannot write over ({names}). "
                    f"edgetrain leaves them as they are: move them out of the folder, or choose "
                    f"another {flag}.")
        return None


def _kind_of(path: Path) -> str:
    """'a folder', 'a FIFO', ... (for a message)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "unreadable"
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


_SAFETENSORS = r"[A-Za-z0-9_]+\.safetensors"
RUN_LAYOUT = Layout(
    files=(r"config\.json", r"metrics\.jsonl", r"report\.json", r"model\.safetensors",
           r"model\.json", r"plan\.json", re.escape(RUN_MARKER), r"\.write-test"),
    dirs={
        "modules": Layout(files=(r"module_\d+\.safetensors",)),
        "checkpoints": Layout(files=(r"(\d+|lap\d+_\d+|parallel|e2e)\.safetensors",)),
        "cache": Layout(dirs={r"module_\d+": Layout(dirs={r"train_v\d+|test": Layout(
            files=(r"features\.npy", r"labels\.npy", r"manifest\.json"))})}),
        # ONNX Runtime training artifacts of the module being trained (--backend ort).
        "ort": Layout(dirs={r"module_\d+": Layout(files=(
            r"training_model\.onnx", r"eval_model\.onnx", r"optimizer_model\.onnx",
            r"checkpoint", r"forward\.onnx", r"[A-Za-z0-9_.]+\.onnx\.data"))}),
    },
)
"""Everything `edgetrain fit` writes in a run folder (see edgetrain/runs/rundir.py)."""

ARTIFACT_FILES = ("training_model.onnx", "optimizer_model.onnx", "checkpoint",
                  "inference_model.onnx", "README.txt", "artifacts.json")
ARTIFACTS_LAYOUT = Layout(files=(*(re.escape(n) for n in ARTIFACT_FILES),
                                 re.escape(ARTIFACTS_MARKER), r"eval_model\.onnx",
                                 r"forward\.onnx"))
"""Everything `edgetrain export-artifacts` writes in its --out folder."""

BENCH_LAYOUT = Layout(files=(r"results\.jsonl", r"results\.md", r"memory_vs_accuracy\.png",
                             r"accuracy_over_time\.png", r"fidelity\.png",
                             re.escape(BENCH_MARKER)), dirs={"runs": Layout()})
"""What `edgetrain bench run` writes in its --out folder (runs/ holds one run folder per run)."""
PROFILE_LAYOUT = Layout(files=(r"profile\.json", r"profile\.png", re.escape(PROFILE_MARKER)))
"""What `edgetrain profile` writes in its --out folder."""


def folder_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that count as content (the lock file of an aborted claim does not)."""
    return [name for name in os.listdir(folder) if name != LOCK_FILE]


def output_folder_problem(flag: str, folder: Path, kind: str, layout: Layout,
                          written_before_markers=None) -> str | None:
    """Why ``folder`` cannot take the outputs of ``kind`` (a bench, a profile), or None.

    Those commands write fixed names (results.md, profile.json, ...) into the folder a user
    names, replacing what is there: so the folder must be new, empty, or one edgetrain wrote
    before (its marker; or, for a folder written before folders were marked,
    ``written_before_markers(folder)`` says it reads as edgetrain's own output). A user's
    folder is refused, not written over. Nothing is written here: :func:`mark_folder` does
    that when the command starts writing.
    """
    if problem := path_problem(flag, folder) or layout.symlink_problem(flag, folder):
        return problem
    if folder.exists() and not folder.is_dir():
        return f"{flag} {shown(folder)} is a file, not a folder. Choose another {flag}."
    if not folder.exists() or not folder_entries(folder):
        return None
    try:
        if read_marker(folder, kind) is not None:
            return None
    except RecordError as e:
        return f"{flag}: {e}"
    if written_before_markers is not None and written_before_markers(folder):
        return None
    return (f"{flag} {shown(folder)} already holds files that edgetrain did not write there (no "
            f"{_MARKER_FILES[kind]}); edgetrain writes into a new or empty folder, or one it "
            f"wrote before, so that none of your files is replaced. Choose another {flag}.")


def mark_folder(folder: Path, kind: str) -> None:
    """Create ``folder`` if need be and mark it as ``kind``'s (once checked by
    :func:`output_folder_problem`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if read_marker(folder, kind) is None:
        write_marker(folder, kind)


# ---------------------------------------------------------------------------------------------
# Folders never to replace
# ---------------------------------------------------------------------------------------------

def protected_folder_problem(flag: str, folder: Path, action: str) -> str | None:
    """Why ``folder`` must not be replaced by ``action`` (e.g. "--overwrite"), or None.

    The current folder and its parents, a home folder and its parents, the filesystem root and
    a repository root (holding .git, .hg or .svn) are refused whatever they hold.

    >>> protected_folder_problem("--out", Path("."), "--overwrite").split(";")[0]
    '--out . is the current folder or one of its parents'
    >>> protected_folder_problem("--out", Path("runs/new"), "--overwrite") is None
    True
    """
    try:
        real = folder.resolve()
    except (OSError, RuntimeError):
        return None  # path_problem reports paths that cannot be resolved
    cwd = Path.cwd().resolve()
    homes = {Path.home().resolve(), Path(os.path.expanduser("~")).resolve()}
    if real == Path(real.anchor):
        why = "is the filesystem root"
    elif real == cwd or real in cwd.parents:
        why = "is the current folder or one of its parents"
    elif any(real == h or real in h.parents for h in homes):
        why = "is a home folder or one of its parents"
    elif any((real / vcs).exists() for vcs in (".git", ".hg", ".svn")):
        why = "is the root of a repository"
    else:
        return None
    return (f"{flag} {shown(folder)} {why}; {action} is refused there, so that one mistyped "
            f"flag cannot delete your work. Choose a dedicated run folder, e.g. {flag} "
            "runs/NAME.")
