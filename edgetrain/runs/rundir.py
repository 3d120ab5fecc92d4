"""The run directory: what `edgetrain fit --out DIR` leaves behind, and how a run claims it.

    DIR/edgetrain-run.json     the marker: this folder is an edgetrain run (kind, run id, version)
    DIR/.edgetrain.lock        held (flock) by the process writing the run
    DIR/config.json            the resolved configuration (and the data's fingerprint)
    DIR/metrics.jsonl          one JSON object per line: epochs, modules, phases
    DIR/modules/module_K.safetensors   module K and its auxiliary head ("module.*", "head.*")
    DIR/model.safetensors      the stitched network (modules + last head)
    DIR/model.json             what is needed to rebuild it (architecture, split, normalisation)
    DIR/plan.json              the layout (split, heads, K); the memory plan (--memory-budget)
    DIR/report.json            results: test_accuracy, per-module accuracies, time, memory
    DIR/checkpoints/*.safetensors   epoch checkpoint of what is training; removed at the end
    DIR/cache/module_K/...     frozen outputs of module K (sequential mode, --cache disk)

A new run claims its folder (:func:`claim_new_run`): the folder must be new, empty, or, with
``--overwrite``, an edgetrain run (it holds the marker); the lock is taken, the check is made
again under it, and only then is anything deleted (only the files edgetrain wrote, see
ownership.py) or written. ``--resume`` opens an edgetrain run under its lock
(:func:`open_for_resume`). Other tools read these names; keep them stable.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from edgetrain.errors import UserInputError
from edgetrain.paths import shown
from edgetrain.records import Fields, RecordError, read_json_object, read_jsonl
from edgetrain.runs.files import (
    append_line,
    is_out_of_space,
    write_json_atomic,
    write_text_atomic,
)
from edgetrain.runs.lock import LOCK_FILE, RunLock
from edgetrain.runs.ownership import (
    RUN_KIND,
    RUN_LAYOUT,
    RUN_MARKER,
    Marker,
    folder_entries,
    protected_folder_problem,
    read_marker,
    write_marker,
)

CONFIG = "config.json"
METRICS = "metrics.jsonl"
REPORT = "report.json"
MODEL = "model.safetensors"
MODEL_INFO = "model.json"
PLAN = "plan.json"


@dataclass(frozen=True)
class RunDir:
    root: Path
    run_id: str | None = None
    """The marker's run id, once the run is claimed or opened: written into every weights
    file, and required of every one read back (runs/weights.py)."""

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS

    @property
    def report_path(self) -> Path:
        return self.root / REPORT

    @property
    def model_path(self) -> Path:
        return self.root / MODEL

    @property
    def model_info_path(self) -> Path:
        return self.root / MODEL_INFO

    def module_path(self, index: int) -> Path:
        return self.root / "modules" / f"module_{index}.safetensors"

    def checkpoint_path(self, index: int | str) -> Path:
        """Epoch checkpoint of module ``index`` (or "parallel" / "e2e") while it trains."""
        return self.root / "checkpoints" / f"{index}.safetensors"

    def module_cache_root(self, index: int) -> Path:
        return self.root / "cache" / f"module_{index}"

    def cache_dir(self, index: int, split: str) -> Path:
        """Cache of module ``index``'s outputs; ``split`` is "test" or "train_v{view}"."""
        return self.module_cache_root(index) / split

    @property
    def plan_path(self) -> Path:
        return self.root / PLAN

    def remove(self, relative: str) -> None:
        """Delete what edgetrain wrote under ``relative`` (e.g. "cache/module_0"), as
        ownership.py allows: files it names, never links, never anything else."""
        layout = RUN_LAYOUT
        for part in Path(relative).parts:
            layout = layout.subdir(part)
            if layout is None:  # an internal invariant: only layout paths are removed
                raise ValueError(f"{relative} is not part of a run folder's layout")
        folder = self.root / relative
        if folder.is_symlink() or not folder.is_dir():
            return
        if not layout.remove(folder):
            folder.rmdir()

    def log(self, event: str, **fields) -> None:
        """Append one line to the metrics log (a crash loses at most the line being written)."""
        record = {"event": event, "time": round(time.time(), 3), **fields}
        append_line(self.metrics_path, json.dumps(record, sort_keys=True))

    def read_metrics(self) -> list[dict]:
        """The log's records (each with a string ``event``); a last line cut short by a kill is
        skipped, anything else malformed is a RecordError naming the line."""
        records = []
        for number, record in read_jsonl(self.metrics_path):
            Fields(record, self.metrics_path, f" line {number}").str("event")
            records.append(record)
        return records

    def write_report(self, report: dict) -> None:
        write_json_atomic(self.report_path, report)

    def read_report(self, complete: bool = False) -> dict:
        """report.json, checked: the fields other tools rely on, and the type of every field
        that is there; with ``complete``, every field `fit` prints when it returns a finished
        run's report (a `--resume`) must be there too."""
        data = read_json_object(self.report_path)
        f = Fields(data, self.report_path)
        optional = not complete
        f.str("run_id", optional=True)
        f.float("test_accuracy", low=0, high=1)
        f.float("wall_time_s", low=0)
        f.int("peak_memory_bytes", low=0)
        f.int("framework_baseline_bytes", low=0, optional=optional)
        f.int("memory_budget_bytes", low=1, optional=True)
        for name in ("method", "mode", "model", "dataset", "memory_measured"):
            f.str(name, optional=optional)
        f.str("device_profile", optional=True)
        f.bool("simulated", optional=True)
        f.bool("budget_exceeded", optional=optional)
        for i, module in enumerate(f.list("modules")):
            check_module_record(Fields(module, self.report_path, f", field 'modules' [{i}]"))
        for i, phase in enumerate(f.list("phases", optional=optional) or []):
            p = Fields(phase, self.report_path, f", field 'phases' [{i}]")
            p.str("phase")
            p.int("predicted_peak_bytes", low=0, optional=True)
            p.int("measured_peak_bytes", low=0)
            p.bool("within_budget", optional=True)
        return data


