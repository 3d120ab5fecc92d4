"""Throughput of `edgetrain fit --distributed` against single-process parallel mode (issue 15,
"Measured"): images per second and test accuracy of the same training, laid out as

    single-kK     one process, --mode parallel --modules K, --threads CORES
    pipe-kK       K ranks (torchrun), one module each, --threads CORES/K (at least 1)
    rep-kKrR      K x R ranks: the K-stage pipeline with R data-parallel replicas per stage
    sseq-kK       one process, --mode sequential --modules K (disk cache)
    seq-kKrR      R ranks, --mode sequential: each module in turn on all R, data-parallel

Every run is `edgetrain fit` in fresh processes, on the loopback interface (gloo). The machine
is shared and noisy, so layouts are interleaved round-robin over --rounds after one unrecorded
warm-up of the first layout, and the table shows medians, with the load average seen.

images/s is training samples x epochs / the run's wall time from report.json (training and
the per-epoch evaluations, not process start-up: the pipeline's time waiting on other ranks
is in it). The distributed report also has each rank's own numbers: ``ranks[*].compute_s``
(the stage's own work: the slowest stage bounds the pipeline) and ``communication_wait_s``.

    python benchmarks/distributed_throughput.py                 # ResNet-20, full Fashion-MNIST
    python benchmarks/distributed_throughput.py --quick         # checks the script: ~1 min

Writes OUT/results.json (every run, the medians, each rank's times) and OUT/results.md (the
table) after every run, so an interrupted benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def layouts(spec: list[str]) -> dict[str, tuple[int, int, int, str]]:
    """``single-k4 pipe-k2 rep-k2r2 seq-k4r2`` -> {name: (modules, processes, replicas,
    mode)}."""
    found = {}
    for name in spec:
        kind, _, rest = name.partition("-k")
        modules, _, replicas = rest.partition("r")
        try:
            k, r = int(modules), int(replicas or 1)
        except ValueError:
            k = r = 0
        if kind not in ("single", "pipe", "rep", "sseq", "seq") or k < 1 or r < 1 \
                or (kind not in ("rep", "seq") and replicas):
            raise SystemExit(f"--layouts: {name!r} is not single-kK, pipe-kK, rep-kKrR, "
                             "sseq-kK or seq-kKrR")
        mode = "sequential" if kind in ("sseq", "seq") else "parallel"
        processes = {"single": 1, "sseq": 1, "pipe": k, "rep": k * r, "seq": r}[kind]
        found[name] = (k, processes, r, mode)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/distributed-throughput"))
    parser.add_argument("--layouts", nargs="+",
                        default=["single-k2", "pipe-k2", "single-k4", "pipe-k4", "rep-k1r2"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded runs")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="threads shared out among a run's processes")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="resnet8 on 512 built-in images, 1 epoch, 1 round: checks the "
                             "script only")
    args = parser.parse_args()
    if args.quick:
        args.model, args.dataset, args.epochs, args.rounds, args.warmup = \
            "resnet8", "fashion-mnist-mini", 1, 1, 0
        args.train_limit, args.test_limit = 512, 256
    chosen = layouts(args.layouts)

    common = ["--model", args.model, "--dataset", args.dataset,
              "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--seed", "0", "--no-progress"]
    for flag, value in (("--train-limit", args.train_limit), ("--test-limit", args.test_limit)):
        if value:
            common += [flag, str(value)]
    meta = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "fit_flags": common,
            "layouts": {n: dict(zip(("modules", "processes", "replicas", "mode"), v))
                        for n, v in chosen.items()},
            "cores": args.cores, "in_flight": args.in_flight, "rounds": args.rounds,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    first = next(iter(chosen))
    for _ in range(args.warmup):
        run = measure(first, chosen[first], common, args)
        print(f"warm-up {first}: {run['wall_s']:.1f} s", flush=True)
    for r in range(args.rounds):
        for name, layout in chosen.items():
            run = {"round": r, **measure(name, layout, common, args)}
            runs.append(run)
            print(f"round {r + 1}/{args.rounds} {name:<10} {run['images_per_s']:7.1f} img/s  "
                  f"acc {run['test_accuracy']:.4f}  wall {run['wall_s']:6.1f} s  "
                  f"load {run['loadavg_before'][0]:.2f}", flush=True)
            write(args.out, meta, runs)
    print(write(args.out, meta, runs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, layout: tuple[int, int, int, str], common: list[str], args) -> dict:
    """One run of ``layout`` in fresh processes: its report's throughput and accuracy."""
    modules, processes, replicas, mode = layout
    threads = max(1, args.cores // processes)
    out = Path(tempfile.mkdtemp(prefix="dist-throughput-"))
    flags = [*common, "--mode", mode, "--modules", str(modules), "--threads", str(threads),
             "--out", str(out / "run")]
    if mode == "sequential":
        flags += ["--cache", "disk"]
    if processes == 1:
        cmd = [sys.executable, "-m", "edgetrain", "fit", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
               str(processes), "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "edgetrain", "fit", *flags, "--distributed", "--replicas", str(replicas)]
        if mode == "parallel":
            cmd += ["--in-flight", str(args.in_flight)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p)}
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    report = json.loads((out / "run" / "report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    images = report["train_samples"] * report["epochs"]
    ranks = (report.get("distributed") or {}).get("ranks", [])
    return {"layout": name, "modules": modules, "processes": processes, "replicas": replicas,
            "mode": mode,
            "threads_per_process": threads, "elapsed_s": round(elapsed, 2),
            "wall_s": report["wall_time_s"],
            "images_per_s": round(images / report["wall_time_s"], 1),
            "test_accuracy": report["test_accuracy"],
            "peak_memory_bytes": report["peak_memory_bytes"],
            "loadavg_before": load_before,
            "ranks": [{k: r.get(k) for k in ("rank", "stage", "replica", "compute_s",
                                             "allreduce_s", "grad_allreduce_s",
                                             "recv_wait_s", "send_wait_s",
                                             "sync_s", "eval_s", "communication_wait_s",
                                             "images_per_s", "peak_memory_bytes")}
                      for r in ranks]}


def write(out: Path, meta: dict, runs: list[dict]) -> str:
    """results.json and results.md; returns the table."""
    rows = []
    for name in meta["layouts"]:
        mine = [r for r in runs if r["layout"] == name]
        if not mine:
            continue
        ips = statistics.median(r["images_per_s"] for r in mine)
        slowest = [max((x["compute_s"] for x in r["ranks"]), default=None) for r in mine]
        rows.append({"layout": name, **meta["layouts"][name], "runs": len(mine),
                     "images_per_s": ips,
                     "test_accuracy": statistics.median(r["test_accuracy"] for r in mine),
                     "slowest_stage_compute_s": statistics.median(slowest)
                     if None not in slowest else None,
                     "peak_mib": statistics.median(r["peak_memory_bytes"] for r in mine) / 2**20})
    # Against one process training the same split (same --modules) in the same mode.
    single = {(r["modules"], r["mode"]): r["images_per_s"] for r in rows if r["processes"] == 1}
    lines = ["| layout | mode | modules | processes | replicas | images/s | vs one process | "
             "test acc | slowest stage compute (s) | peak per rank (MiB) |", "|" + "---|" * 10]
    for r in rows:
        base = single.get((r["modules"], r["mode"]))
        speed = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        compute = f"{r['slowest_stage_compute_s']:.1f}" \
            if r["slowest_stage_compute_s"] is not None else "-"
        lines.append(f"| {r['layout']} | {r['mode']} | {r['modules']} | {r['processes']} | "
                     f"{r['replicas']} | "
                     f"{r['images_per_s']:.1f} | {speed} | {r['test_accuracy']:.4f} | "
                     f"{compute} | {r['peak_mib']:.0f} |")
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps({**meta, "medians": rows, "runs": runs},
                                                 indent=2))
    (out / "results.md").write_text(
        f"# {meta['command']}\n\n{meta['started']}, {meta['machine']['cpu']} "
        f"({meta['cores']} cores used), flags: {' '.join(meta['fit_flags'])}\n\n{table}\n")
    return table


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}


if __name__ == "__main__":
    main()
