"""`edgetrain export`: a run's stitched network as an ONNX inference graph, verified.

    graph = modules 1..K + the last head, BatchNorm in inference mode, batch axis dynamic
    input  "input"  float32 [batch, C, H, W], already normalised: (pixel / 255 - mean) / std
    output "logits" float32 [batch, num_classes]

The input is the normalised image, as the network was trained: the per-channel mean and std are
written to the graph's metadata (``edgetrain.mean``, ``edgetrain.std``) so that an application
can normalise without edgetrain. With ``per_module`` each module is also written as its own
graph (``model.module_0.onnx`` ...: "input" -> "features", the last one -> "logits", head
included), so chaining them gives the whole network.

Verification, every export: ``onnx.checker``; then onnxruntime (any build: plain onnxruntime is
enough) against torch on the run's held-out test set, at two batch sizes at least (the test
batches and a batch of one), failing above :data:`TOLERANCE` max absolute difference of the
logits; then the test accuracy of both, which must be equal.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgetrain.errors import UserInputError
from edgetrain.onnx.graphs import EXPORTER, OPSET, export_graph, exportable, set_metadata
from edgetrain.paths import path_problem, shown
from edgetrain.runs.model import ModelInfo, load_stitched, open_run, reading_run

TOLERANCE = 1e-4
BATCH = 256


class ExportVerificationError(RuntimeError):
    """The exported graph does not compute what the torch network computes."""


@dataclass
class ExportReport:
    path: Path
    module_paths: list[Path]
    opset: int
    exporter: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    test_samples: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    max_abs_diff: float = 0.0
    modules_max_abs_diff: float | None = None
    torch_accuracy: float = 0.0
    onnx_accuracy: float = 0.0
    exit: int | None = None
    """Modules exported (1..exit, with head ``exit``), if an early exit was asked for."""
    exits: list = field(default_factory=list)
    """Every exit's parameters, accuracy and latency (edgetrain/onnx/exits.py)."""


def export_run(run_dir: Path, out: Path, per_module: bool = False,
               data_dir: Path | None = None, exit_at: int | str | None = None,
               exit_tolerance: float = 0.5) -> ExportReport:
    """Export the run's stitched network to ``out`` (and its modules, if ``per_module``), then
    verify it; raise :class:`ExportVerificationError` if it disagrees with torch.

    Atomic: every graph is written under a temporary name beside its final one and renamed
    only once verification has passed, so ``out`` is either the old file or a verified new one.
    An existing file at a final name is replaced only if edgetrain exported it (its metadata
    says so). The run is read under its shared lock: no `fit --overwrite` replaces it meanwhile.

    ``exit_at``: export modules 1..K and head K only (an int), or ``"auto"``: the smallest K
    whose head is within ``exit_tolerance`` points of the best head (edgetrain/onnx/exits.py).
    """
    if out.suffix != ".onnx":
        raise UserInputError(f"--out {out} should end in .onnx, e.g. --out model.onnx.")
    if out.is_dir():
        raise UserInputError(f"--out {out} is a folder. Give a file name such as model.onnx.")
    with reading_run(run_dir):
        network, info = load_stitched(run_dir)
        _, _, config = open_run(run_dir)
        exits, chosen = [], None
        if exit_at is not None:
            from edgetrain.data import load_dataset
            from edgetrain.onnx.exits import check_exit, choose_exit, exit_network, measure_exits

            check_exit(exit_at, len(network.stages), config.method)
            if not 0 <= exit_tolerance <= 100:
                raise UserInputError(f"--exit-tolerance {exit_tolerance} must be between 0 and "
                                     "100 points, e.g. 0.5.")
            data = load_dataset(config.dataset, data_dir or config.data_dir, False,
                                config.image_size, config.train_limit, config.test_limit,
                                config.seed)
            exits = measure_exits(Path(run_dir), len(network.stages), info, data)
            chosen = choose_exit(exits, exit_tolerance) if exit_at == "auto" else exit_at
            network = exit_network(Path(run_dir), chosen)
        finals = [out] + ([out.with_name(f"{out.stem}.module_{k}.onnx")
                           for k in range(len(network.stages))] if per_module else [])
        temps = {path: _temporary_name(path) for path in finals}
        for path in (*finals, *temps.values()):
            if path_problem("--out", path):  # out itself passed: the names made from it
                raise UserInputError(
                    f"--out {shown(out)}: the files export writes beside it (such as "
                    f"{shown(path.name)}) get names too long for this filesystem. Choose a "
                    "shorter --out.")
        for path in finals:
            if problem := _replace_problem(path):
                raise UserInputError(problem)
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        try:
            report = _export_and_verify(network, info, config, run_dir, out, temps, data_dir)
            report.exit, report.exits = chosen, exits
            for final, temp in temps.items():
                os.replace(temp, final)  # verified: only now does it take the real name
        finally:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
    return report


