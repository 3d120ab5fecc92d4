"""The `edgetrain` command: one module per command group, each only parsing flags and calling
the library (which never imports this package).

    fit                   cli/fit.py      train (flags generated from FitConfig)
    profile               cli/profile.py  peak memory of every method, side by side
    export, export-artifacts  cli/onnx.py  ONNX inference graphs, on-device training artifacts
    bench, devices        cli/bench.py    benchmark grids, device profiles
"""

from __future__ import annotations

import typer

from edgetrain.cli.bench import bench_app, devices
from edgetrain.cli.fit import fit
from edgetrain.cli.onnx import export, export_artifacts
from edgetrain.cli.profile import profile

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train neural networks module by module (TRGL) where memory is short.",
)


@app.callback()
def _root() -> None:
    """Train neural networks module by module (TRGL) where memory is short."""


app.command()(fit)
app.command()(profile)
app.command()(export)
app.command("export-artifacts")(export_artifacts)
app.command()(devices)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()
