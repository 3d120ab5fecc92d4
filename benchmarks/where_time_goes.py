"""Where TRGL sequential's wall time goes against end to end (issue 16's ratio), three views:

1. ``--part fit``: ``cProfile`` over ``edgetrain.fit.fit`` for e2e and for TRGL sequential
   (ResNet-20, K = 4, 3,000 built-in images, batch 128, one thread), cumulative seconds in the
   training steps, the test evaluations, the cache passes and the auxiliary heads' forward.
   The profiler slows both alike; compare the two columns, not with other runs.
2. ``--part heads``: forward + backward of each module and of its auxiliary head (DGL and
   light) at the planner's split for that run (1/1/2/5 blocks), batch 128, milliseconds.
3. ``--part pool``: the light head's pool to 8x8, ``nn.AdaptiveAvgPool2d`` against the two
   matrix products it runs as now (edgetrain/models/pooling.py), forward + backward.

    python benchmarks/where_time_goes.py                 # all three, ~6 min on an idle core
    python benchmarks/where_time_goes.py --part heads pool

Wall-clock figures: run on an otherwise idle machine, and compare only within one run.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FIT = dict(model="resnet20", modules=4, batch_size=128, threads=1, train_limit=3000, seed=0)
PARTS = {  # each row: the cumulative time of one function of edgetrain (file, function)
    "training steps": ("edgetrain/training/phase.py", "step"),
    "test evaluations": ("edgetrain/training/steps.py", "evaluate"),
    "cache passes": ("edgetrain/training/scheduler.py", "cache_outputs"),
    "heads' forward": ("edgetrain/models/heads.py", "forward"),
}


def _ms(fn, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1000


def profile_fit(epochs: int) -> None:
    from edgetrain.config import FitConfig
    from edgetrain.fit import fit

    columns = {}
    for name, extra in (("e2e", dict(method="e2e")),
                        ("trgl-seq", dict(method="trgl", mode="sequential", cache="disk"))):
        out = Path(tempfile.mkdtemp()) / "run"
        config = FitConfig(epochs=epochs, out=out, **FIT, **extra)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        fit(config)
        profiler.disable()
        wall = time.perf_counter() - start
        shutil.rmtree(out.parent, ignore_errors=True)
        stats = pstats.Stats(profiler).stats
        row = {"whole fit": wall}
        for part, (path, wanted) in PARTS.items():
            row[part] = sum(value[3] for (file, _, function), value in stats.items()
                            if file.endswith(path) and function == wanted)
        columns[name] = row
    print(f"cProfile, {epochs} epochs ({FIT}): cumulative seconds")
    print(f"{'':<18} {'e2e':>9} {'trgl-seq':>9}")
    for part in columns["e2e"]:
        print(f"{part:<18} {columns['e2e'][part]:>9.1f} {columns['trgl-seq'][part]:>9.1f}")


def head_costs() -> None:
    from edgetrain.models.families import network_spec
    from edgetrain.models.network import build_head, build_module
    from edgetrain.models.split import plan_modules

    spec = network_spec("resnet20", 1, 28)
    torch.manual_seed(0)
    for kind in ("dgl", "light"):
        plans = plan_modules(spec, [1, 1, 2, 5], 28, [kind] * 4)
        x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
        row = []
        for plan in plans:
            module, head = build_module(spec, plan), build_head(plan, 10)
            out = module(x, need_transport=False)[0].detach()

            def module_step(module=module, x=x):
                module(x, need_transport=False)[0].sum().backward()

            def head_step(head=head, out=out, y=y):
                # The head's input needs a gradient, as in training (module k's output).
                F.cross_entropy(head(out.detach().requires_grad_(True)), y).backward()

            row.append(f"{_ms(module_step):.0f} / {_ms(head_step):.0f}")
            x = out
        print(f"{kind} heads, module / head forward+backward ms at batch 128, split 1/1/2/5: "
              + ", ".join(row))


def pool_costs() -> None:
    from edgetrain.models.pooling import MatrixAvgPool2d

    for channels, size in ((16, 28), (32, 14)):
        x = torch.randn(128, channels, size, size, requires_grad=True)
        matrix = MatrixAvgPool2d((8, 8), (size, size))
        adaptive = _ms(lambda x=x: F.adaptive_avg_pool2d(x, 8).sum().backward())
        products = _ms(lambda x=x, m=matrix: m(x).sum().backward())
        print(f"pool {channels}x{size}x{size} -> 8x8, batch 128, forward+backward: "
              f"nn.AdaptiveAvgPool2d {adaptive:.1f} ms, matrix products {products:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs="+", choices=["fit", "heads", "pool"],
                        default=["fit", "heads", "pool"])
    parser.add_argument("--epochs", type=int, default=4, help="for --part fit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "pool" in args.part:
        pool_costs()
    if "heads" in args.part:
        head_costs()
    if "fit" in args.part:
        profile_fit(args.epochs)


if __name__ == "__main__":
    main()
