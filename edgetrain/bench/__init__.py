"""Memory-vs-accuracy benchmarks: a grid of `edgetrain fit` runs (grid.py), each in its own
process (runner.py), summed up as a table and a plot (report.py)."""

from edgetrain.bench.grid import Preset, RunSpec, expand, load_preset, preset_names
from edgetrain.bench.runner import Bench, PlannedRun, prepare_bench, read_results, run_bench

__all__ = [
    "Bench",
    "PlannedRun",
    "Preset",
    "RunSpec",
    "expand",
    "load_preset",
    "prepare_bench",
    "preset_names",
    "read_results",
    "run_bench",
]