def check_module_record(f: Fields, num_modules: int | None = None) -> int:
    """A finished module's record (a "module" line of metrics.jsonl, an entry of report.json's
    modules), every field that is reused checked; its module index."""
    k = f.int("module", low=0, high=None if num_modules is None else num_modules - 1)
    f.ints("blocks", low=0, length=2)
    f.float("tau", low=0, allow_inf=True)
    f.float("aux_test_accuracy", low=0, high=1, optional=True)
    f.int("predicted_peak_memory_bytes", low=0, optional=True)
    f.int("micro_batch", low=1)
    f.bool("checkpointing")
    f.float("train_time_s", low=0)
    f.int("train_peak_memory_bytes", low=0)
    f.float("cache_time_s", low=0)
    f.int("cache_peak_memory_bytes", low=0, optional=True)
    return k


def _not_a_run(flag: str, out: Path, action: str) -> str:
    if (out / CONFIG).exists():
        return (f"{flag} {shown(out)} holds a config.json but no {RUN_MARKER}: it was written "
                f"by an older edgetrain, or it is not an edgetrain run. edgetrain {action} only "
                "folders it marked as its own. Choose another --out (an old run can still be "
                "read by `edgetrain export`).")
    return (f"{flag} {shown(out)} already holds files that are not an edgetrain run (no "
            f"{RUN_MARKER}); edgetrain {action} only folders it marked as its own. Choose an "
            "empty or new folder.")


