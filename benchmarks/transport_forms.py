"""Step time of vanilla greedy against TRGL with each form of the transport penalty, timed
side by side in one process (issue 11).

    python benchmarks/transport_forms.py --out benchmarks/results/transport-forms-resnet56-k4

A shared machine's load drifts over minutes, so separate processes timed one after the other
compare the load as much as the methods. Here every module of the network exists three times
with the same weights (vanilla, TRGL "bn", TRGL "direct"), and each round times one
``greedy_step`` (forward, backward, SGD update: what `edgetrain fit` runs) of every module for
every method, in a rotating order, on the same batch. A method's step time is the sum over
modules of its median per module: one batch through the whole network, as in sequential mode.
Memory is not measured here (three copies share the process); `edgetrain profile` does that.

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

METHODS = {"vanilla": (math.inf, "bn"), "trgl-bn": (1.0, "bn"), "trgl-direct": (1.0, "direct")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/transport-forms-resnet56-k4"))
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--modules", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=28, help="Fashion-MNIST's 28x28")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after 1 warm-up)")
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

    times: dict[str, list[list[float]]] = {n: [[] for _ in plans] for n in METHODS}
    names = list(METHODS)
    for rnd in range(args.rounds + 1):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for k, (xk, copies) in enumerate(parts):
            for name in order:
                m, h, opt = copies[name]
                start = time.perf_counter()
                greedy_step(m, h, xk, y, METHODS[name][0], 0.0, opt)
                if rnd:  # round 0 warms up (first allocations, kernel selection)
                    times[name][k].append(time.perf_counter() - start)
        print(f"round {rnd}/{args.rounds}", flush=True)

    step = {n: sum(statistics.median(t) for t in times[n]) for n in names}
    results = {
        "spec": {**{k: v for k, v in vars(args).items() if k != "out"},
                 "torch": torch.__version__, "threads_used": torch.get_num_threads(),
                 "machine": platform.machine()},
        "step_time_s": step,
        "vs_vanilla": {n: step[n] / step["vanilla"] for n in names},
        "per_module_median_s": {n: [statistics.median(t) for t in times[n]] for n in names},
        "per_module_times_s": times,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| method | step time (one batch, all modules) | vs vanilla |\n|---|---|---|")
    for n in names:
        print(f"| {n} | {step[n]:.2f} s | {step[n] / step['vanilla']:.3f} |")


if __name__ == "__main__":
    main()
