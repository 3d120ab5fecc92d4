"""`edgetrain profile`: peak memory of each training method for one network, side by side.

Every variant runs in its own subprocess (edgetrain/profiler/worker.py), so each peak starts
from a clean process, and trains the split `edgetrain fit` would (the layout planner's, for
its method and checkpointing). The table sets each variant's training-only peak against
end-to-end's, and against its analytic floor: weights + gradients + optimizer state + saved
activations (counted with saved_tensors_hooks; with checkpointing, the block inputs and the
largest block's recomputed activations) + input batch of the largest module and its head
(edgetrain/memory/costs.py). The breakdown says where the rest goes: backward's gradients and
temporaries (measured tensor by tensor with torch's profiler), the allocator and other
non-tensor memory, and what earlier phases left resident.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from edgetrain.errors import UserInputError
from edgetrain.memory import allocator
from edgetrain.records import RecordError, read_json_object
from edgetrain.runs.files import write_figure_atomic, write_json_atomic
from edgetrain.runs.ownership import (
    PROFILE_KIND,
    PROFILE_LAYOUT,
    mark_folder,
    output_folder_problem,
)

VARIANTS = [  # (name, method, mode, per-block checkpointing)
    ("e2e", "e2e", "sequential", False),
    ("e2e-ckpt", "e2e-ckpt", "sequential", True),
    ("vanilla-seq", "vanilla", "sequential", False),
    ("trgl-seq", "trgl", "sequential", False),
    ("vanilla-par", "vanilla", "parallel", False),
    ("trgl-par", "trgl", "parallel", False),
    # Module-wise plus recompute: the smallest configuration edgetrain has.
    ("vanilla-seq-ckpt", "vanilla", "sequential", True),
    ("trgl-seq-ckpt", "trgl", "sequential", True),
]


@dataclass(frozen=True)
class ProfileSpec:
    model: str = "resnet56"
    widths: tuple[int, ...] = (16, 32, 64)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_limit: int | None = None
    batch_size: int = 256
    modules: int = 4
    split: str = "memory"
    head: str = "dgl"
    steps: int = 3
    tau: float = 1.0
    transport_form: str = "bn"
    """How TRGL's blocks compute mean(r^2): "bn" (from the last BatchNorm, no activation kept)
    or "direct" (keeps each block's residue; edgetrain's only form before issue 11)."""
    device: str = "cpu"
    threads: int | None = None


def run_variant(spec: ProfileSpec, name: str, method: str, mode: str,
                checkpointing: bool = False) -> dict:
    payload = json.dumps({**asdict(spec), "variant": name, "method": method, "mode": mode,
                          "checkpointing": checkpointing})
    # The worker runs under the allocation policy `edgetrain fit` runs under (its malloc
    # preloaded where installed): the same peaks as training, not another allocator's.
    proc = subprocess.run([sys.executable, "-m", "edgetrain.profiler.worker", payload],
                          capture_output=True, text=True,
                          env=allocator.child_env(None if method.startswith("e2e") else mode,
                                                  spec.device, checkpointing))
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise UserInputError(f"profiling {name} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_ratios(results: list[dict], modules: int) -> None:
    """Each variant against end-to-end (and its checkpointed form), its floor, its tensor-level
    peak, and the issue's goals."""
    by_name = {r["variant"]: r for r in results}
    e2e, ckpt = by_name.get("e2e"), by_name.get("e2e-ckpt")
    for r in results:
        r["ratio_to_e2e"] = (r["training_only_bytes"] / e2e["training_only_bytes"]
                             if e2e and e2e["training_only_bytes"] else None)
        r["ratio_to_e2e_ckpt"] = (r["training_only_bytes"] / ckpt["training_only_bytes"]
                                  if ckpt and ckpt["training_only_bytes"] else None)
        r["measured_over_floor"] = r["training_only_bytes"] / r["floor_bytes"]
        r["measured_over_tensor_peak"] = r["training_only_bytes"] / r["tensor_peak_bytes"]
        r["goal_within_15pct_of_floor"] = r["measured_over_floor"] <= 1.15
        if e2e and r["method"] in ("vanilla", "trgl") and r["mode"] == "sequential" \
                and not r.get("checkpointing"):
            target = {4: 0.30, 8: 0.17}.get(modules)
            if target is not None and r["ratio_to_e2e"] is not None:
                r["goal_ratio_to_e2e"] = {"target": target, "met": r["ratio_to_e2e"] <= target}
    for name in ("trgl-seq", "trgl-par", "trgl-seq-ckpt"):
        trgl, vanilla = by_name.get(name), by_name.get(name.replace("trgl", "vanilla"))
        if trgl and vanilla:
            ratio = trgl["training_only_bytes"] / vanilla["training_only_bytes"]
            trgl["ratio_to_vanilla"] = ratio
            trgl["goal_within_2pct_of_vanilla"] = ratio <= 1.02
    for name in ("vanilla-seq-ckpt", "trgl-seq-ckpt"):
        if (r := by_name.get(name)) and r["ratio_to_e2e_ckpt"] is not None:
            r["goal_half_of_e2e_ckpt"] = r["ratio_to_e2e_ckpt"] <= 0.5


