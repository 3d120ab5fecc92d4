"""Turn OUT/results.jsonl into OUT/results.md (a table) and OUT/memory_vs_accuracy.png.

Memory on the x axis is *training* memory: the run's peak minus the framework baseline (torch
and its libraries, resident before anything is built), or the CUDA allocator's peak on a
discrete GPU. That is the part module-wise training changes, and the part a device's memory
budget has to hold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgetrain.bench.curves import Point, run_curve, time_to
from edgetrain.bench.fidelity import FIDELITY_PLOT, fidelity_table, plot_fidelity
from edgetrain.bench.runner import FINISHED, RESULTS, bench_folder_problem, read_results
from edgetrain.errors import UserInputError
from edgetrain.runs.files import write_figure_atomic, write_text_atomic
from edgetrain.runs.lock import RunLock
from edgetrain.runs.ownership import BENCH_KIND, folder_entries, mark_folder
from edgetrain.units import format_bytes

TABLE = "results.md"
PLOT = "memory_vs_accuracy.png"
TIME_PLOT = "accuracy_over_time.png"
MARKERS = {"e2e": "o", "e2e-ckpt": "s", "vanilla": "^", "trgl": "D"}
COLORS = {"e2e": "tab:gray", "e2e-ckpt": "tab:brown", "vanilla": "tab:blue", "trgl": "tab:red"}


def latest_results(lines: list[dict]) -> list[dict]:
    """One line per run id, in first-seen order: its last finished line, else its last line (a
    run that failed, then succeeded on a rerun, shows as succeeded)."""
    best: dict[str, dict] = {}
    for line in lines:
        current = best.get(line["run_id"])
        if (current is None or line.get("status") in FINISHED
                or current.get("status") not in FINISHED):
            best[line["run_id"]] = line
    return list(best.values())


def _measured(r: dict) -> bool:
    """Runs with numbers: finished, within the budget or over it."""
    return r["status"] in ("ok", "over_budget")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both counts (less or equal memory ``x``
    and higher accuracy ``y``), by increasing ``x``: the best accuracy each memory buys.

    >>> pareto_front([(100, 80), (50, 70), (60, 65), (200, 80), (300, 90)])
    [1, 0, 4]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


@dataclass(frozen=True)
class ReportFiles:
    table: Path
    plot: Path
    finished: int
    """Runs that finished (within the budget, over it, or refused by the planner)."""
    failed: int
    """Runs whose latest attempt failed."""


def write_report(out: Path, flag: str = "--out") -> ReportFiles:
    """Rebuild OUT/results.md and OUT/memory_vs_accuracy.png from OUT/results.jsonl.

    OUT must be a folder a bench wrote (marked, or reading as bench results): the table and
    plots replace files of those names, so a folder of the user's is refused, and so is a link
    planted at one of the names (every file is written whole, by rename, never through a link).
    """
    if problem := bench_folder_problem(out, flag):
        results = out / RESULTS
        if results.is_file() and not results.is_symlink():
            read_results(results)  # a bench's damaged file (not marked: older): name its line
        raise UserInputError(problem)
    lines = read_results(out / RESULTS)
    if not lines:
        raise UserInputError(f"{out / RESULTS} has no results: run `edgetrain bench run --out "
                             f"{out}` first, or give the folder a bench wrote.")
    results = latest_results(lines)
    table_path, plot_path = out / TABLE, out / PLOT
    write_text_atomic(table_path, markdown_report(results))
    plot_memory_vs_accuracy(results, plot_path)
    # A fidelity grid (TRGL and vanilla paired by seed) also gets its gaps plotted.
    plot_fidelity([r for r in results if _measured(r)], out / FIDELITY_PLOT)
    plot_accuracy_over_time([r for r in results if _measured(r)], out / TIME_PLOT)
    finished = sum(r["status"] in FINISHED for r in results)
    return ReportFiles(table_path, plot_path, finished, len(results) - finished)


def combine_results(sources: list[Path], out: Path) -> ReportFiles:
    """Several benches' results in one folder: OUT/results.jsonl holds every line of every
    source (each marked with its ``source`` folder), and the table and plots are built from
    them, so cells measured in different benches (a sweep run in parts, on several machines)
    are compared in one table: a TRGL run of one is paired with the vanilla run of another.

    OUT must be new or empty: a folder with results of its own is refused, not merged into, so
    that nothing a bench wrote is replaced. The sources are only read."""
    lines = []
    for source in sources:
        found = read_results(source / RESULTS)
        if not found:
            raise UserInputError(f"{source / RESULTS} has no results: give folders that "
                                 "`edgetrain bench run` wrote.")
        lines += [{**line, "source": line.get("source", str(source))} for line in found]
    if problem := bench_folder_problem(out):
        raise UserInputError(problem)
    if out.exists() and folder_entries(out):
        raise UserInputError(f"--out {out} is not empty: combined results go to a new or empty "
                             "folder (one that holds results already is never merged into or "
                             "written over). Choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "--out"):
        if folder_entries(out):  # again, under the lock
            raise UserInputError(f"--out {out} is not empty any more: choose another --out.")
        mark_folder(out, BENCH_KIND)
        write_text_atomic(out / RESULTS,
                          "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
        return write_report(out)


_SET_BY_GRID = {"method", "modules", "mode", "cache", "out", "overwrite", "extra",
                "activation_checkpointing"}


def varied_settings(results: list[dict]) -> list[str]:
    """The fit settings that differ between the runs (seed, tau, head, data size ...), beyond
    those the table shows anyway: each gets a column, so that every row says what it ran.

    >>> varied_settings([{"config": {"seed": 0, "lr": 0.1}}, {"config": {"seed": 1, "lr": 0.1}}])
    ['seed']
    """
    keys = sorted({k for r in results for k in r.get("config", {})} - _SET_BY_GRID)
    return [k for k in keys
            if len({json.dumps(r.get("config", {}).get(k), sort_keys=True)
                    for r in results}) > 1]


def _group(r: dict) -> tuple:
    """Runs compared with each other (and with one e2e baseline): same data and model."""
    return (r.get("dataset") or r["config"].get("dataset"), r.get("model"))


_PENALTY = ("tau", "tau_schedule")
"""Settings that mean nothing to end-to-end training (it has no penalty)."""


def _baseline_key(r: dict, varied: list[str]) -> tuple:
    """The e2e run a row is set against: same data and model, and the same value of every
    varied setting that end-to-end training has too (a seed, a memory budget, a data size)."""
    return (*_group(r), *(json.dumps(r.get("config", {}).get(k), sort_keys=True)
                          for k in varied if k not in _PENALTY))


def _cell(value: object) -> str:
    return "–" if value is None else str(value)


_STATUS = {"ok": "ok", "over_budget": "over budget", "does_not_fit": "does not fit"}


def presets_of(results: list[dict]) -> str:
    """The preset, or the presets of results combined from several benches."""
    return " + ".join(dict.fromkeys(str(r.get("preset")) for r in results))


def _machine(r: dict) -> str:
    machine = r.get("machine") or {}
    gpus = ", ".join(g["name"] for g in machine.get("gpus", [])) or "none"
    return (f"{machine.get('board') or machine.get('cpu')}, "
            f"{format_bytes(machine.get('memory_bytes', 0))} RAM, GPU: {gpus}, "
            f"torch {machine.get('torch')}")


def markdown_report(results: list[dict]) -> str:
    ok = [r for r in results if _measured(r)]
    varied = varied_settings(results)
    baselines: dict[tuple, int] = {}
    for r in ok:
        if r["method"] == "e2e":
            baselines.setdefault(_baseline_key(r, varied), r["training_memory_bytes"])
    datasets = {_group(r)[0] for r in results}
    head = results[0]
    machines = list(dict.fromkeys(_machine(r) for r in results))
    out = [f"# edgetrain bench: {presets_of(results)}", ""]
    out.append(("Machine: " if len(machines) == 1 else "Machines (results combined from "
                "several benches): ") + "; ".join(machines) + ".")
    if head.get("device_profile"):
        how = ("simulated on this machine: the profile's budget and cache dtype were applied "
               "here, the numbers are this machine's" if head.get("simulated")
               else "run on the device itself")
        out.append(f"Device profile: {head['device_profile']} ({how}).")
    out += ["", "Training memory is the peak minus the framework baseline (torch and its "
            "libraries); on a discrete GPU, the CUDA allocator's peak. *vs e2e* is training "
            "memory over the end-to-end run's, same data and model (and the same value of "
            "every varied setting e2e has too, such as the seed or the memory budget).", ""]
    columns = ["method", "K", "mode", "cache", "test acc", "peak memory", "training memory",
               "vs e2e", "wall time", "status"]
    columns[4:4] = varied
    if len(datasets) > 1:
        columns.insert(0, "dataset")
    out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        row = [r["method"], _cell(r["modules"]), _cell(r["mode"]), _cell(r["cache"]),
               *(_cell(r["config"].get(key)) for key in varied)]
        if _measured(r):
            base = baselines.get(_baseline_key(r, varied))
            ratio = f"{r['training_memory_bytes'] / base:.2f}" if base else "–"
            row += [f"{100 * r['test_accuracy']:.2f}%", format_bytes(r["peak_memory_bytes"]),
                    format_bytes(r["training_memory_bytes"]), ratio,
                    f"{r['wall_time_s']:.1f} s", _STATUS[r["status"]]]
        elif r["status"] == "does_not_fit":
            row += ["–"] * 5 + [_STATUS["does_not_fit"]]
        else:
            row += ["–"] * 5 + [f"failed (exit {r.get('returncode')})"]
        if len(datasets) > 1:
            row.insert(0, _cell(_group(r)[0]))
        out.append("| " + " | ".join(row) + " |")
    budgets: list[str] = []
    for r in results:
        if r.get("memory_budget_bytes"):
            size = format_bytes(r["memory_budget_bytes"])
            text = f"{r['memory_budget']} ({size})" if r.get("memory_budget") else size
            if text not in budgets:
                budgets.append(text)
    if budgets:
        out += ["", f"Memory budget{'s' if len(budgets) > 1 else ''} {', '.join(budgets)} "
                "(--memory-budget, enforced by the planner; a share of e2e's need is resolved "
                "by each run's own probe): *over budget* ran but a measured peak exceeded it; "
                "*does not fit* was refused before training."]
    out += depth_report(ok)
    out += fidelity_table(ok)
    out += time_to_accuracy_table(ok, varied)
    for r in results:
        if r["status"] != "ok" and r.get("stderr_tail"):
            tail = r["stderr_tail"].strip().splitlines()[-3:]
            out += ["", f"{_STATUS.get(r['status'], 'Failed')}: `{r['run_id']}`:", "```",
                    *tail, "```"]
    return "\n".join(out) + "\n"


def _curve(r: dict) -> list[Point] | None:
    """The row's accuracy curve: kept in results.jsonl since the curves exist, read from the
    run folder for rows written before (None if neither has it)."""
    if r.get("accuracy_curve") is not None:
        return [tuple(p) for p in r["accuracy_curve"]]
    return run_curve(r["run_dir"]) if r.get("run_dir") else None


def time_to_accuracy_table(measured: list[dict], varied: list[str]) -> list[str]:
    """How soon each run had a network as accurate as the e2e run it is set against ended
    (edgetrain/bench/curves.py): seconds, the exit that got there, and the ratio to the
    time e2e itself first got there. Empty without an e2e run that has a curve."""
    curves = [_curve(r) for r in measured]  # once each: it may read a run folder's log
    targets: dict[tuple, tuple[float, float]] = {}
    for r, curve in zip(measured, curves):
        if r["method"] != "e2e" or not curve:
            continue
        reached = time_to(curve, r["test_accuracy"])
        if reached is not None:
            targets.setdefault(_baseline_key(r, varied), (r["test_accuracy"], reached[0]))
    rows = []
    for r, curve in zip(measured, curves):
        target = targets.get(_baseline_key(r, varied))
        if target is None or not curve:
            continue
        accuracy, e2e_seconds = target
        reached = time_to(curve, accuracy)
        settings = [_cell(r["config"].get(key)) for key in varied]
        if reached is None:
            best = max(p[1] for p in curve)
            cells = [f"not reached (best {100 * best:.2f}%)", "–", "–"]
        else:
            seconds, _, exit_ = reached
            cells = [f"{seconds:.1f} s", "whole network" if exit_ is None else f"module {exit_}",
                     f"{seconds / e2e_seconds:.2f}" if e2e_seconds > 0 else "–"]
        rows.append("| " + " | ".join([r["method"], _cell(r["modules"]), _cell(r["mode"]),
                                       *settings, f"{100 * accuracy:.2f}%", *cells]) + " |")
    if not rows:
        return []
    columns = ["method", "K", "mode", *varied, "target (e2e's accuracy)", "first reached at",
               "by", "vs e2e"]
    return ["", "## Time to end-to-end's accuracy", "",
            "When each run first had a network at least as accurate as the e2e run it is set "
            "against ended: every test evaluation a run logged counts (e2e after an epoch; a "
            "greedy run's modules 1..k with head k, i.e. an early exit), in seconds since the "
            "run started. Wall-clock times: compare rows that shared the machine alike "
            "(run side by side, or each alone).", "",
            "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows]


def depth_report(measured: list[dict]) -> list[str]:
    """Vanilla against TRGL at each K, same data, model, mode and cache: the paper's claim is
    that the transport term keeps greedy accuracy from falling as the network is cut into more
    modules. Empty unless both methods have measured runs to compare. Where several runs share
    a method and K (seeds, or TRGL's tau), the table shows their mean and how many."""
    lines: list[str] = []
    runs: dict[tuple, dict[int, dict[str, list[float]]]] = {}
    for r in measured:
        if r["method"] in ("vanilla", "trgl") and r["modules"] is not None:
            key = (*_group(r), r["mode"], r["cache"])
            runs.setdefault(key, {}).setdefault(r["modules"], {}).setdefault(
                r["method"], []).append(100 * r["test_accuracy"])
    groups = {key: {k: {m: sum(v) / len(v) for m, v in by_method.items()}
                    for k, by_method in by_k.items()} for key, by_k in runs.items()}
    for (dataset, model, mode, cache), by_k in sorted(groups.items(), key=str):
        ks = sorted(by_k)
        if not any(len(by_k[k]) == 2 for k in ks):
            continue
        counts = {len(v) for by_method in runs[(dataset, model, mode, cache)].values()
                  for v in by_method.values()}
        note = "" if counts == {1} else " (mean over runs: seeds, and TRGL's tau if varied)"
        lines += ["", f"Accuracy as K grows: {dataset} / {model}, {mode}, cache {cache}{note}",
                  "", "| K | vanilla | trgl | trgl − vanilla |", "|---|---|---|---|"]
        for k in ks:
            v, t = by_k[k].get("vanilla"), by_k[k].get("trgl")
            diff = f"{t - v:+.2f}" if v is not None and t is not None else "–"
            lines.append(f"| {k} | {_pct(v)} | {_pct(t)} | {diff} |")
        changes = []
        for method in ("vanilla", "trgl"):
            have = [k for k in ks if method in by_k[k]]
            if len(have) > 1:
                lo, hi = have[0], have[-1]
                changes.append(f"{method} {by_k[hi][method] - by_k[lo][method]:+.2f} points "
                               f"(K={lo} to K={hi})")
        if changes:
            lines += ["", "Change in accuracy as K grows: " + "; ".join(changes) + "."]
    return lines


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}%"


