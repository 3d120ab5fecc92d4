"""`edgetrain fit`: its flags are FitConfig's fields (edgetrain/cli/options.py); this module
only says how a few of them are written, builds the config and calls the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgetrain.cli.options import Flag, build_config, config_parameters, with_signature
from edgetrain.cli.output import console
from edgetrain.cli.output import fail as _fail
from edgetrain.config import FitConfig
from edgetrain.errors import UserInputError
from edgetrain.units import MemorySize


def parse_widths(text: str) -> tuple[int, ...]:
    """``--widths 16,32,64``.

    >>> parse_widths("8,16,16")
    (8, 16, 16)
    """
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise UserInputError(
            f"--widths {text!r} must be integers separated by commas, e.g. 16,32,64."
        ) from None


def parse_names(text: str) -> tuple[str, ...]:
    """``--allow-changes lr,cache-dtype``: field names, written with dashes.

    >>> parse_names("lr, cache-dtype")
    ('lr', 'cache_dtype')
    """
    return tuple(name.strip().replace("-", "_") for name in text.split(",") if name.strip())


def parse_modules(text: str) -> int | None:
    """``--modules``: K, or None for auto.

    >>> parse_modules("8"), parse_modules("auto")
    (8, None)
    """
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise UserInputError(f"--modules {text!r} must be a whole number (K) or auto.") from None


FLAGS = {
    "modules": Flag(names=("-K",), parse=parse_modules),
    "widths": Flag(parse=parse_widths, show=lambda v: ",".join(map(str, v))),
    "allow_changes": Flag(parse=parse_names, show=lambda v: ",".join(v)),
    "memory_budget": Flag(parse=MemorySize.parse),
}
LIBRARY_ONLY = {"extra", "eval_every_epoch"}
"""Fields that tools set (edgetrain bench, the Python API), not flags."""


def fit(
    ctx: typer.Context,
    device_profile: Annotated[
        str | None,
        typer.Option(help="Apply a device profile (see `edgetrain devices`): its memory budget, "
                     "cache dtype and device; flags you give win. Simulated (budget only) on "
                     "another machine."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    **values,
) -> None:
    """Train a network module by module (TRGL), or end to end as the baseline."""
    from edgetrain.distributed.topology import leave_after_failure

    try:
        _fit(ctx, device_profile, progress, values)
    except typer.Exit as e:
        if e.exit_code:
            leave_after_failure(e.exit_code)  # only returns outside a distributed job
        raise
    except SystemExit as e:
        if e.code:
            leave_after_failure(e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException:
        leave_after_failure(1, traceback=True)
        raise


def _fit(ctx: typer.Context, device_profile: str | None, progress: bool, values: dict) -> None:
    from edgetrain.distributed.errors import PeerError
    from edgetrain.fit import fit as run_fit
    from edgetrain.memory.planner import BudgetError, BudgetExceededError
    from edgetrain.reporting import print_plan, print_report
    from edgetrain.runs.files import is_out_of_space
    from edgetrain.training.steps import NonFiniteLossError

    out = Path(values["out"])
    try:
        # Every problem is reported at once: the flags parsed here, then validate()'s.
        problems: list[str] = []
        config = build_config(FitConfig, values, FLAGS, problems)
        if device_profile is not None:
            from edgetrain.cli.bench import with_device_profile

            try:
                config = with_device_profile(config, device_profile, ctx)
            except UserInputError as e:
                problems.extend(e.problems)
        try:
            config.validate()
        except UserInputError as e:
            problems.extend(e.problems)
        if problems:
            raise UserInputError(problems)
        if config.distributed:  # one rank of a torch.distributed job (torchrun)
            from edgetrain.distributed.run import fit_distributed as run_fit
        report = run_fit(config, progress=progress,
                         on_plan=lambda plan, layout: print_plan(plan, layout, console))
    except BudgetError as e:
        _fail(str(e), code=5)
    except BudgetExceededError as e:  # held to the budget, training needed more
        _fail(str(e), code=4)
    except UserInputError as e:
        _fail(str(e), code=2)
    except NonFiniteLossError as e:
        _fail(str(e), code=3)
    except PeerError as e:  # issue 15: a rank of a distributed job died or stopped answering
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
    if "secondary_rank" in report:  # issue 15: rank 0 prints the distributed run's report
        return
    print_report(report, out, console)
    if report["budget_exceeded"]:
        _fail("the measured peak memory exceeded --memory-budget: see the phases table above "
              "and report.json (budget_exceeded). The run's results are kept.", code=4)


with_signature(fit, config_parameters(FitConfig, FLAGS, LIBRARY_ONLY))
