"""Epoch checkpoints: what a killed run needs to continue exactly where it stopped.

A checkpoint holds the weights (BatchNorm statistics included) of what is being trained, each
optimizer's momentum buffers, and, as metadata, the last finished epoch and the schedule's
step count. Data order and augmentation are seeded per module and epoch, so a run resumed from
epoch e draws the same batches as one that never stopped. Files are safetensors written under
a temporary name and renamed, with a checksum of every tensor: a kill mid-write leaves the
previous checkpoint intact, and a damaged one is found (:class:`CheckpointDamagedError`) before
any of it is loaded, so the caller can start that phase again instead of training on garbage.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from edgetrain.runs.weights import (
    RUN_ID_KEY,
    WeightsCorruptError,
    load_weights,
    read_metadata,
    save_weights,
)
from edgetrain.training.sgd import SGD, LRSchedule


class CheckpointDamagedError(Exception):
    """The checkpoint is unreadable, altered, or does not describe this phase."""


def save_checkpoint(path: Path, epoch: int, parts: dict[str, nn.Module],
                    optimizers: dict[str, tuple[SGD, LRSchedule]],
                    run_id: str | None = None) -> None:
    state = {}
    for name, part in parts.items():
        state.update({f"{name}.{k}": v for k, v in part.state_dict().items()})
    # Never checkpoint a diverged state: resuming from it could only diverge again.
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteWeightsError(bad)
    steps = {}
    for name, (opt, sched) in optimizers.items():
        state.update({f"{name}.{k}": v for k, v in opt.state_dict().items()})
        steps[name] = sched.step_count
    meta = {"epoch": epoch, "schedule_steps": json.dumps(steps)}
    if run_id is not None:
        meta[RUN_ID_KEY] = run_id
    save_weights(path, state, meta)


class NonFiniteWeightsError(ValueError):
    """Weights became NaN or infinite although the loss was finite."""

    def __init__(self, names: list[str]):
        super().__init__(f"non-finite values in {', '.join(names[:3])}"
                         + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
        self.names = names


def load_checkpoint(path: Path, parts: dict[str, nn.Module],
                    optimizers: dict[str, tuple[SGD, LRSchedule]], device,
                    epochs: int, run_id: str | None = None) -> int:
    """Restore ``parts`` and ``optimizers`` in place; return the last finished epoch.

    Everything is checked before anything is restored: the checksum, the metadata (an epoch in
    ``0..epochs-1``, one integer schedule position per optimizer, within its schedule; with
    ``run_id``, written by that run: another run's checkpoint is not this one's) and that
    every tensor a part or optimizer needs is there with its shape. Raises
    CheckpointDamagedError otherwise, and nothing has been changed.
    """
    try:
        meta = read_metadata(path)
        state = load_weights(path, device, require_checksum=True)
    except WeightsCorruptError as e:
        raise CheckpointDamagedError(str(e)) from None
    if run_id is not None and meta.get(RUN_ID_KEY) != run_id:
        raise CheckpointDamagedError(f"it was written by another run (run id "
                                     f"{meta.get(RUN_ID_KEY) or 'none'}; this run's is {run_id})")
    epoch = _int(meta.get("epoch"), 0, epochs - 1, "epoch")
    try:
        steps = json.loads(meta.get("schedule_steps", ""))
    except json.JSONDecodeError:
        raise CheckpointDamagedError("its schedule_steps metadata is not JSON") from None
    if not isinstance(steps, dict) or set(steps) != set(optimizers):
        raise CheckpointDamagedError(f"its schedule_steps do not name the optimizers "
                                     f"{sorted(optimizers)}")
    for name, (_, sched) in optimizers.items():
        _int(steps[name], 0, sched.total_steps, f"schedule_steps[{name}]")

    restored: dict[str, dict] = {}
    for name, part in parts.items():
        sub = _prefixed(state, name)
        expected = {k: tuple(v.shape) for k, v in part.state_dict().items()}
        _same_shapes(name, sub, expected)
        restored[name] = sub
    for name, (opt, _) in optimizers.items():
        sub = _prefixed(state, name)
        # Momentum buffers exist once a parameter has had a step: any subset, each shaped
        # like its parameter.
        shapes = {f"momentum.{i}": tuple(p.shape) for i, p in enumerate(opt.params)}
        _same_shapes(name, sub, {k: shapes[k] for k in sub if k in shapes}, extra_ok=False,
                     allowed=set(shapes))
        restored[name] = sub
    for name, part in parts.items():
        part.load_state_dict(restored[name])
    for name, (opt, sched) in optimizers.items():
        opt.load_state_dict(restored[name])
        sched.step_count = steps[name]
        opt.lr = sched.lr_at(sched.step_count)
    return epoch


def _prefixed(state: dict, name: str) -> dict:
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _same_shapes(name: str, found: dict, expected: dict[str, tuple], extra_ok: bool = False,
                 allowed: set[str] | None = None) -> None:
    wrong = [k for k, shape in expected.items()
             if k not in found or tuple(found[k].shape) != shape]
    extra = sorted(set(found) - (allowed if allowed is not None else set(expected)))
    if wrong or (extra and not extra_ok):
        raise CheckpointDamagedError(f"its tensors do not match {name} ({(wrong or extra)[:3]})")


def _int(value, low: int, high: int, what: str) -> int:
    """``value`` (an int, or metadata text holding one) within ``low..high``."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.lstrip("-").isdigit():
        raise CheckpointDamagedError(f"its {what} is not an integer ({value!r})")
    number = int(text)
    if not low <= number <= high:
        raise CheckpointDamagedError(f"its {what} {number} is outside {low}..{high}")
    return number