def _export_and_verify(network, info: ModelInfo, config, run_dir: Path, out: Path,
                       temps: dict[Path, Path], data_dir: Path | None) -> ExportReport:
    shape = (info.in_channels, info.image_size, info.image_size)
    props = _metadata(info, run_dir)
    if len(network.stages) < len(info.modules):
        props["edgetrain.exit"] = str(len(network.stages))
    export_inference(network, shape, temps[out], "logits", props,
                     f"edgetrain {info.model}, {len(network.stages)} of {len(info.modules)} "
                     "modules stitched, eval mode")
    module_paths = [p for p in temps if p != out]
    last = len(network.stages) - 1
    for k, path in enumerate(module_paths):
        part = _Stage(network.stages[k], network.head if k == last else None)
        export_inference(part, _stage_input(info, k), temps[path],
                         "logits" if k == last else "features",
                         {**props, "edgetrain.module": str(k)},
                         f"edgetrain {info.model}, module {k} of {last + 1}"
                         + (" + classifier head" if k == last else ""))

    report = ExportReport(out, module_paths, OPSET, EXPORTER, info.mean, info.std)
    from edgetrain.data import load_dataset

    data = load_dataset(config.dataset, data_dir or config.data_dir, False, config.image_size,
                        config.train_limit, config.test_limit, config.seed)
    verify(network, temps[out], [temps[p] for p in module_paths], data, report)
    return report


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files an export killed mid-write left beside ``path`` (``.NAME.<hex>.tmp``
    for NAME ``path``'s name or one of its per-module names, whether this export writes them
    or not; regular files only: names edgetrain alone makes)."""
    names = rf"{re.escape(path.name)}|{re.escape(path.stem)}\.module_[0-9]+\.onnx"
    pattern = re.compile(rf"\.(?:{names})\.[0-9a-f]{{8}}\.tmp")
    for entry in os.scandir(path.parent):
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)


def _replace_problem(path: Path) -> str | None:
    """Why the file at ``path`` must not be replaced by an export, or None."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        return (f"--out {path} exists and is not a regular file; edgetrain does not replace "
                "it. Choose another --out.")
    try:
        graph = onnx.load(str(path), load_external_data=False)
        keys = {p.key for p in graph.metadata_props}
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        keys = set()
    if "edgetrain.exporter" not in keys:
        return (f"--out {path} already exists and is not an ONNX file edgetrain exported; it is "
                "left as it is. Choose another --out, or move that file away first.")
    return None


def export_inference(model: nn.Module, input_shape: tuple[int, ...], path: Path, output: str,
                     props: dict[str, str], doc: str) -> None:
    x = torch.randn(2, *input_shape)
    graph = export_graph(exportable(model, x), (x,), path, ["input"], [output], [output],
                         training=False)
    set_metadata(graph, doc, props)
    onnx.save(graph, str(path))
    # On the file, not the proto: the path form also checks graphs over the 2 GB proto limit.
    onnx.checker.check_model(str(path), full_check=True)


