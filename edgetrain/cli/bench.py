"""The `edgetrain devices` and `edgetrain bench` commands (registered on the app in cli.py).
They parse flags and call edgetrain.hardware.profiles and edgetrain.bench; nothing else lives
here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from edgetrain.cli.output import console
from edgetrain.cli.output import fail as _fail
from edgetrain.cli.output import say as _say
from edgetrain.config import FitConfig
from edgetrain.errors import UserInputError
from edgetrain.paths import folder_problem
from edgetrain.units import format_bytes


def devices(
    name: Annotated[
        str | None, typer.Argument(help="A profile to show in full (budget reasoning, install).")
    ] = None,
) -> None:
    """List the device profiles that `--device-profile NAME` applies, or show one in full."""
    from edgetrain.hardware.machine import detect_machine
    from edgetrain.hardware.profiles import is_simulated, list_profiles, load_profile

    try:
        profiles = [load_profile(name)] if name else list_profiles()
    except UserInputError as e:
        _fail(str(e).replace("--device-profile", "edgetrain devices NAME:", 1), code=2)
    machine = detect_machine()
    if name:
        p = profiles[0]
        here = "simulated here" if is_simulated(p, machine) else "this machine is one"
        # Profile files are the user's: their text is printed as written, never as markup.
        console.print(f"[bold]{escape(p.name)}[/bold] ({escape(str(p.path))}): "
                      f"{escape(p.description)}", highlight=False)
        for label, text in (
            ("device", f"{p.device} ({p.kind}); {here}"),
            ("memory", f"{p.total_memory_text} ({format_bytes(p.total_memory_bytes)}), "
                       f"{'unified with the host' if p.unified_memory else 'the GPU its own'}"),
            ("budget", f"{p.memory_budget_text} ({format_bytes(p.memory_budget_bytes)})"),
            ("why that budget", p.budget_reason),
            ("cache dtype", f"{p.cache_dtype}: {p.cache_dtype_reason}"),
            ("precision", p.precision),
            ("install torch", p.torch_install),
        ):
            console.print(f"[bold]{label}:[/bold] {escape(str(text))}", highlight=False)
        return
    table = Table(title="device profiles (edgetrain fit/bench --device-profile NAME)")
    # The descriptions are long: `edgetrain devices NAME` shows them, the table stays narrow.
    for column in ("name", "device", "memory", "unified", "budget", "cache dtype", "precision",
                   "here"):
        table.add_column(column, no_wrap=column == "name")
    for p in profiles:
        table.add_row(p.name, p.device, p.total_memory_text, "yes" if p.unified_memory else "no",
                      p.memory_budget_text, p.cache_dtype, p.precision,
                      "simulated" if is_simulated(p, machine) else "real")
    console.print(table)
    console.print("`edgetrain devices NAME` shows how each budget was chosen and how to install "
                  "torch there.", highlight=False)


bench_app = typer.Typer(
    no_args_is_help=True,
    help="Memory-vs-accuracy benchmarks: a grid of `edgetrain fit` runs, one process each.",
)


@bench_app.command("run")
def bench_run(
    preset: Annotated[
        str, typer.Option(help="smoke | cpu | paper (see `edgetrain bench presets`), or a path "
                               "to a preset .toml file.")
    ] = "smoke",
    out: Annotated[
        Path | None, typer.Option(help="Results folder (default runs/bench-PRESET). Rerunning "
                                       "into the same folder skips finished runs.")
    ] = None,
    device_profile: Annotated[
        str | None, typer.Option(help="Apply a device profile to every run (see `edgetrain "
                                      "devices`); simulated if this machine is not that device.")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option(help="Run only runs whose label contains this text "
                                            "(repeatable), e.g. --only trgl-K4.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the runs and their flags; run nothing.")]
    = False,
    jobs: Annotated[
        int, typer.Option(help="Runs at a time, each its own process (give each --threads "
                          "cores). Accuracy and memory stay each run's own; compare wall "
                          "times only from --jobs 1.")
    ] = 1,
) -> None:
    """Run a benchmark preset; write OUT/results.jsonl, OUT/results.md and the plot."""
    from edgetrain.bench import prepare_bench, run_bench
    from edgetrain.bench.report import write_report
    from edgetrain.bench.runner import bench_folder_problem

    try:
        if not 1 <= jobs <= 256:
            raise UserInputError(f"--jobs must be between 1 and 256 (got {jobs}).")
        bench = prepare_bench(preset, device_profile, only)
        out = out or Path("runs") / f"bench-{bench.preset.name}"
        # Before the first run: a bad --out would otherwise only fail when results are written.
        if not dry_run and (problem := folder_problem("--out", out)
                            or bench_folder_problem(out)):
            raise UserInputError(problem)
    except UserInputError as e:
        _fail(str(e), code=2)
    _say(f"preset {bench.preset.name}: {bench.preset.description}")
    _say(f"expected time: {bench.preset.estimate}")
    if bench.profile:
        _say(f"device profile {bench.profile.name}: budget {bench.profile.memory_budget_text}, "
             f"cache dtype {bench.profile.cache_dtype}"
             + (" (simulated: this machine is not that device)" if bench.simulated else ""))
    if dry_run:
        for i, run in enumerate(bench.runs, 1):
            _say(f"[{i}/{len(bench.runs)}] {run.run_id}\n    edgetrain fit "
                 f"{' '.join(run.args)} --out {out / 'runs' / run.run_id}")
        return
    try:
        run_bench(bench, out, log=_say, jobs=jobs)
        report = write_report(out)
    except KeyboardInterrupt:
        if (out / "results.jsonl").exists():
            write_report(out)
        _fail(f"Interrupted. Finished runs are in {out}; rerun the same command to resume.", 130)
    except UserInputError as e:
        _fail(str(e), code=2)
    _show(report)
    if report.failed:
        _fail(f"{report.failed} run(s) failed; their errors are at the end of {report.table}. "
              "Rerun the same command to retry them.", code=1)


@bench_app.command("report")
def bench_report(
    folders: Annotated[list[Path], typer.Argument(
        help="A folder `edgetrain bench run` wrote, or several to combine (with --out).",
        metavar="FOLDER", show_default=False)],
    out: Annotated[Path | None, typer.Option(
        help="Combine the folders' results here: a new or empty folder gets their results.jsonl, "
             "table and plots (the folders are only read).")] = None,
) -> None:
    """Rebuild FOLDER/results.md and the plots from FOLDER/results.jsonl; or, with --out, build
    one table from several benches (a sweep run in parts, or on several machines)."""
    from edgetrain.bench.report import combine_results, write_report

    if out is None and len(folders) > 1:
        _fail(f"{len(folders)} folders given: to combine them into one table, name a new "
              "folder for it with --out.", code=2)
    try:
        report = write_report(folders[0], "FOLDER") if out is None else combine_results(
            folders, out)
    except UserInputError as e:
        _fail(str(e), code=2)
    _show(report)


def _show(report) -> None:
    _say(report.table.read_text())
    _say(f"{report.finished} runs finished, {report.failed} failed.\ntable: {report.table}\n"
         f"plot: {report.plot}")


@bench_app.command("presets")
def bench_presets() -> None:
    """List the benchmark presets: what each runs and how long it takes."""
    from edgetrain.bench import expand, load_preset, preset_names

    table = Table(title="benchmark presets (edgetrain bench run --preset NAME)")
    for column in ("name", "runs", "expected time", "description"):
        table.add_column(column, overflow="fold")
    try:
        for name in preset_names():
            p = load_preset(name)
            table.add_row(p.name, str(len(expand(p))), p.estimate, p.description)
    except UserInputError as e:
        _fail(str(e), code=2)
    console.print(table)


def explicit_options(ctx: typer.Context) -> set[str]:
    """Names of the command's options the user set (on the command line or through the
    environment), as opposed to those left at their defaults."""
    # Compared by name: typer vendors click, and its ParameterSource enum is not public API.
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE",
                                                                         "ENVIRONMENT")}


def with_device_profile(config: FitConfig, name: str, ctx: typer.Context) -> FitConfig:
    """For `edgetrain fit --device-profile NAME`: ``config`` with the profile applied, the flags
    the user gave winning (fit's option names are FitConfig's field names)."""
    from edgetrain.hardware.machine import detect_machine
    from edgetrain.hardware.profiles import apply_profile, is_simulated, load_profile

    profile = load_profile(name)
    return apply_profile(config, profile, explicit_options(ctx),
                         simulated=is_simulated(profile, detect_machine()))
