"""TRGL against vanilla greedy, cell by cell, paired by seed: does the regulariser earn its keep?

A *cell* is one setting of everything but the seed (data size, model, K, mode, recipe, tau).
Each TRGL run is paired with the vanilla run that has the same settings and the same seed
(vanilla ignores tau), and the cell reports the mean of the paired differences, their spread
(sample standard deviation) and standard error. The gap counts as *positive beyond the seed
spread* when ``mean - 2 * standard error > 0``: with 3 seeds that is a demanding test, which is
the point (on 2,000 test images one seed's accuracy has a standard error of about 0.9 points).

Accuracy is the headline metric (the stitched network after its last epoch, whole test set).
The vanilla runs' last-epoch training accuracy is shown beside it: a regulariser can only help
where vanilla overfits.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from edgetrain.runs.files import write_figure_atomic

_NOT_CELL = ("seed", "method", "tau", "tau_schedule", "out", "overwrite", "resume")
_SHOWN = ("dataset", "train_limit", "model", "modules", "mode", "epochs", "lr_schedule", "lr",
          "init", "shortcut", "laps")


@dataclass(frozen=True)
class Gap:
    cell: dict
    """The settings shared by the pair (vanilla's and TRGL's), tau and tau_schedule included."""
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    """TRGL - vanilla test accuracy per seed, in points."""
    trgl: float
    vanilla: float
    vanilla_train: float | None
    """Vanilla's last-epoch training accuracy (%), averaged over seeds."""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def std(self) -> float:
        return statistics.stdev(self.differences) if len(self.differences) > 1 else math.nan

    @property
    def standard_error(self) -> float:
        return self.std / math.sqrt(len(self.differences))

    @property
    def beyond_spread(self) -> bool | None:
        """Mean gap more than two standard errors above zero (None with one seed)."""
        if len(self.differences) < 2:
            return None
        return self.mean - 2 * self.standard_error > 0


LEGACY_TAU = 1.0
"""edgetrain fit's default tau until 2026-11-30, when result lines began to keep their resolved
settings: a line without either ran with it."""


def _config(r: dict) -> dict:
    """A result line's preset fields, with the tau it ran with (a default is resolved: a TRGL
    run of an older edgetrain and one of today's that both leave tau out are different cells)."""
    tau = r["config"].get("tau", r.get("settings", {}).get("tau", LEGACY_TAU))
    return {**r["config"], "tau": tau} if r["method"] == "trgl" else r["config"]


def _key(config: dict, drop: tuple[str, ...]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in drop}, sort_keys=True)


def paired_gaps(measured: list[dict]) -> list[Gap]:
    """Every cell that has TRGL runs with vanilla partners, in first-seen order."""
    vanilla: dict[str, dict[int, dict]] = {}
    for r in measured:
        if r["method"] == "vanilla":
            vanilla.setdefault(_key(r["config"], _NOT_CELL), {})[r["config"].get("seed", 0)] = r
    cells: dict[str, list[tuple[int, dict, dict]]] = {}
    for r in measured:
        if r["method"] != "trgl":
            continue
        config = _config(r)
        seed = config.get("seed", 0)
        partner = vanilla.get(_key(config, _NOT_CELL), {}).get(seed)
        if partner is not None:
            cells.setdefault(_key(config, ("seed", "method")), []).append((seed, r, partner))
    gaps = []
    for pairs in cells.values():
        pairs.sort(key=lambda p: p[0])
        cell = {k: v for k, v in _config(pairs[0][1]).items() if k not in ("seed", "method")}
        trains = [p[2].get("train_accuracy") for p in pairs]
        trains = [t for t in trains if t is not None]
        gaps.append(Gap(
            cell=cell, seeds=tuple(p[0] for p in pairs),
            differences=tuple(100 * (t["test_accuracy"] - v["test_accuracy"])
                              for _, t, v in pairs),
            trgl=100 * statistics.fmean(t["test_accuracy"] for _, t, _ in pairs),
            vanilla=100 * statistics.fmean(v["test_accuracy"] for _, _, v in pairs),
            vanilla_train=100 * statistics.fmean(trains) if trains else None))
    return gaps


def _penalty(cell: dict) -> str:
    """The penalty of a cell as the table shows it: tau (the halved schedule, the default),
    "tau constant", or "multipliers" (no tau)."""
    schedule = cell.get("tau_schedule")
    if schedule == "multipliers":
        return "multipliers"
    return f"{cell['tau']} constant" if schedule == "constant" else str(cell["tau"])


def fidelity_table(measured: list[dict]) -> list[str]:
    """Markdown: one row per cell; empty if no TRGL run has a vanilla partner."""
    gaps = paired_gaps(measured)
    if not gaps:
        return []
    shown = [f for f in _SHOWN if len({json.dumps(g.cell.get(f)) for g in gaps}) > 1]
    columns = [*shown, "tau", "seeds", "vanilla", "trgl", "trgl − vanilla (mean ± sd)",
               "beyond spread", "vanilla train acc"]
    lines = ["", "TRGL against vanilla greedy, paired by seed (test accuracy in points; "
             "*beyond spread*: mean − 2 standard errors > 0):", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for g in gaps:
        tau = _penalty(g.cell)
        row = [str(g.cell.get(f, "–")) for f in shown]
        spread = f" ± {g.std:.2f}" if len(g.differences) > 1 else ""
        beyond = {True: "yes", False: "no", None: "–"}[g.beyond_spread]
        train = f"{g.vanilla_train:.1f}%" if g.vanilla_train is not None else "–"
        row += [str(tau), str(len(g.seeds)), f"{g.vanilla:.2f}%", f"{g.trgl:.2f}%",
                f"{g.mean:+.2f}{spread}", beyond, train]
        lines.append("| " + " | ".join(row) + " |")
    positive = [g for g in gaps if g.beyond_spread]
    lines += ["", f"{len(positive)} of {len(gaps)} cells have TRGL above vanilla beyond the "
              "seed spread." if gaps else ""]
    return lines


FIDELITY_PLOT = "fidelity.png"


def plot_fidelity(measured: list[dict], path: Path) -> bool:
    """TRGL - vanilla per cell: each seed's gap as a dot, the mean with +-2 standard errors,
    and zero; False (nothing written) if no TRGL run has a vanilla partner."""
    gaps = paired_gaps(measured)
    if not gaps:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on boards and CI machines
    import matplotlib.pyplot as plt

    shown = [f for f in (*_SHOWN, "tau", "tau_schedule")
             if len({json.dumps(g.cell.get(f)) for g in gaps}) > 1] or ["tau"]
    labels = ["\n".join(f"{f} {g.cell.get(f)}" for f in shown) for g in gaps]
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 * len(gaps) + 2), 4.2))
    for i, g in enumerate(gaps):
        ax.scatter([i] * len(g.differences), g.differences, color="0.55", s=18, zorder=2)
        spread = 2 * g.standard_error if len(g.differences) > 1 else 0.0
        ax.errorbar(i, g.mean, yerr=spread, fmt="D", color="C3", capsize=6, zorder=3)
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_xticks(range(len(gaps)), labels)
    ax.set_xlim(-0.7, len(gaps) - 0.3)
    ax.set_ylabel("TRGL − vanilla test accuracy (points)")
    ax.set_title("TRGL against vanilla greedy, paired by seed\n(dots: seeds; diamond: mean "
                 "± 2 standard errors)", fontsize=9)
    fig.tight_layout()
    write_figure_atomic(fig, path)
    plt.close(fig)
    return True
