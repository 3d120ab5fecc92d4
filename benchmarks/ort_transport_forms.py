"""Why edgetrain's ONNX training graphs keep the direct form of the transport penalty: peak
memory of ONNX Runtime training steps for one module with each form (issue 11).

    python benchmarks/ort_transport_forms.py --out benchmarks/results/ort-transport-forms

In torch the BatchNorm form costs nothing (edgetrain/models/energy.py: a custom autograd
Function reusing BatchNorm's statistics). An ONNX graph cannot hold that Function; written in
ONNX ops, the form computes the variance as ReduceMean((z - mean(z))^2), and ORT's gradient
builder keeps the centred z - mean(z) for backward and builds several z-sized broadcast
gradients (Expand) per block. This script exports module 1 of ResNet-20 (K = 4: the stem and 3
blocks on 28x28 images) with its head and TRGL loss, three ways, and trains a few steps of
each with ORT, every variant in its own process:

    vanilla   tau = infinity: no penalty in the graph
    direct    mean(r^2), what edgetrain exports
    bn-onnx   the BatchNorm form in ONNX ops (torch.var_mean of the BatchNorm input)

Peak = the process's peak resident set over the steps (VmHWM, reset after the session is
built), minus resident memory before the steps. Writes OUT/results.json, prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("vanilla", "direct", "bn-onnx")


def measure(variant: str, batch: int, steps: int, folder: Path) -> dict:
    """One variant, in this process."""
    import torch

    import edgetrain.models.resnet as resnet
    from edgetrain.memory.meter import MemoryMeter, current_rss_bytes, return_freed_memory_promptly
    from edgetrain.models.network import build_head, build_module
    from edgetrain.models.split import split_network
    from edgetrain.onnx.artifacts import build_training_artifacts
    from edgetrain.onnx.runtime import training_api

    return_freed_memory_promptly()
    if variant == "bn-onnx":
        def branch(bn, z, need_energy, form="bn"):
            r = bn(z)
            if not need_energy:
                return r, None
            var, _ = torch.var_mean(z, dim=[0, 2, 3], correction=0)
            return r, (bn.weight.pow(2) * var / (var + bn.eps) + bn.bias.pow(2)).mean()
        resnet.batchnorm_branch = branch

    ort = training_api("this benchmark")
    torch.manual_seed(0)
    spec = resnet.resnet_spec("resnet20", 1)
    plan = split_network(spec, 4, 28)[0]
    module, head = build_module(spec, plan), build_head(plan, 10)
    tau = math.inf if variant == "vanilla" else 1.0
    art = build_training_artifacts(module, head, (1, 28, 28), tau, 0.0, 5e-4, folder / variant)
    state = ort.CheckpointState.load_checkpoint(str(art.checkpoint))
    session = ort.Module(str(art.training_model), state)
    optimizer = ort.Optimizer(str(art.optimizer_model), session)
    session.train()
    x = torch.randn(batch, 1, 28, 28).numpy()
    y = torch.randint(0, 10, (batch,)).numpy()
    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    before = current_rss_bytes()
    times, transport = [], None
    for _ in range(steps):
        start = time.perf_counter()
        session.lazy_reset_grad()
        transport = float(session(x, y)[3])
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "batch_size": batch, "steps": steps,
            "training_peak_bytes": meter.read().peak_bytes - before,
            "transport": transport, "step_times_s": times,
            "ops": sorted({n.op_type for n in _load(art.training_model).graph.node})}


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ort-transport-forms"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the worker
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        print(json.dumps(measure(args.variant, args.batch_size, args.steps, args.out / "tmp")))
        return
    results = []
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--out",
                               str(args.out), "--batch-size", str(args.batch_size),
                               "--steps", str(args.steps)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import shutil

    shutil.rmtree(args.out / "tmp", ignore_errors=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    vanilla = results[0]["training_peak_bytes"]
    print("| graph | training peak | over vanilla | transport |\n|---|---|---|---|")
    for r in results:
        mib = r["training_peak_bytes"] / 2**20
        print(f"| {r['variant']} | {mib:.1f} MiB | "
              f"{(r['training_peak_bytes'] - vanilla) / 2**20:+.1f} MiB | {r['transport']:.6f} |")


if __name__ == "__main__":
    main()
