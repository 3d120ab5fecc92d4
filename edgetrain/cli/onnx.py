"""The `edgetrain export` and `edgetrain export-artifacts` commands (registered on the app in
cli.py). They parse flags and call edgetrain.onnx; nothing else lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgetrain.cli.output import fail as _fail
from edgetrain.cli.output import out_of_space
from edgetrain.cli.output import say as _say
from edgetrain.errors import UserInputError
from edgetrain.paths import check_paths, file_problem, folder_problem


def export(
    run_dir: Annotated[Path, typer.Argument(help="Folder of a finished `edgetrain fit` run.")],
    out: Annotated[Path, typer.Option(help="ONNX file to write.")] = Path("model.onnx"),
    per_module: Annotated[
        bool, typer.Option(help="Also write each module as its own graph (OUT.module_K.onnx; "
                           "the last one includes the classifier head).")
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where the run's dataset is, if not where it was at training time "
                     "(its test set verifies the export)."),
    ] = None,
    exit_at: Annotated[
        str | None,
        typer.Option(help="Early exit: export modules 1..K and head K only (K = 1, 2, ...), or "
                     "auto: the smallest K within --exit-tolerance of the best head's test "
                     "accuracy. Prints every exit's parameters, accuracy and latency.")
    ] = None,
    exit_tolerance: Annotated[
        float, typer.Option(help="Points of test accuracy --exit-at auto may give up.")
    ] = 0.5,
) -> None:
    """Export the stitched network to ONNX (inference mode, dynamic batch axis) and verify it
    against torch with onnxruntime on the run's test set."""
    from edgetrain.onnx.export import TOLERANCE, ExportVerificationError, export_run

    try:
        check_paths(("RUN_DIR", run_dir), ("--data-dir", data_dir))
        if problem := file_problem("--out", out):
            raise UserInputError(problem)
        from edgetrain.onnx.exits import parse_exit

        report = export_run(run_dir, out, per_module=per_module, data_dir=data_dir,
                            exit_at=parse_exit(exit_at), exit_tolerance=exit_tolerance)
    except UserInputError as e:
        _fail(str(e), code=2)
    except ExportVerificationError as e:
        _fail(str(e), code=5)
    except OSError as e:
        if not out_of_space(e, str(out)):
            raise
    _say(f"wrote {report.path} (ONNX opset {report.opset}; exporter {report.exporter}: the "
         "dynamo exporter needs onnxscript and has produced wrong models)")
    for path in report.module_paths:
        _say(f"wrote {path}")
    _say(f"input: float32 [batch, C, H, W] normalised per channel, (pixel / 255 - mean) / std "
         f"with mean = {list(report.mean)}, std = {list(report.std)} (also in the graph's "
         "metadata_props)")
    _say(f"onnx.checker: ok. onnxruntime vs torch on {report.test_samples} test images, batch "
         f"sizes {report.batch_sizes}: max abs difference {report.max_abs_diff:.2e} "
         f"(tolerance {TOLERANCE:g})")
    if report.modules_max_abs_diff is not None:
        _say(f"per-module graphs chained vs torch: max abs difference "
             f"{report.modules_max_abs_diff:.2e}")
    _say(f"test accuracy: torch {report.torch_accuracy:.2%}, ONNX {report.onnx_accuracy:.2%}")
    if report.exits:
        from edgetrain.onnx.exits import exits_table

        _say(f"exported exit {report.exit} (modules 1-{report.exit} and head {report.exit}). "
             "Every exit, measured with onnxruntime on this machine's CPU (latency: median of "
             "20 runs; accuracy on the run's test set, which --exit-at auto chose on):")
        for line in exits_table(report.exits, report.exit):
            _say(line)


def export_artifacts(
    run_dir: Annotated[Path, typer.Argument(help="Folder of a finished `edgetrain fit` run.")],
    module: Annotated[
        int, typer.Option("--module", "-k",
                          help="Module index, 0-based as in modules/module_K.safetensors.")
    ] = 0,
    out: Annotated[Path, typer.Option(help="Folder to write the artifacts to.")] = Path(
        "artifacts"),
) -> None:
    """Write one module's ONNX Runtime training artifacts (training, optimizer and inference
    graphs; checkpoint of its trained weights; README.txt) for on-device training."""
    from edgetrain.onnx.artifacts import export_training_artifacts

    try:
        check_paths(("RUN_DIR", run_dir))
        if problem := folder_problem("--out", out):
            raise UserInputError(problem)
        description = export_training_artifacts(run_dir, module, out)
    except UserInputError as e:
        _fail(str(e), code=2)
    except OSError as e:
        if not out_of_space(e, str(out)):
            raise
    for name in (*description["files"].values(), "README.txt", "artifacts.json"):
        _say(f"wrote {out / name}")
    _say(f"module {module} input x: {description['inputs']['x']}")
    _say("the artifacts load in onnxruntime-training (CheckpointState, Module, Optimizer); "
         "README.txt shows the training loop")
