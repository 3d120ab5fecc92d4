"""Accuracy and wall time of e2e, vanilla greedy and TRGL, sequential and parallel, with the
disk cache on and off: issue 2's comparison.

Each configuration runs `edgetrain fit` in its own subprocess (clean memory peaks, no state
shared between runs) and its report.json is collected. Finished runs are skipped when the
script is rerun with the same --out, so an interrupted benchmark resumes.

    python benchmarks/methods.py --out benchmarks/results/methods-fmnist   # full Fashion-MNIST
    python benchmarks/methods.py --quick --out /tmp/methods-quick          # minutes, subset

Writes OUT/results.json (one object per configuration) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIGS = {
    "e2e": ["--method", "e2e"],
    "vanilla-seq-disk": ["--method", "vanilla", "--mode", "sequential", "--cache", "disk"],
    "trgl-seq-disk": ["--method", "trgl", "--mode", "sequential", "--cache", "disk"],
    "trgl-seq-none": ["--method", "trgl", "--mode", "sequential", "--cache", "none"],
    "vanilla-par": ["--method", "vanilla", "--mode", "parallel"],
    "trgl-par": ["--method", "trgl", "--mode", "parallel"],
    # Not in the default set (time on 2 cores); run them with --only.
    "vanilla-seq-none": ["--method", "vanilla", "--mode", "sequential", "--cache", "none"],
    "trgl-seq-disk-4views": ["--method", "trgl", "--mode", "sequential", "--cache", "disk",
                             "--cache-views", "4"],
}
# In order of what the comparison needs most: the three methods, then parallel mode, then what
# the disk cache costs in accuracy.
DEFAULT = ["e2e", "vanilla-seq-disk", "trgl-seq-disk", "trgl-par", "trgl-seq-none",
           "vanilla-par"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/methods-fmnist"))
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--modules", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run these configs")
    parser.add_argument("--quick", action="store_true",
                        help="2,000-image subset of the built-in set, 1 epoch: a smoke test")
    args = parser.parse_args()

    common = ["--model", args.model, "--modules", str(args.modules), "--epochs",
              str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--tau", str(args.tau), "--seed", str(args.seed), "--dataset", args.dataset,
              "--no-progress"]
    if args.quick:
        common += ["--dataset", "fashion-mnist-mini", "--train-limit", "2000", "--test-limit",
                   "1000", "--epochs", "1"]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.only or DEFAULT:
        run_dir = args.out / "runs" / name
        report_path = run_dir / "report.json"
        if report_path.exists():
            print(f"{name}: done before, skipped", flush=True)
        else:
            cmd = [sys.executable, "-m", "edgetrain", "fit", *common, *CONFIGS[name],
                   "--out", str(run_dir), "--overwrite"]
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[2:])}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{name} failed with exit code {proc.returncode}")
        report = json.loads(report_path.read_text())
        results.append({"name": name, "command": f"edgetrain fit {' '.join(common)} "
                                                 f"{' '.join(CONFIGS[name])}",
                        **{k: report[k] for k in (
                            "method", "mode", "cache", "cache_views", "test_accuracy",
                            "wall_time_s", "peak_memory_bytes", "train_peak_memory_bytes",
                            "framework_baseline_bytes", "epochs", "num_modules", "dataset",
                            "train_samples", "test_samples", "device_name", "torch_version")},
                        "aux_test_accuracy": [m["aux_test_accuracy"] for m in report["modules"]]})
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpu_count": torch.get_num_threads(), "torch": torch.__version__}
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "runs": results},
                                                      indent=2) + "\n")
    print(markdown_table(results))


def markdown_table(results: list[dict]) -> str:
    e2e = next((r for r in results if r["method"] == "e2e"), None)
    lines = ["| run | test acc | vs e2e (points) | aux acc per module | wall time | "
             "peak memory (training) |", "|---|---|---|---|---|---|"]
    for r in results:
        delta = (f"{100 * (r['test_accuracy'] - e2e['test_accuracy']):+.2f}"
                 if e2e and r is not e2e else "")
        aux = " / ".join(f"{100 * a:.1f}" for a in r["aux_test_accuracy"] if a is not None)
        lines.append(f"| {r['name']} | {100 * r['test_accuracy']:.2f}% | {delta} | {aux} | "
                     f"{r['wall_time_s']:.0f} s | "
                     f"{r['train_peak_memory_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