def check_new_run(out: Path, overwrite: bool) -> None:
    """Raise unless ``out`` can take a new run: new, empty, or (with ``overwrite``) an
    edgetrain run outside the protected places. Reads only; changes nothing."""
    if problem := RUN_LAYOUT.symlink_problem("--out", out):
        raise UserInputError(problem)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {shown(out)} is a file, not a folder. Choose another --out.")
    if not out.exists() or not folder_entries(out):
        return
    if read_marker(out, RUN_KIND) is None:
        raise UserInputError(_not_a_run("--out", out, "replaces"))
    if not overwrite:
        raise UserInputError(
            f"--out {shown(out)} already holds a run. Pass --resume to continue it, --overwrite "
            "to replace it, or choose another --out."
        )
    if problem := protected_folder_problem("--out", out, "--overwrite"):
        raise UserInputError(problem)


def claim_new_run(out: Path, overwrite: bool, config_json: str
                  ) -> tuple[RunDir, RunLock, Marker]:
    """Create (or, with ``overwrite``, replace) the run in ``out`` and hold its lock.

    The caller releases the lock when the run ends. Under the lock the folder is checked again
    (another process may have claimed it since :func:`check_new_run`), then only the files
    edgetrain wrote are deleted, and the marker and config are written.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(
            f"--out {shown(out)} cannot be created ({e.strerror}). Choose a folder you can "
            "write to.") from e
    lock = RunLock(out, "--out").acquire()
    fresh = False  # the folder was checked under the lock, and it is new or empty
    try:
        check_new_run(out, overwrite)
        fresh = read_marker(out, RUN_KIND) is None
        # Nothing unless --overwrite of a run. Its marker stays until the new one replaces it:
        # a claim that fails half-way leaves a folder that is still edgetrain's to replace.
        RUN_LAYOUT.remove(out, keep=(LOCK_FILE, RUN_MARKER))
        try:
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserInputError(
                f"--out {shown(out)} cannot be written ({e.strerror}). Choose a folder you can "
                "write to.") from e
        run = RunDir(out)
        (out / "modules").mkdir(exist_ok=True)
        write_text_atomic(run.config_path, config_json + "\n")
        # The marker last: a new folder with a marker always has its config.
        marker = write_marker(out, RUN_KIND)
        return RunDir(out, marker.run_id), lock, marker
    except BaseException as e:
        if fresh:
            # The folder was new or empty: what is in it at edgetrain's names, this claim
            # wrote. Take it back, so that the same command can simply be run again.
            with contextlib.suppress(OSError):
                RUN_LAYOUT.remove(out, keep=(LOCK_FILE,))
        lock.release()
        if is_out_of_space(e):
            raise UserInputError(
                f"Ran out of disk space starting the run in --out {shown(out)}; nothing of it "
                "was kept. Free space there and run the same command again.") from None
        raise


def open_for_resume(out: Path) -> tuple[RunDir, RunLock, Marker]:
    """The run in ``out``, for ``--resume``, under its lock; temporary files that a killed
    write left behind are removed. Raise if ``out`` is not an edgetrain run."""
    if problem := RUN_LAYOUT.symlink_problem("--out", out):
        raise UserInputError(problem)
    if not out.is_dir():
        raise UserInputError(
            f"--resume: {shown(out)} holds no edgetrain run (no such folder). Check --out, or "
            "start a new run without --resume."
        )
    try:
        marker = read_marker(out, RUN_KIND)
    except RecordError as e:
        raise UserInputError(f"--resume: {e}") from None
    if marker is None:
        if not folder_entries(out):
            raise UserInputError(
                f"--resume: {shown(out)} holds no edgetrain run (it is empty). Check --out, or "
                "start a new run without --resume.")
        raise UserInputError(_not_a_run("--resume: --out", out, "resumes"))
    lock = RunLock(out, "--out").acquire()
    try:
        # Read again under the lock: a `fit --overwrite` may have replaced the run meanwhile.
        marker = read_marker(out, RUN_KIND) or marker
        if not RunDir(out).config_path.is_file():
            raise RecordError(f"{shown(out / CONFIG)} is missing: the run's configuration is "
                              "gone, so it cannot be resumed. Start a new run in another --out.")
        RUN_LAYOUT.remove(out, temp_only=True)
        return RunDir(out, marker.run_id), lock, marker
    except BaseException:
        lock.release()
        raise