@torch.no_grad()
def verify(network: nn.Module, path: Path, module_paths: list[Path], data,
           report: ExportReport) -> None:
    """Run the graph(s) in onnxruntime beside torch over the whole test set; fill ``report``."""
    import onnxruntime

    from edgetrain.data import iterate_batches, normalize

    def session(p: Path):
        return onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"])

    whole = session(path)
    parts = [session(p) for p in module_paths]
    network.eval()
    diff, parts_diff = 0.0, 0.0
    correct_torch = correct_onnx = seen = 0
    sizes: set[int] = set()
    first = True
    for images, labels in iterate_batches(data.test, BATCH, shuffle=False):
        x = normalize(images, data.info)
        expected = network(x).numpy()
        # A batch of one first: the batch axis must really be dynamic.
        batches = [(x[:1], expected[:1]), (x, expected)] if first else [(x, expected)]
        first = False
        for xb, eb in batches:
            got = whole.run(None, {"input": xb.numpy()})[0]
            diff = max(diff, _max_abs_diff(got, eb))
            sizes.add(len(xb))
            if parts:
                features = xb.numpy()
                for part in parts:
                    features = part.run(None, {"input": features})[0]
                parts_diff = max(parts_diff, _max_abs_diff(features, eb))
        labels = labels.numpy()
        correct_torch += int((expected.argmax(1) == labels).sum())
        correct_onnx += int((got.argmax(1) == labels).sum())
        seen += len(labels)
    report.test_samples, report.batch_sizes = seen, sorted(sizes)
    report.max_abs_diff = diff
    report.modules_max_abs_diff = parts_diff if parts else None
    report.torch_accuracy = correct_torch / max(seen, 1)
    report.onnx_accuracy = correct_onnx / max(seen, 1)
    problems = []
    if not diff <= TOLERANCE:  # written so that a NaN difference fails too
        problems.append("the outputs hold NaN or infinite values" if math.isinf(diff) else
                        f"onnxruntime's logits differ from torch's by up to {diff:.3g} "
                        f"(tolerance {TOLERANCE:g})")
    if parts and not parts_diff <= TOLERANCE:
        problems.append(f"the chained per-module graphs differ from torch by up to "
                        f"{parts_diff:.3g} (tolerance {TOLERANCE:g})")
    if correct_torch != correct_onnx:
        problems.append(f"test accuracy differs: torch {report.torch_accuracy:.4%}, "
                        f"ONNX {report.onnx_accuracy:.4%}")
    if problems:
        raise ExportVerificationError(
            f"The exported graph {path} does not match the torch network: "
            + "; ".join(problems) + ". Do not deploy it; please report this with the run's "
            "model.json and your torch/onnx/onnxruntime versions.")


def _max_abs_diff(got: np.ndarray, expected: np.ndarray) -> float:
    """The largest absolute difference; infinite if either side holds a NaN or an infinity
    (NaN compares false with everything, so a plain max would let it pass)."""
    if not (np.isfinite(got).all() and np.isfinite(expected).all()):
        return math.inf
    return float(np.abs(got - expected).max())


class _Stage(nn.Module):
    """One module as a graph: ``x -> features``, or ``x -> logits`` with the final head."""

    def __init__(self, stage: nn.Module, head: nn.Module | None):
        super().__init__()
        self.stage, self.head = stage, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.stage(x, need_transport=False)
        return self.head(out) if self.head is not None else out


def _stage_input(info: ModelInfo, k: int) -> tuple[int, int, int]:
    plan = info.plans()[k]
    return (plan.in_channels, plan.in_size, plan.in_size)


def _metadata(info: ModelInfo, run_dir: Path) -> dict[str, str]:
    c, s = info.in_channels, info.image_size
    return {
        "edgetrain.input": f"float32 [batch, {c}, {s}, {s}], normalised per channel: "
                           "(pixel / 255 - mean) / std",
        "edgetrain.mean": json.dumps(list(info.mean)),
        "edgetrain.std": json.dumps(list(info.std)),
        "edgetrain.num_classes": str(info.num_classes),
        "edgetrain.dataset": info.dataset,
        "edgetrain.model": f"{info.model} widths {list(info.widths)}",
        "edgetrain.modules": json.dumps([list(m) for m in info.modules]),
        "edgetrain.exporter": f"{EXPORTER}, opset {OPSET}",
        "edgetrain.run": str(Path(run_dir).resolve().name),
    }
