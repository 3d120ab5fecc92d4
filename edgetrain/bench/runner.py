"""Run a benchmark grid: one `edgetrain fit` subprocess per run, one JSON line per result.

Each run gets a fresh process so that its memory peak is its own (nothing left over from the
runs before it, no torch state shared) and a crash fails only that run. The driver itself never
imports torch: on a unified-memory board its CUDA context would eat into the runs' memory.

    for run in grid:
        skip it if OUT/results.jsonl has a finished line with the same run id
        python -m edgetrain fit FLAGS --out OUT/runs/RUN_ID --overwrite
        append {run config, machine, accuracy, memory, time, status} to OUT/results.jsonl

A failed run is recorded with status "failed" and the end of its stderr, and the grid goes on;
the next invocation retries it. Under a memory budget, a run can also end "over_budget" (it ran,
but a measured peak exceeded the budget: its numbers are kept) or "does_not_fit" (the planner
refused it before training); both are results, not retried.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgetrain.bench.curves import run_curve
from edgetrain.bench.grid import (
    Preset,
    RunSpec,
    expand,
    explicit_fields,
    fit_args,
    load_preset,
    run_settings,
    to_fit_config,
)
from edgetrain.errors import UserInputError
from edgetrain.hardware.machine import MachineInfo, detect_machine
from edgetrain.hardware.profiles import DeviceProfile, apply_profile, is_simulated, load_profile
from edgetrain.memory import allocator
from edgetrain.records import Fields, RecordError, read_jsonl
from edgetrain.runs.files import append_line
from edgetrain.runs.lock import RunLock
from edgetrain.runs.ownership import (
    BENCH_KIND,
    BENCH_LAYOUT,
    RUN_KIND,
    mark_folder,
    output_folder_problem,
    read_marker,
)
from edgetrain.runs.rundir import RunDir
from edgetrain.units import MemorySize

RESULTS = "results.jsonl"
RUNS = "runs"
_STDERR_TAIL = 4000

# `edgetrain fit` exit codes that are results, not failures. 4: the run finished but a phase's
# measured peak exceeded --memory-budget (report.json is written). 5: the planner found before
# training that the run cannot fit the budget (no report).
EXIT_OVER_BUDGET = 4
EXIT_DOES_NOT_FIT = 5
# Statuses of a finished run (not retried by a rerun); anything else is "failed".
FINISHED = ("ok", "over_budget", "does_not_fit")


@dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    args: list[str]
    """`edgetrain fit` flags, without --out: the fields the preset or profile sets."""
    settings: dict
    """Every setting the run computes with, defaults resolved (``run_settings``)."""
    run_id: str
    memory_budget: MemorySize | None


def plan(preset: Preset, profile: DeviceProfile | None = None,
         simulated: bool = False) -> list[PlannedRun]:
    """The preset's runs with the profile applied, each checked as `edgetrain fit` would check
    it, so a bad preset fails before the first run starts, naming the preset file."""
    planned, problems = [], []
    for spec in expand(preset):
        explicit = explicit_fields(spec.fit)
        try:
            config = to_fit_config(spec.fit)
            if profile is not None:
                config = apply_profile(config, profile, explicit, simulated)
                explicit |= {"memory_budget", "cache_dtype", "device"}
            config.validate()
        except (UserInputError, TypeError) as e:
            problems.append(f"run {spec.label}: {e}")
            continue
        settings = run_settings(config)
        planned.append(PlannedRun(spec, fit_args(config, explicit), settings,
                                  spec.run_id(settings), config.memory_budget))
    if problems:
        raise UserInputError([f"preset {preset.path}: {p}" for p in problems])
    return planned


def read_results(path: Path) -> list[dict]:
    """Every line of a results.jsonl, checked: every field the table and the plot use; a last
    line cut short by a killed bench is ignored, any other malformed line is a RecordError
    naming the file, line and field."""
    lines = []
    for number, line in read_jsonl(path):
        f = Fields(line, path, f" line {number}")
        f.str("run_id")
        status = f.str("status", choices=(*FINISHED, "failed"))
        f.str("method")
        f.object("config")
        for name in ("mode", "cache", "dataset", "model", "memory_budget", "stderr_tail"):
            f.str(name, optional=True)
        f.int("modules", low=1, optional=True)
        f.int("memory_budget_bytes", low=1, optional=True)
        if status in ("ok", "over_budget"):
            f.float("test_accuracy", low=0, high=1)
            f.int("peak_memory_bytes", low=0)
            f.int("training_memory_bytes", low=0)
            f.float("wall_time_s", low=0)
        if (machine := f.object("machine", optional=True)) is not None:
            machine.int("memory_bytes", low=0, optional=True)
            for i, gpu in enumerate(machine.list("gpus", optional=True) or []):
                Fields(gpu, path, f" line {number}, field 'machine', gpu {i}").str("name")
        for name in ("modules", "mode", "cache"):
            line.setdefault(name, None)
        lines.append(line)
    return lines


def _reads_as_bench_results(folder: Path) -> bool:
    """A folder `bench run` wrote before bench folders were marked: its results.jsonl holds
    bench results."""
    try:
        return bool(read_results(folder / RESULTS))
    except RecordError:
        return False


def bench_folder_problem(out: Path, flag: str = "--out") -> str | None:
    """Why `bench run --out` (or `bench report`, ``flag`` its argument) cannot write to ``out``
    (a user's folder, a link planted where the table or a plot goes), or None."""
    return output_folder_problem(flag, out, BENCH_KIND, BENCH_LAYOUT, _reads_as_bench_results)


def finished_ids(path: Path) -> set[str]:
    return {r["run_id"] for r in read_results(path) if r.get("status") in FINISHED}


def settings_digest(run_id: str) -> str:
    """The digest of a run's resolved settings, the last part of its id (the label before it
    is only a name: a preset edited to vary a setting renames its runs, not their settings)."""
    return run_id.rsplit("-", 1)[-1]


def label_of(run_id: str) -> str:
    return run_id.rsplit("-", 1)[0]


@dataclass(frozen=True)
class Bench:
    """A benchmark ready to run: the preset's runs with the device profile applied."""

    preset: Preset
    profile: DeviceProfile | None
    machine: MachineInfo
    simulated: bool
    """True if the profile's device is not this machine: its budget is simulated here."""
    runs: list[PlannedRun]


def prepare_bench(preset: str, device_profile: str | None = None,
                  only: list[str] | None = None) -> Bench:
    """Load the preset (name or path) and the profile; plan and check every run; keep the runs
    whose label contains one of ``only`` (all if None)."""
    loaded = load_preset(preset)
    profile = load_profile(device_profile) if device_profile else None
    machine = detect_machine()
    simulated = profile is not None and is_simulated(profile, machine)
    runs = plan(loaded, profile, simulated)
    if only:
        chosen = [r for r in runs if any(o in r.spec.label for o in only)]
        if not chosen:
            raise UserInputError(
                f"--only {' '.join(only)} matches no run of preset {loaded.name!r}; its runs "
                f"are {', '.join(r.spec.label for r in runs)}."
            )
        runs = chosen
    return Bench(loaded, profile, machine, simulated, runs)


def run_bench(bench: Bench, out: Path, log: Callable[[str], None] = print,
              jobs: int = 1) -> list[dict]:
    """Run what is not finished yet; return the lines appended to OUT/results.jsonl.

    The folder is locked for the whole bench: a second bench into it is refused (naming the
    pid) instead of interleaving its lines."""
    if problem := bench_folder_problem(out):
        raise UserInputError(problem)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "--out"):
        if problem := bench_folder_problem(out):  # again, under the lock
            raise UserInputError(problem)
        mark_folder(out, BENCH_KIND)
        return _run_grid(bench, out, log, jobs)