def _point_label(r: dict, varied: set[str]) -> str:
    if r["modules"] is None:
        return ""
    parts = [f"K={r['modules']}"]
    if "mode" in varied:
        parts.append("par" if r["mode"] == "parallel" else "seq")
    if "cache" in varied and r["cache"]:
        parts.append(r["cache"])
    return " ".join(parts)


def plot_memory_vs_accuracy(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on boards and CI machines
    import matplotlib.pyplot as plt

    measured = [r for r in results if _measured(r)]
    groups = sorted({_group(r) for r in measured}, key=str) or [(None, None)]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 4.8), squeeze=False)
    greedy = [r for r in measured if r["modules"] is not None]
    varied = {key for key in ("mode", "cache")
              if len({r[key] for r in greedy if r[key] is not None}) > 1}
    for ax, group in zip(axes[0], groups):
        runs = [r for r in measured if _group(r) == group]
        points = [(r["training_memory_bytes"] / 2**20, 100 * r["test_accuracy"]) for r in runs]
        for method in MARKERS:
            for over in (False, True):
                mine = [(p, r) for p, r in zip(points, runs) if r["method"] == method
                        and (r["status"] == "over_budget") == over]
                if not mine:
                    continue
                # A run over the budget is drawn hollow: measured, but it does not fit the device.
                ax.scatter([p[0] for p, _ in mine], [p[1] for p, _ in mine],
                           label=f"{method} (over budget)" if over else method,
                           marker=MARKERS[method], s=45, zorder=3,
                           facecolors="none" if over else COLORS[method],
                           edgecolors=COLORS[method])
                for (x, y), r in mine:
                    ax.annotate(_point_label(r, varied), (x, y), textcoords="offset points",
                                xytext=(5, 4), fontsize=8)
        within = [i for i, r in enumerate(runs) if r["status"] == "ok"]
        front = [points[within[j]] for j in pareto_front([points[i] for i in within])]
        if front:
            xs, ys = [p[0] for p in front], [p[1] for p in front]
            # The best accuracy reachable within a given memory: flat until the next point.
            ax.step(xs + [max(p[0] for p in points)], ys + [ys[-1]], where="post",
                    color="black", linestyle="--", linewidth=1, label="Pareto front", zorder=2)
            ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", linewidths=1.2,
                       zorder=4)
        dataset, model = group
        ax.set_title(" / ".join(str(v) for v in (dataset, model) if v) or "no finished runs")
        ax.set_xlabel("training peak memory (MiB)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        if runs:
            ax.legend(fontsize=8, loc="best")  # where it hides fewest points
    profile = results[0].get("device_profile") if results else None
    title = f"edgetrain bench: {presets_of(results) if results else ''}"
    if profile:
        title += f", profile {profile}" + (" (simulated)" if results[0].get("simulated") else "")
    fig.suptitle(title)
    fig.tight_layout()
    write_figure_atomic(fig, path)
    plt.close(fig)


def plot_accuracy_over_time(measured: list[dict], path: Path) -> bool:
    """Best test accuracy so far against wall time, one line per run (a greedy run's points
    are its exits: modules 1..k with head k), with each e2e run's final accuracy as a thin
    line: the picture of *Time to end-to-end's accuracy*. One panel per data set and model;
    False (nothing written) if no run has a curve."""
    curves = [(r, _curve(r)) for r in measured]
    curves = [(r, c) for r, c in curves if c]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on boards and CI machines
    import matplotlib.pyplot as plt

    varied = varied_settings([r for r, _ in curves])
    groups = sorted({_group(r) for r, _ in curves}, key=str)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 4.8), squeeze=False)
    # One line style per setting e2e shares (a budget, a seed): a run and its e2e look alike.
    keys = list(dict.fromkeys(_baseline_key(r, varied) for r, _ in curves))
    styles = ["-", "--", ":", "-."]
    for ax, group in zip(axes[0], groups):
        for r, curve in (rc for rc in curves if _group(rc[0]) == group):
            style = styles[keys.index(_baseline_key(r, varied)) % len(styles)]
            seconds, best, top = [], [], 0.0
            for t, accuracy, _ in curve:
                top = max(top, accuracy)
                seconds.append(t)
                best.append(100 * top)
            label = " ".join(filter(None, [r["method"], _point_label(r, {"mode"}), *(
                f"{key}={r['config'][key]}" for key in varied
                if r["config"].get(key) is not None)]))
            color = COLORS.get(r["method"])
            ax.step(seconds, best, where="post", color=color, linestyle=style, linewidth=1.2,
                    label=label)
            ax.scatter(seconds, best, marker=MARKERS.get(r["method"], "o"), s=14, color=color)
            if r["method"] == "e2e":
                ax.axhline(100 * r["test_accuracy"], color=color, linestyle=style,
                           linewidth=0.7, alpha=0.7)
        dataset, model = group
        ax.set_title(" / ".join(str(v) for v in (dataset, model) if v))
        ax.set_xlabel("wall time since the run started (s)")
        ax.set_ylabel("best test accuracy so far (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("accuracy over time (thin lines: each e2e run's final accuracy)")
    fig.tight_layout()
    write_figure_atomic(fig, path)
    plt.close(fig)
    return True
