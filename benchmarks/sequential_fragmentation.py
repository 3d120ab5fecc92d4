"""Why later sequential modules peak above their live tensors under tcmalloc (issue 11, item 3).

Trains module ``--module`` of ResNet-56 (batch 256, K = 4, the planner's memory split, TRGL) for
a few steps in this process, optionally after a few steps of earlier modules (``--before``), as
`edgetrain fit` does one module after the other, and prints each step's peak resident memory
above what the process held before the module was built (VmHWM, reset per step), plus the CPU
time and page faults of the module's steps. Run it under the policy to study:

    # tcmalloc, as sequential mode runs (the launcher preloads it for `edgetrain fit`):
    LD_PRELOAD=libtcmalloc_minimal.so.4 EDGETRAIN_ALLOC_POLICY=tcmalloc \\
        python benchmarks/sequential_fragmentation.py --module 2 --before 0 1
    LD_PRELOAD=libtcmalloc_minimal.so.4 EDGETRAIN_ALLOC_POLICY=tcmalloc \\
        python benchmarks/sequential_fragmentation.py --module 2           # fresh process
    # every step starting from released memory (tcmalloc's ReleaseFreeMemory / malloc_trim):
    ... --module 2 --before 0 1 --release-each-step
    # glibc with the 128 KiB mmap threshold:
    EDGETRAIN_ALLOC_POLICY=mmap-128k python benchmarks/sequential_fragmentation.py \
        --module 2 --before 0 1
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", type=int, default=2, help="0-based module to measure")
    parser.add_argument("--before", type=int, nargs="*", default=[],
                        help="modules trained (3 steps each) before it, in this process")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--release-each-step", action="store_true",
                        help="hand free memory back to the OS before every step")
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    import torch

    from edgetrain.memory import allocator

    state = allocator.apply("cpu", "sequential", False)
    torch.set_num_threads(1)
    from edgetrain.config import FitConfig
    from edgetrain.memory.costs import NetworkCosts
    from edgetrain.memory.layout import choose_split
    from edgetrain.memory.meter import MemoryMeter, current_rss_bytes, release_free_memory
    from edgetrain.models.families import network_spec
    from edgetrain.training.phase import Optim, Phase

    b, cpu = args.batch_size, torch.device("cpu")
    spec = network_spec(args.model, 1, 28, (16, 32, 64))
    costs = NetworkCosts.count(spec, 28, 10, need_transport=True)
    plans = choose_split(spec, costs, 4, 28, "memory", "dgl", b, False).plans(spec, 28)

    def build(k: int) -> Phase:
        return Phase.module(spec, plans[k], 10, cpu, Optim.of(FitConfig()), 100, 0.5, seed=k)

    def batch(k: int):
        plan = plans[k]
        return (torch.randn(b, plan.in_channels, plan.in_size, plan.in_size),
                torch.randint(0, 10, (b,)))

    for j in args.before:
        phase = build(j)
        for _ in range(3):
            phase.step(*batch(j), keep_output=False)
        del phase
    release_free_memory()
    base = current_rss_bytes()
    meter = MemoryMeter(cpu)
    phase = build(args.module)
    print(f"policy {state.policy} ({state.malloc}); module {args.module + 1} "
          f"(blocks {plans[args.module].start}-{plans[args.module].stop - 1}) after modules "
          f"{[j + 1 for j in args.before] or 'none'}; batch {b}")
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for step in range(args.steps):
        meter.reset(release=args.release_each_step)
        phase.step(*batch(args.module), keep_output=False)
        print(f"  step {step}: peak {(meter.read().peak_bytes - base) / MiB:6.1f} MiB above "
              "the start")
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(f"  wall {time.perf_counter() - start:.2f} s, user {after.ru_utime - before.ru_utime:.2f}"
          f" s, sys {after.ru_stime - before.ru_stime:.2f} s, minor faults "
          f"{after.ru_minflt - before.ru_minflt}")


if __name__ == "__main__":
    main()