def _run_grid(bench: Bench, out: Path, log: Callable[[str], None], jobs: int) -> list[dict]:
    results = out / RESULTS
    finished = finished_ids(results)
    done = {settings_digest(run_id) for run_id in finished}
    context = {
        "preset": bench.preset.name,
        "device_profile": bench.profile.name if bench.profile else None,
        "simulated": bench.simulated if bench.profile else None,
        "machine": bench.machine.to_dict(),
    }
    todo = []
    for i, run in enumerate(bench.runs, 1):
        tag = f"[{i}/{len(bench.runs)}] {run.spec.label}"
        if settings_digest(run.run_id) in done:  # the same settings finished before
            log(f"{tag}: done before, skipped")
        else:
            todo.append((tag, run))
    # Finished lines under the labels about to run, with other settings: an edited preset, or
    # runs from an edgetrain with other defaults (or one whose ids digested the flags). Kept
    # in results.jsonl (nothing a bench wrote is dropped); the report shows both.
    labels = {label_of(run.run_id) for _, run in todo}
    stale = sorted(r for r in finished if label_of(r) in labels)
    if stale:
        log(f"{len(stale)} finished run(s) in {out} under these labels ran with other settings "
            f"(an edited preset, or other defaults of an earlier edgetrain), e.g. {stale[0]}: "
            "run again; the earlier lines stay in results.jsonl and the report shows both.")
    written = []
    # One writer appends to results.jsonl (this thread); the runs themselves are processes, so
    # threads only wait on them. With jobs > 1 the runs share the machine: accuracy and memory
    # peaks stay each run's own, wall times do not (compare times only from --jobs 1).
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        def start(tag: str, run: PlannedRun) -> dict:
            log(f"{tag}: running")
            return run_one(run, out / RUNS / run.run_id)

        futures = {pool.submit(start, tag, run): tag for tag, run in todo}
        for future in as_completed(futures):
            tag = futures[future]
            line = {**context, **future.result()}
            _append_line(results, line)
            written.append(line)
            if "test_accuracy" in line:
                log(f"{tag}: {line['status']}, test accuracy {line['test_accuracy']:.2%}, "
                    f"training memory {line['training_memory_bytes'] / 2**20:.0f} MiB, "
                    f"{line['wall_time_s']:.0f} s")
            elif line["status"] == "does_not_fit":
                log(f"{tag}: does not fit the memory budget (see results.md)")
            else:
                last = line["stderr_tail"].strip().splitlines()[-1:] or ["(no output)"]
                log(f"{tag}: FAILED (exit code {line['returncode']}): {last[0]}")
    return written