def profile_folder_problem(out: Path) -> str | None:
    """Why `profile --out` cannot write profile.json and profile.png to ``out`` (a folder of
    the user's), or None."""
    def written_before_markers(folder: Path) -> bool:
        try:
            data = read_json_object(folder / "profile.json")
        except RecordError:
            return False
        return isinstance(data.get("spec"), dict) and isinstance(data.get("results"), list)

    return output_folder_problem("--out", out, PROFILE_KIND, PROFILE_LAYOUT,
                                 written_before_markers)


def profile(spec: ProfileSpec, out: Path, variants: list[str] | None = None,
            on_result=None) -> dict:
    """Run the variants, write ``out/profile.json`` and ``out/profile.png``; return the data.
    ``out`` must be new, empty or an earlier profile's folder: nothing of the user's is
    replaced."""
    if problem := profile_folder_problem(out):
        raise UserInputError(problem)
    from edgetrain.models.catalog import model_problems

    if problems := model_problems(spec.model, spec.widths):  # before any subprocess
        raise UserInputError(problems)
    if variants:
        unknown = sorted(set(variants) - {v[0] for v in VARIANTS})
        if unknown:
            raise UserInputError(f"--only {', '.join(unknown)}: not a variant; choose from "
                                 f"{', '.join(v[0] for v in VARIANTS)}.")
    results = []
    for name, method, mode, checkpointing in VARIANTS:
        if variants and name not in variants:
            continue
        results.append(run_variant(spec, name, method, mode, checkpointing))
        if on_result:
            on_result(results[-1])
    add_ratios(results, spec.modules)
    data = {"spec": asdict(spec), "results": results}
    if problem := profile_folder_problem(out):  # again: the variants took a while
        raise UserInputError(problem)
    mark_folder(out, PROFILE_KIND)
    write_json_atomic(out / "profile.json", data)
    plot(data, out / "profile.png")
    return data


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    names = [r["variant"] for r in results]
    mib = 2**20
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(names, [r["training_only_bytes"] / mib for r in results], color="#4c72b0",
           label="measured training-only peak")
    ax.scatter(names, [r["floor_bytes"] / mib for r in results], color="#dd8452", zorder=3,
               marker="_", s=600, linewidths=3, label="analytic floor")
    spec = data["spec"]
    ax.scatter(names, [r["tensor_peak_bytes"] / mib for r in results], color="#55a868",
               zorder=3, marker="_", s=600, linewidths=2, label="tensor-level peak")
    ax.set_title(f"{spec['model']}, {spec['dataset']}, batch {spec['batch_size']}, "
                 f"K = {spec['modules']} ({spec.get('split', 'even')} split)")
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_ylabel("MiB above framework + data")
    ax.legend()
    fig.tight_layout()
    write_figure_atomic(fig, path)
    plt.close(fig)
