"""`edgetrain profile`: parse flags, call edgetrain.profiler.profile, print the table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgetrain.cli.output import console, out_of_space
from edgetrain.errors import UserInputError
from edgetrain.units import format_bytes


def profile(
    model: Annotated[str, typer.Option(
        help="Any fit --model: resnet8 ... resnet110, vgg11/16/19, vit-tiny/small, swin-tiny, "
             "tv-resnet18/34/50, tv-mobilenet_v2.")] = "resnet56",
    widths: Annotated[str, typer.Option(help="Channels per stage.")] = "16,32,64",
    dataset: Annotated[str, typer.Option(help="Dataset (as for fit).")] = "fashion-mnist",
    data_dir: Annotated[Path | None, typer.Option(help="Folder with dataset files.")] = None,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 256,
    modules: Annotated[int, typer.Option("--modules", "-K", help="K for greedy methods.")] = 4,
    split: Annotated[str, typer.Option(
        help="memory | even | balanced, as for fit (each variant trains the split fit would "
             "plan for it).")] = "memory",
    head: Annotated[str, typer.Option(help="dgl | light | auto, as for fit.")] = "dgl",
    steps: Annotated[int, typer.Option(help="Training steps measured per variant.")] = 3,
    transport_form: Annotated[str, typer.Option(
        help="bn | direct: how TRGL computes each block's mean(r^2). bn: from the block's last "
             "BatchNorm, keeping no activation; direct: from r, keeping it for backward (as "
             "before issue 11). Same numbers either way.")] = "bn",
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    only: Annotated[list[str] | None, typer.Option(
        help="Only these variants: e2e, e2e-ckpt, vanilla-seq, trgl-seq, vanilla-par, "
             "trgl-par, vanilla-seq-ckpt, trgl-seq-ckpt (module-wise with per-block "
             "recompute).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for profile.json and profile.png.")] = Path(
        "runs/profile"),
) -> None:
    """Peak memory of end-to-end, checkpointed, vanilla greedy and TRGL training, each in a
    clean subprocess, against end-to-end and the analytic floor."""
    from edgetrain.cli.fit import parse_widths as _widths
    from edgetrain.cli.output import fail as _fail
    from edgetrain.profiler.profile import ProfileSpec
    from edgetrain.profiler.profile import profile as run_profile

    try:
        _check(model, widths, dataset, data_dir, batch_size, modules, split, steps, device,
               threads, out, transport_form, head)
        spec = ProfileSpec(model=model, widths=_widths(widths), dataset=dataset,
                           data_dir=str(data_dir) if data_dir else None, batch_size=batch_size,
                           modules=modules, split=split, head=head, steps=steps, device=device,
                           threads=threads, transport_form=transport_form)
        data = run_profile(spec, out, only, on_result=lambda r: console.print(
            f"  {r['variant']}: peak {format_bytes(r['peak_bytes'])}"))
    except UserInputError as e:
        _fail(str(e), code=2)
    except OSError as e:
        if not out_of_space(e, str(out)):
            raise
    print_profile(data)
    console.print(f"written: {out / 'profile.json'}, {out / 'profile.png'}", markup=False)


def _check(model: str, widths: str, dataset: str, data_dir: Path | None, batch_size: int,
           modules: int, split: str, steps: int, device: str, threads: int | None,
           out: Path, transport_form: str, head: str = "dgl") -> None:
    """Everything that can be checked before the first subprocess starts: a mistake found by
    a worker costs a process start, and one found when profile.json is written, the whole
    profile."""
    from edgetrain.cli.fit import parse_widths as _widths
    from edgetrain.config import FitConfig
    from edgetrain.data import DATASET_NAMES
    from edgetrain.models.energy import TRANSPORT_FORMS

    problems = []
    for flag, value in (("--batch-size", batch_size), ("--steps", steps),
                        ("--modules", modules)):
        if value < 1:
            problems.append(f"{flag} must be at least 1 (got {value}).")
    if device not in ("cpu", "cuda"):
        problems.append(f"--device {device!r}: choose cpu or cuda.")
    if dataset not in DATASET_NAMES:
        problems.append(f"--dataset {dataset!r} is not known; choose one of "
                        f"{', '.join(DATASET_NAMES)}.")
    if transport_form not in TRANSPORT_FORMS:
        problems.append(f"--transport-form {transport_form!r} is not known; choose one of "
                        f"{', '.join(TRANSPORT_FORMS)}.")
    try:
        # The same rules as fit's for the flags the two commands share (model, widths, K
        # against the model's blocks, split, head, threads, paths).
        FitConfig(model=model, widths=_widths(widths), modules=max(modules, 1), split=split,
                  head=head, threads=threads, data_dir=data_dir, out=out).validate()
    except UserInputError as e:
        problems += e.problems
    from edgetrain.profiler.profile import profile_folder_problem

    if problem := profile_folder_problem(out):
        problems.append(problem)
    if problems:
        raise UserInputError(problems)
    from edgetrain.fit import resolve_device

    resolve_device(device)


def print_profile(data: dict) -> None:
    spec = data["spec"]
    table = Table(title=f"edgetrain profile: {spec['model']} on {spec['dataset']}, batch "
                        f"{spec['batch_size']}, K = {spec['modules']} ({spec.get('split', 'even')}"
                        f" split), TRGL penalty in the {spec.get('transport_form', 'bn')} form")
    for column in ("variant", "split", "peak (total)", "training-only", "vs e2e", "step time",
                   "analytic floor", "measured / floor", "tensor peak", "measured / tensors"):
        table.add_column(column, justify="right")
    for r in data["results"]:
        ratio = r.get("ratio_to_e2e")
        sizes = r.get("module_sizes")
        table.add_row(r["variant"], "|".join(map(str, sizes)) if sizes and r.get("modules")
                      else "-", format_bytes(r["peak_bytes"]),
                      format_bytes(r["training_only_bytes"]),
                      f"{ratio:.2f}" if ratio is not None else "-", f"{r['step_time_s']:.2f} s",
                      format_bytes(r["floor_bytes"]), f"{r['measured_over_floor']:.2f}",
                      format_bytes(r["tensor_peak_bytes"]),
                      f"{r['measured_over_tensor_peak']:.2f}")
    console.print(table)
    print_breakdown(data["results"])
    first = data["results"][0]
    console.print(f"framework baseline {format_bytes(first['framework_bytes'])}, data "
                  f"{format_bytes(first['data_bytes'])}; measured with: {first['meter']}. "
                  "training-only = peak - (framework + data). Tensor peak: the largest total of "
                  "live tensors in one step (torch's profiler).", markup=False)


BREAKDOWN = [  # (column, key in the worker's breakdown)
    ("state", "state_bytes"),
    ("input", "input_bytes"),
    ("saved", "saved_bytes"),
    ("recompute", "recompute_bytes"),
    ("head", "head_saved_bytes"),
    ("backward", "backward_and_temporaries_bytes"),
    ("allocator", "allocator_and_other_bytes"),
    ("before", "resident_before_phase_bytes"),
]


def print_breakdown(results: list[dict]) -> None:
    """Where each variant's peak phase went, from the counted floor up."""
    table = Table(title="where the peak goes (peak phase): weights+grads+momentum, input batch, "
                        "saved activations, recomputed block, head; then backward's gradients "
                        "and temporaries, allocator and other non-tensor memory, and what was "
                        "resident before the phase began (cost count, earlier phases)")
    table.add_column("variant")
    table.add_column("phase", justify="right")
    for column, _ in BREAKDOWN:
        table.add_column(column, justify="right")
    for r in results:
        parts = r.get("breakdown") or {}
        phase = f"module {r['peak_phase'] + 1}" if r.get("modules") and \
            r["mode"] == "sequential" else "all"
        table.add_row(r["variant"], phase, *(format_bytes(parts.get(key, 0))
                                              for _, key in BREAKDOWN))
    console.print(table)