def run_one(run: PlannedRun, run_dir: Path) -> dict:
    """One `edgetrain fit` subprocess; its report.json turned into one result line."""
    cmd = [sys.executable, "-m", "edgetrain", "fit", *run.args, "--out", str(run_dir),
           "--overwrite", "--no-progress"]
    report_path = run_dir / "report.json"
    # A report left by an earlier attempt must not pass for this run's: this run's report
    # carries the run id of the marker its --overwrite writes anew.
    earlier = _run_id(run_dir)
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    # Rich would otherwise wrap the child's messages at 80 columns in the stderr tail.
    # base_env: the child's own launcher picks the allocation policy of its method and mode.
    env = {**allocator.base_env(), "COLUMNS": "200"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = {
        "run_id": run.run_id,
        "method": run.spec.method,
        "modules": run.spec.modules,
        "mode": run.spec.mode,
        "cache": run.spec.cache,
        "fit_args": run.args,
        "config": run.spec.fit,
        "settings": run.settings,
        # A relative budget (50%) has its bytes once fit resolved it: taken from the report.
        "memory_budget_bytes": (run.memory_budget.bytes or None) if run.memory_budget else None,
        "memory_budget": str(run.memory_budget) if run.memory_budget else None,
        "run_dir": str(run_dir),
        "started_at": started.isoformat(timespec="seconds"),
        "process_time_s": round(time.perf_counter() - clock, 3),
        "returncode": proc.returncode,
    }
    tail = (proc.stderr or proc.stdout)[-_STDERR_TAIL:]
    if proc.returncode in (0, EXIT_OVER_BUDGET) and report_path.exists():
        try:
            report = RunDir(run_dir).read_report()
        except RecordError as e:
            return {**line, "status": "failed", "stderr_tail": str(e)}
        if report.get("run_id") in (None, earlier) or report.get("run_id") != _run_id(run_dir):
            return {**line, "status": "failed", "stderr_tail": f"{report_path} is not the "
                    "report of this run (its run id is not the run folder's new one)"}
        wrong = mismatches(run.spec.fit, report)
        if wrong:
            # A result under the wrong label is worse than none: fail it loudly.
            return {**line, "status": "failed", "stderr_tail": "report.json does not match the "
                    f"flags the bench gave `edgetrain fit`: {wrong}"}
        status = "ok" if proc.returncode == 0 else "over_budget"
        extra = {} if proc.returncode == 0 else {"stderr_tail": tail}
        # Every evaluated network with its time: the report's time-to-accuracy table.
        return {**line, "status": status, **extra, **result_fields(report),
                "accuracy_curve": run_curve(run_dir)}
    if proc.returncode == EXIT_DOES_NOT_FIT:
        return {**line, "status": "does_not_fit", "stderr_tail": tail}
    return {**line, "status": "failed", "stderr_tail": tail}


def _run_id(run_dir: Path) -> str | None:
    try:
        marker = read_marker(run_dir, RUN_KIND)
    except RecordError:
        return None
    return marker.run_id if marker else None


def mismatches(fit: dict, report: dict) -> str:
    """Settings the run asked for that its report says it did not use ("" if none)."""
    wanted = {"method": fit.get("method"), "num_modules": fit.get("modules"),
              "activation_checkpointing": fit.get("activation_checkpointing") or None}
    return "; ".join(f"asked for {key}={value!r}, report.json has {report.get(key)!r}"
                     for key, value in wanted.items()
                     if value is not None and key in report and report[key] != value)


def result_fields(report: dict) -> dict:
    """What a result line keeps from a run's report.json."""
    return {
        "test_accuracy": report["test_accuracy"],
        "accuracy_metrics": report.get("accuracy_metrics"),
        "train_accuracy": (report.get("accuracy_metrics") or {}).get("train_last_epoch"),
        "peak_memory_bytes": report["peak_memory_bytes"],
        "training_memory_bytes": training_memory_bytes(report),
        "framework_baseline_bytes": report.get("framework_baseline_bytes"),
        "memory_backend": report.get("memory_backend"),
        "memory_measured": report.get("memory_measured"),
        "wall_time_s": report["wall_time_s"],
        "epochs": report.get("epochs"),
        "dataset": report.get("dataset"),
        "model": report.get("model"),
        "batch_size": report.get("batch_size"),
        "train_samples": report.get("train_samples"),
        "test_samples": report.get("test_samples"),
        "num_parameters": report.get("num_parameters"),
        "activation_checkpointing": report.get("activation_checkpointing"),
        "aux_test_accuracy": [m.get("aux_test_accuracy") for m in report.get("modules", [])],
        "device": report.get("device"),
        "device_name": report.get("device_name"),
        "torch_version": report.get("torch_version"),
        # The budget in bytes as fit applied it (a relative one, 50%, is known only there).
        **({"memory_budget_bytes": report["memory_budget_bytes"]}
           if report.get("memory_budget_bytes") else {}),
    }


def training_memory_bytes(report: dict) -> int:
    """Peak memory of training alone, without the framework (torch, its libraries)."""
    if report.get("memory_backend") == "cuda":
        # The CUDA allocator counts tensors only: its peak has no framework baseline in it (the
        # baseline is host RSS, which must not be subtracted from device memory).
        return report.get("train_peak_memory_bytes", report["peak_memory_bytes"])
    if report.get("training_memory_bytes") is not None:
        return report["training_memory_bytes"]
    return max(0, report["peak_memory_bytes"] - report.get("framework_baseline_bytes", 0))


def _append_line(path: Path, line: dict) -> None:
    # One write of one line, flushed: a bench killed mid-grid loses at most this line, and
    # read_results skips a partial one (append_line cuts it off before the next line).
    append_line(path, json.dumps(line, sort_keys=True), sync=True)
