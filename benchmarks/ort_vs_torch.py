"""The same TRGL run trained with torch autograd and with ONNX Runtime's training API
(`edgetrain fit --backend torch|ort`): accuracy, wall time and peak memory side by side.

Each backend runs `edgetrain fit` in its own subprocess (clean memory peaks, no state shared
between runs) and its report.json is collected. Finished runs are skipped when the script is
rerun with the same --out, so an interrupted benchmark resumes.

    python benchmarks/ort_vs_torch.py --out benchmarks/results/ort-vs-torch-fmnist  # full set
    python benchmarks/ort_vs_torch.py --quick --out /tmp/ort-quick                 # minutes

Defaults: Fashion-MNIST (60,000/10,000, Debian's dataset-fashion-mnist), ResNet-20, K = 4,
sequential TRGL with the disk cache, 3 epochs per module. The ORT backend uses ORT's plain SGD
with a learning rate that stands in for torch's momentum (edgetrain/onnx/schedule.py), so the
two agree in accuracy, not step by step.

Writes OUT/results.json (one object per backend) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

BACKENDS = {"torch": ["--backend", "torch"], "ort": ["--backend", "ort"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ort-vs-torch-fmnist"))
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--modules", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both")
    parser.add_argument("--only", nargs="*", choices=list(BACKENDS), help="run these backends")
    parser.add_argument("--quick", action="store_true",
                        help="2,000-image subset of the built-in set, 1 epoch: a smoke test")
    args = parser.parse_args()

    common = ["--dataset", args.dataset, "--model", args.model, "--modules", str(args.modules),
              "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--tau", str(args.tau), "--seed", str(args.seed),
              "--method", "trgl", "--mode", "sequential", "--cache", "disk", "--no-progress"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.quick:  # later flags win in typer: these override the ones above
        common += ["--dataset", "fashion-mnist-mini", "--train-limit", "2000", "--test-limit",
                   "1000", "--epochs", "1"]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.only or list(BACKENDS):
        run_dir = args.out / "runs" / name
        report_path = run_dir / "report.json"
        if not report_path.exists():
            cmd = [sys.executable, "-m", "edgetrain", "fit", *common, *BACKENDS[name],
                   "--out", str(run_dir), "--overwrite"]
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[2:])}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{name} failed with exit code {proc.returncode}")
        report = json.loads(report_path.read_text())
        results.append({"name": name, "command": f"edgetrain fit {' '.join(common)} "
                                                 f"{' '.join(BACKENDS[name])}",
                        **{k: report[k] for k in (
                            "test_accuracy", "wall_time_s", "peak_memory_bytes",
                            "train_peak_memory_bytes", "framework_baseline_bytes", "epochs",
                            "num_modules", "dataset", "model", "train_samples", "test_samples",
                            "device_name", "torch_version")},
                        "train_time_s": sum(m["train_time_s"] for m in report["modules"]),
                        "aux_test_accuracy": [m["aux_test_accuracy"] for m in report["modules"]]})
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
               "onnxruntime": _version("onnxruntime-training-cpu") or _version("onnxruntime"),
               "onnx": _version("onnx")}
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "runs": results},
                                                      indent=2) + "\n")
    print(markdown_table(results))


def markdown_table(results: list[dict]) -> str:
    base = next((r for r in results if r["name"] == "torch"), None)
    lines = ["| backend | test acc | vs torch (points) | aux acc per module | wall time | "
             "train time | peak memory (training) | framework baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        delta = (f"{100 * (r['test_accuracy'] - base['test_accuracy']):+.2f}"
                 if base and r is not base else "")
        aux = " / ".join(f"{100 * a:.1f}" for a in r["aux_test_accuracy"] if a is not None)
        lines.append(f"| {r['name']} | {100 * r['test_accuracy']:.2f}% | {delta} | {aux} | "
                     f"{r['wall_time_s']:.0f} s | {r['train_time_s']:.0f} s | "
                     f"{r['train_peak_memory_bytes'] / 2**20:.0f} MiB | "
                     f"{r['framework_baseline_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
