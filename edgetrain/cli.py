"""The `edgetrain` command. It parses flags, builds a config and calls the library; nothing
else lives here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from edgetrain.cli_output import console
from edgetrain.cli_output import fail as _fail
from edgetrain.config import CACHE_DTYPES, FitConfig
from edgetrain.errors import UserInputError
from edgetrain.memory.planner import BudgetError
from edgetrain.reporting import print_plan, print_report
from edgetrain.runs.files import is_out_of_space
from edgetrain.units import MemorySize

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train neural networks module by module (TRGL) where memory is short.",
)

T = TypeVar("T")
R = TypeVar("R")


@app.callback()
def _root() -> None:
    """Train neural networks module by module (TRGL) where memory is short."""


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise UserInputError(
            f"--widths {text!r} must be integers separated by commas, e.g. 16,32,64."
        ) from None
    return widths


@app.command()
def fit(
    ctx: typer.Context,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="Memory the run may use, e.g. 2GB (10^9 bytes), 1.5GiB (2^30 bytes), 512MB, or "
            "plain bytes. Recorded in the report."
        ),
    ] = None,
    dataset: Annotated[
        str,
        typer.Option(
            help="fashion-mnist-mini (built in, offline), fashion-mnist, mnist, cifar10, cifar100, "
            "svhn, stl10, imagefolder."
        ),
    ] = "fashion-mnist-mini",
    data_dir: Annotated[Path | None, typer.Option(help="Folder with the dataset files.")] = None,
    download: Annotated[bool, typer.Option(help="Download the dataset if missing.")] = False,
    image_size: Annotated[
        int | None,
        typer.Option(help="Resize images to this side (default: native; 32 for imagefolder)."),
    ] = None,
    train_limit: Annotated[
        int | None, typer.Option(help="Use a class-balanced subset of this many training images.")
    ] = None,
    test_limit: Annotated[
        int | None, typer.Option(help="Use a class-balanced subset of this many test images.")
    ] = None,
    model: Annotated[
        str, typer.Option(help="resnet8/14/20/32/44/56/110 (CIFAR ResNets).")
    ] = "resnet20",
    widths: Annotated[str, typer.Option(help="Channels per stage, comma separated.")] = "16,32,64",
    modules: Annotated[int, typer.Option("--modules", "-K", help="K: number of modules.")] = 4,
    split: Annotated[str, typer.Option(help="even | balanced (by activation memory).")] = "even",
    shortcut: Annotated[
        str, typer.Option(help="Downsampling shortcut: conv (1x1 conv + BN) | zero-pad "
                          "(subsample + zero channels, the authors').")
    ] = "conv",
    init: Annotated[
        str, typer.Option(help="default (Kaiming) | orthogonal (scaled by --init-gain, the "
                          "authors').")
    ] = "default",
    init_gain: Annotated[float, typer.Option(help="Gain of --init orthogonal.")] = 0.1,
    method: Annotated[str, typer.Option(help="trgl | vanilla | e2e.")] = "trgl",
    mode: Annotated[str, typer.Option(help="sequential | parallel.")] = "sequential",
    epochs: Annotated[int, typer.Option(help="Epochs per module (sequential), or in all.")] = 5,
    laps: Annotated[
        int, typer.Option(help="Passes over the modules (sequential); each lap trains every "
                          "module epochs/laps epochs, continuing from the lap before.")
    ] = 1,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak SGD learning rate.")] = 0.05,
    lr_schedule: Annotated[
        str, typer.Option(help="cosine (to 0) | constant | step (/5 at 60% and 80%).")
    ] = "cosine",
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="SGD weight decay.")] = 5e-4,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy smoothing.")] = 0.0,
    tau: Annotated[float, typer.Option(help="TRGL step size; penalty 1/(2 tau).")] = 1.0,
    tau_schedule: Annotated[
        str, typer.Option(help="halved | constant | multipliers (weight 1/lambda, lambda += CE "
                          "every 50 steps).")
    ] = "halved",
    activation_checkpointing: Annotated[
        bool,
        typer.Option(
            help="Recompute block activations in backward instead of storing them "
            "(less memory, about one more forward pass)."
        ),
    ] = False,
    cache: Annotated[
        str,
        typer.Option(
            help="disk: cache frozen outputs (less compute, augmentation fixed per view); none: "
            "recompute frozen modules every batch (fresh augmentation)."
        ),
    ] = "disk",
    cache_dtype: Annotated[str, typer.Option(help=" | ".join(CACHE_DTYPES) + ".")] = "float32",
    cache_views: Annotated[
        int,
        typer.Option(help="Training-set views cached per module: view 0 plain, others augmented."),
    ] = 1,
    backend: Annotated[
        str,
        typer.Option(help="torch (autograd) | ort (ONNX Runtime training API, sequential mode)."),
    ] = "torch",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/latest"),
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = False,
    resume: Annotated[
        bool,
        typer.Option(help="Continue the run in --out from its last finished module or epoch."),
    ] = False,
    allow_changes: Annotated[
        str,
        typer.Option(
            help="With --resume: settings that may differ from the run's own for the modules "
            "not finished yet, comma separated, e.g. lr (after a diverged module) or "
            "cache-dtype,cache (after a full disk). Finished modules are kept."
        ),
    ] = "",
    device_profile: Annotated[
        str | None,
        typer.Option(
            help="Apply a device profile (see `edgetrain devices`): its memory budget, cache "
            "dtype and device; flags you give win. Simulated (budget only) on another machine."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train a network module by module (TRGL), or end to end as the baseline."""
    from edgetrain.fit import fit as run_fit
    from edgetrain.training.steps import NonFiniteLossError

    try:
        # Every problem is reported at once: the flags parsed here, then validate()'s.
        problems: list[str] = []
        budget = (_parsed(MemorySize.parse, memory_budget, None, problems)
                  if memory_budget is not None else None)
        config = FitConfig(
            dataset=dataset,
            data_dir=data_dir,
            download=download,
            image_size=image_size,
            train_limit=train_limit,
            test_limit=test_limit,
            model=model,
            widths=_parsed(_widths, widths, FitConfig.widths, problems),
            modules=modules,
            split=split,
            shortcut=shortcut,
            init=init,
            init_gain=init_gain,
            method=method,
            mode=mode,
            epochs=epochs,
            laps=laps,
            batch_size=batch_size,
            lr=lr,
            lr_schedule=lr_schedule,
            momentum=momentum,
            weight_decay=weight_decay,
            label_smoothing=label_smoothing,
            tau=tau,
            tau_schedule=tau_schedule,
            cache=cache,
            cache_dtype=cache_dtype,
            cache_views=cache_views,
            backend=backend,
            activation_checkpointing=activation_checkpointing,
            device=device,
            seed=seed,
            threads=threads,
            out=out,
            overwrite=overwrite,
            resume=resume,
            allow_changes=tuple(c.strip().replace("-", "_") for c in allow_changes.split(",")
                                if c.strip()),
            memory_budget=budget.bytes if budget else None,
            memory_budget_text=memory_budget,
        )
        if device_profile is not None:
            from edgetrain.cli_bench import with_device_profile

            config = _parsed(lambda name: with_device_profile(config, name, ctx),
                             device_profile, config, problems)
        config = _parsed(FitConfig.validate, config, config, problems)
        if problems:
            raise UserInputError(problems)
        report = run_fit(config, progress=progress,
                         on_plan=lambda plan: print_plan(plan, console))
    except BudgetError as e:
        _fail(str(e), code=5)
    except UserInputError as e:
        _fail(str(e), code=2)
    except NonFiniteLossError as e:
        _fail(str(e), code=3)
    except OSError as e:
        if not is_out_of_space(e):
            raise
        _fail(f"Ran out of disk space writing {e.filename or out}. Finished modules are kept in "
              f"{out}. Free space there and run the same command with --resume; or keep "
              "going with less disk: --resume --cache-dtype float16 --allow-changes "
              "cache-dtype (half the cache), or --resume --cache none --allow-changes cache "
              "(no cache).", code=2)
    except KeyboardInterrupt:
        _fail(f"Interrupted. Finished modules and the last epoch checkpoint are kept in {out}; "
              "to continue, run the same command again with --resume.", code=130)
    print_report(report, out, console)
    if report["budget_exceeded"]:
        _fail("the measured peak memory exceeded --memory-budget: see the phases table above "
              "and report.json (budget_exceeded). The run's results are kept.", code=4)


def _parsed(parse: Callable[[T], R], value: T, fallback: R, problems: list[str]) -> R:
    """``parse(value)``, or ``fallback`` with the UserInputError's problems added to
    ``problems``, so that one bad flag does not hide the others."""
    try:
        return parse(value)
    except UserInputError as e:
        problems.extend(e.problems)
        return fallback




def main() -> None:
    app()


# Device profiles and benchmarks (issue 5); the commands live in edgetrain/cli_bench.py.
from edgetrain.cli_bench import bench_app, devices  # noqa: E402

app.command()(devices)
app.add_typer(bench_app, name="bench")

# ONNX export and on-device training artifacts (issue 4); the commands live in
# edgetrain/cli_onnx.py.
from edgetrain.cli_onnx import export, export_artifacts  # noqa: E402

app.command()(export)
app.command("export-artifacts")(export_artifacts)

# Memory profile of every training method (issue 3); the command lives in
# edgetrain/cli_profile.py.
from edgetrain.cli_profile import profile  # noqa: E402

app.command()(profile)
