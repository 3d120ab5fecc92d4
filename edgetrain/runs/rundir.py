"""The run directory: what `edgetrain fit --out DIR` leaves behind.

    DIR/config.json            the resolved configuration
    DIR/metrics.jsonl          one JSON object per line: epochs, modules, phases
    DIR/modules/module_K.safetensors   module K and its auxiliary head ("module.*", "head.*")
    DIR/model.safetensors      the stitched network (modules + last head)
    DIR/model.json             what is needed to rebuild it (architecture, split, normalisation)
    DIR/report.json            results: test_accuracy, per-module accuracies, time, memory
    DIR/cache/module_K/...     frozen outputs of module K (sequential mode, --cache disk)

Other tools read these names; keep them stable.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edgetrain.errors import UserInputError
from edgetrain.runs.files import write_json_atomic

CONFIG = "config.json"
METRICS = "metrics.jsonl"
REPORT = "report.json"
MODEL = "model.safetensors"
MODEL_INFO = "model.json"


@dataclass(frozen=True)
class RunDir:
    root: Path

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

    def log(self, event: str, **fields) -> None:
        """Append one line to the metrics log (a crash loses at most the line being written)."""
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict]:
        """The log's records; a last line cut short by a kill is skipped."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def write_report(self, report: dict) -> None:
        write_json_atomic(self.report_path, report)

    def read_report(self) -> dict:
        return json.loads(self.report_path.read_text())


def open_for_resume(out: Path) -> RunDir:
    """The run in ``out``, for ``--resume``; raise if there is none."""
    if not (out / CONFIG).is_file():
        raise UserInputError(
            f"--resume: {out} holds no edgetrain run (no {CONFIG}). Check --out, or start a new "
            "run without --resume."
        )
    return RunDir(out)


def check_run_dir(out: Path, overwrite: bool) -> None:
    """Raise if ``out`` cannot take a new run (see :func:`prepare_run_dir`); changes nothing."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file, not a folder. Choose another --out.")
    if out.exists() and any(out.iterdir()):
        if not (out / CONFIG).exists():
            raise UserInputError(
                f"--out {out} already holds files that are not an edgetrain run. "
                "Choose an empty or new folder."
            )
        if not overwrite:
            raise UserInputError(
                f"--out {out} already holds a run. Pass --resume to continue it, --overwrite "
                "to replace it, or choose another --out."
            )


def prepare_run_dir(out: Path, config_json: str, overwrite: bool) -> RunDir:
    """Create ``out`` for a new run.

    An existing run there is never silently mixed with a new one: it is replaced only with
    ``--overwrite``. A folder that holds other files is refused, so nothing of the user's is
    deleted by mistake.
    """
    run = RunDir(out)
    check_run_dir(out, overwrite)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserInputError(
            f"--out {out} cannot be written ({e.strerror}). Choose a folder you can write to."
        ) from e
    (out / "modules").mkdir(exist_ok=True)
    from edgetrain.runs.files import write_text_atomic

    write_text_atomic(run.config_path, config_json + "\n")
    if run.metrics_path.exists():
        os.unlink(run.metrics_path)
    return run
