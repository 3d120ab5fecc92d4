"""Tables for people: the memory plan before training, the results after."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgetrain.memory.planner import MemoryPlan
from edgetrain.units import format_bytes


def print_plan(plan: MemoryPlan | None, layout, console: Console) -> None:
    """With a budget: the layout (K, split, heads and why), then the memory plan. Without one
    nothing is printed before training (an error then stays the only output); the layout
    comes with the report."""
    if plan is None:
        return
    print_layout(layout.modules_reason, layout.reason, console)
    table = Table(title=f"memory plan: budget {format_bytes(plan.budget_bytes)}, "
                        f"usable {format_bytes(plan.usable_bytes)} after a "
                        f"{format_bytes(plan.budget_bytes - plan.usable_bytes)} safety margin "
                        f"(probes took {plan.probe_time_s:.0f} s)")
    for column in ("phase", "batch", "micro-batch x steps", "checkpointing", "fixed",
                   "per sample", "predicted peak"):
        table.add_column(column, justify="right")
    for p in plan.phases:
        batch = str(p.batch_size)
        if p.batch_size != layout.batch_size:  # --batch-growth: the lr is scaled alike
            batch += f" (lr x{p.batch_size // layout.batch_size})"
        table.add_row(p.phase, batch, f"{p.micro_batch} x {p.accumulation}",
                      "yes" if p.checkpointing else "no", format_bytes(p.fixed_bytes),
                      format_bytes(p.per_sample_bytes), format_bytes(p.predicted_peak_bytes))
    console.print(table)
    console.print(f"measured with: {escape(plan.meter)}")


def print_layout(modules_reason: str | None, reason: str, console: Console) -> None:
    if modules_reason:
        console.print(f"modules: {escape(modules_reason)}")
    console.print(f"split: {escape(reason)}")


def print_report(report: dict, out: Path, console: Console) -> None:
    if not report.get("memory_budget_bytes") and report.get("layout_reason"):
        print_layout(report.get("modules_reason"), report["layout_reason"], console)
    table = Table(title=f"edgetrain fit: {report['method']} ({report['mode']}), "
                        f"{report['model']} on {report['dataset']}")
    for column in ("module", "blocks", "tau", "aux test acc", "train time", "train peak"):
        table.add_column(column, justify="right")
    for m in report["modules"]:
        acc = m["aux_test_accuracy"]
        table.add_row(str(m["module"] + 1), f"{m['blocks'][0]}-{m['blocks'][1] - 1}",
                      f"{m['tau']:g}", f"{acc:.2%}" if acc is not None else "-",
                      f"{m['train_time_s']:.1f} s", format_bytes(m["train_peak_memory_bytes"]))
    if report["modules"]:
        console.print(table)
    if report.get("memory_budget_bytes"):
        budget = report["memory_budget_bytes"]
        guard = Table(title=f"memory guard: budget {format_bytes(budget)}")
        for column in ("phase", "predicted peak", "measured peak", "within budget"):
            guard.add_column(column, justify="right")
        for p in report["phases"]:
            predicted = p["predicted_peak_bytes"]
            guard.add_row(p["phase"], format_bytes(predicted) if predicted else "-",
                          format_bytes(p["measured_peak_bytes"]),
                          "yes" if p["within_budget"] else "[bold red]NO[/bold red]")
        console.print(guard)
    console.print(f"test accuracy (stitched network, raw test set): "
                  f"[bold]{report['test_accuracy']:.2%}[/bold]")
    metrics = report.get("accuracy_metrics") or {}
    if metrics.get("mean_last_3_epochs") is not None:
        best = metrics.get("best_over_epochs_and_modules_half")
        console.print(f"  mean of the last 3 epochs {metrics['mean_last_3_epochs']:.2%}"
                      + (f"; best over epochs and modules on a random test half (the paper's "
                         f"metric, selected on test data) {best:.2%}" if best is not None
                         else ""))
    console.print(f"wall time: {report['wall_time_s']:.1f} s   peak memory: "
                  f"{format_bytes(report['peak_memory_bytes'])} "
                  f"({escape(report['memory_measured'])}); "
                  f"framework baseline {format_bytes(report['framework_baseline_bytes'])}")
    alloc = report.get("allocator")
    if alloc and alloc["note"]:
        console.print(f"memory allocator: {alloc['policy']}, because {alloc['note']}")
    if report.get("device_profile"):
        note = (" (simulated: the profile's budget enforced on this machine)"
                if report.get("simulated") else "")
        console.print(f"device profile: {escape(report['device_profile'])}{note}")
    # Paths and record text are printed as written, never read as markup ("[/]" would raise).
    console.print(f"run folder: {escape(str(out))}")
