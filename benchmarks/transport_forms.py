"""Step time of vanilla greedy against TRGL with each form of the transport penalty, timed
side by side in one process (issue 11).

    python benchmarks/transport_forms.py --threads 1 --rounds 25
    # -> benchmarks/results/transport-forms-resnet56-k4-threads1/results.json

A shared machine's load drifts over minutes, so separate processes timed one after the other
compare the load as much as the methods. Here every module of the network exists four times
with the same weights (vanilla, TRGL "bn", TRGL "direct", and vanilla again as a control),
and each round times one ``greedy_step`` (forward, backward, SGD update: what `edgetrain fit`
runs) of every module for every method, in a rotating order, on the same batch. A method's
step time is the sum over modules of its time per module: one batch through the whole network,
as in sequential mode.
Both the median and the minimum over rounds are reported: on a machine other jobs share, the
minimum is the closest to the uncontended cost, the median says what a loaded run sees. Each
step is timed twice: wall clock, and the process's CPU time (``time.process_time``), which
other jobs inflate much less; with ``--threads 1`` the CPU time is the cost of one core's work.
Memory is not measured here (four copies share the process); `edgetrain profile` does that.

Writes OUT/results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from edgetrain.models.network import build_head, build_module, set_transport_form
from edgetrain.models.resnet import resnet_spec
from edgetrain.models.split import split_network
from edgetrain.training.sgd import SGD
from edgetrain.training.steps import greedy_step

# "vanilla-again" is a second, identical vanilla copy: its ratio to vanilla is the noise of the
# measurement, to read the other ratios against.
METHODS = {"vanilla": (math.inf, "bn"), "trgl-bn": (1.0, "bn"), "trgl-direct": (1.0, "direct"),
           "vanilla-again": (math.inf, "bn")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/transport-forms-resnet56-k4-threads1"))
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--modules", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=28, help="Fashion-MNIST's 28x28")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    spec = resnet_spec(args.model, 1)
    plans = split_network(spec, args.modules, args.image_size)
    b = args.batch_size
    y = torch.randint(0, 10, (b,))
    parts = []  # per module: its input batch and one (module, head, opt) per method
    x = torch.randn(b, 1, args.image_size, args.image_size)
    for plan in plans:
        module, head = build_module(spec, plan), build_head(plan, 10)
        copies = {}
        for name, (_, form) in METHODS.items():
            m, h = copy.deepcopy(module), copy.deepcopy(head)
            set_transport_form(m, form)
            copies[name] = (m, h, SGD([*m.parameters(), *h.parameters()], 1e-3, 0.9, 5e-4))
        parts.append((x, copies))
        with torch.no_grad():
            x = module.eval()(x, need_transport=False)[0]

    names = list(METHODS)
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {c: {n: [[] for _ in plans] for n in names} for c in clocks}
    for rnd in range(args.rounds + 1):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for k, (xk, copies) in enumerate(parts):
            for name in order:
                m, h, opt = copies[name]
                start = {c: clock() for c, clock in clocks.items()}
                greedy_step(m, h, xk, y, METHODS[name][0], 0.0, opt)
                if rnd:  # round 0 warms up (first allocations, kernel selection)
                    for c, clock in clocks.items():
                        times[c][name][k].append(clock() - start[c])
        print(f"round {rnd}/{args.rounds}", flush=True)

    summary = {}
    for c in clocks:
        for stat, fn in (("min", min), ("median", statistics.median)):
            step = {n: sum(fn(t) for t in times[c][n]) for n in names}
            summary[f"{c}_{stat}"] = {"step_time_s": step,
                                      "vs_vanilla": {n: step[n] / step["vanilla"]
                                                     for n in names}}
    results = {
        "spec": {**{k: v for k, v in vars(args).items() if k != "out"},
                 "torch": torch.__version__, "threads_used": torch.get_num_threads(),
                 "machine": platform.machine()},
        "summary": summary,
        "per_module_times_s": times,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| method | " + " | ".join(f"{key.replace('_', ' ')} (vs vanilla)" for key in summary)
          + " |\n|---|" + "---|" * len(summary))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{v['step_time_s'][n]:.3f} s ({v['vs_vanilla'][n]:.3f})"
                                        for v in summary.values()) + " |")


if __name__ == "__main__":
    main()
