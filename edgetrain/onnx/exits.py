"""Early exits: every module has a trained head, so the network can stop after module K.

    edgetrain export RUN --exit-at 2        # modules 1-2 and head 2
    edgetrain export RUN --exit-at auto     # the smallest K within --exit-tolerance points of
                                            # the best head's test accuracy

Each exit is exported to ONNX and timed in onnxruntime (CPU, batch 1 and 64), and its accuracy
is measured on the run's test set by onnxruntime itself, so the table says what each exit
costs and gives. ``auto`` chooses on test accuracy (as the paper's "best over modules" does):
a choice made on the test set, said so in the table.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetrain.errors import UserInputError
from edgetrain.models.network import StitchedNetwork


@dataclass
class ExitRow:
    exit: int
    """1-based: modules 1..exit and head ``exit``."""
    parameters: int
    accuracy: float
    latency_ms_batch1: float
    latency_ms_batch64: float


def parse_exit(text: str | None, flag: str = "--exit-at") -> int | str | None:
    """``None``, ``"auto"`` or a positive module count.

    >>> parse_exit("auto"), parse_exit("3"), parse_exit(None)
    ('auto', 3, None)
    """
    if text is None or text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise UserInputError(f"{flag} {text!r} must be a module count (1, 2, ...) or auto.")
    return int(text)


def exit_network(run_dir: Path, k: int) -> StitchedNetwork:
    """Modules 1..k of the run and module k's own head, trained weights, eval mode."""
    from edgetrain.runs.model import load_module

    modules, head = [], None
    for i in range(k):
        module, head, _ = load_module(run_dir, i)
        modules.append(module)
    return StitchedNetwork(modules, head).eval()


def check_exit(exit_at: int | str, modules: int, method: str) -> None:
    if method == "e2e":
        raise UserInputError("--exit-at needs a module-wise run (--method trgl or vanilla): "
                             "an end-to-end run has no trained head per module.")
    if isinstance(exit_at, int) and exit_at > modules:
        raise UserInputError(f"--exit-at {exit_at} is out of range: the run has {modules} "
                             f"modules; choose 1 to {modules} or auto.")


def choose_exit(rows: list[ExitRow], tolerance_points: float) -> int:
    """The smallest exit within ``tolerance_points`` of the best exit's accuracy.

    >>> rows = [ExitRow(1, 10, 0.80, 0, 0), ExitRow(2, 20, 0.874, 0, 0), ExitRow(3, 30, .878, 0, 0)]
    >>> choose_exit(rows, 0.5), choose_exit(rows, 0.1)
    (2, 3)
    """
    best = max(r.accuracy for r in rows)
    return min(r.exit for r in rows if 100 * (best - r.accuracy) <= tolerance_points + 1e-9)


def measure_exits(run_dir: Path, num_modules: int, info, data) -> list[ExitRow]:
    """Every exit exported to a temporary ONNX graph, its accuracy on ``data.test`` and its
    median latency in onnxruntime (CPU) at batch 1 and 64."""
    import onnxruntime

    from edgetrain.data import iterate_batches, normalize
    from edgetrain.onnx.export import export_inference

    shape = (info.in_channels, info.image_size, info.image_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetrain-exits-") as tmp:
        for k in range(1, num_modules + 1):
            network = exit_network(run_dir, k)
            parameters = sum(p.numel() for p in network.parameters())
            path = Path(tmp) / f"exit_{k}.onnx"
            export_inference(network, shape, path, "logits", {}, f"exit {k}")
            del network  # one exit's weights at a time
            session = onnxruntime.InferenceSession(str(path),
                                                   providers=["CPUExecutionProvider"])
            correct = seen = 0
            for images, labels in iterate_batches(data.test, 256, shuffle=False):
                logits = session.run(None, {"input": normalize(images, data.info).numpy()})[0]
                correct += int((logits.argmax(1) == labels.numpy()).sum())
                seen += len(labels)
            rows.append(ExitRow(k, parameters, correct / max(seen, 1),
                                _latency_ms(session, (1, *shape)),
                                _latency_ms(session, (64, *shape))))
    return rows


def _latency_ms(session, shape: tuple[int, ...], repeats: int = 20) -> float:
    x = torch.randn(*shape).numpy()
    session.run(None, {"input": x})  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def exits_table(rows: list[ExitRow], chosen: int | None) -> list[str]:
    lines = ["exit | parameters | test accuracy (onnxruntime) | latency batch 1 | batch 64",
             "---|---|---|---|---"]
    for r in rows:
        mark = " (chosen)" if r.exit == chosen else ""
        lines.append(f"{r.exit}{mark} | {r.parameters:,} | {r.accuracy:.2%} | "
                     f"{r.latency_ms_batch1:.2f} ms | {r.latency_ms_batch64:.2f} ms")
    return lines


