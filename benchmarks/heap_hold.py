"""What holding tcmalloc's heap to a budget does, in one small real process (README, *The hold*).

Ten 4 MiB buffers are made between small long-lived ones and freed: 40 MiB of free holes that a
40 MiB buffer fits in none of. Held to a budget of 64 MiB over what the process has at the start
(edgetrain/memory/allocator.py, ``hold_heap_to``), tcmalloc gives the holes back to the OS before
it takes fresh pages for the 40 MiB buffer; unheld it takes both. Then 100 MiB more is asked for:
refused under the hold ("can't allocate memory"), where unheld the process would go over. Prints
one JSON line: the limit set, the peak resident set above the start (VmHWM), the refusal.

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
    python benchmarks/heap_hold.py; python benchmarks/heap_hold.py --no-hold

Measured on this project's 2-core x86 machine: peak 44 MiB held, 84 MiB unheld.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgetrain.memory import allocator, meter  # noqa: E402

MiB = 2**20


def touch(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(1.0)  # resident, not just reserved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", action=argparse.BooleanOptionalAction, default=True)
    hold = parser.parse_args().hold
    peak_meter = meter.MemoryMeter(torch.device("cpu"))
    peak_meter.reset()  # freed memory given back, the peak (VmHWM) restarted from here
    start = meter.current_rss_bytes()
    held = allocator.hold_heap_to(start + 64 * MiB, start) if hold else None
    keep, holes = [], []
    for _ in range(10):
        holes.append(touch(torch.empty(MiB)))          # 4 MiB of float32
        keep.append(touch(torch.empty(64 * 1024)))     # 256 KiB, kept
    del holes
    big = touch(torch.empty(10 * MiB))                 # 40 MiB: fits in no hole
    peak = peak_meter.read().peak_bytes - start
    try:
        touch(torch.empty(25 * MiB))                   # 100 MiB: over what the budget leaves
        refused = None
    except RuntimeError as e:
        refused = str(e)
    allocator.hold_heap_to(None, 0)
    touch(torch.empty(25 * MiB))                       # lifted: fits again
    del big, keep
    print(json.dumps({"held": held, "peak": peak, "refused": refused,
                      "malloc": allocator.active_malloc()}))


if __name__ == "__main__":
    main()
