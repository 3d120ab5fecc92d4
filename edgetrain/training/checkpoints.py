"""Epoch checkpoints: what a killed run needs to continue exactly where it stopped.

A checkpoint holds the weights (BatchNorm statistics included) of what is being trained, each
optimizer's momentum buffers, and, as metadata, the last finished epoch and the schedule's
step count. Data order and augmentation are seeded per module and epoch, so a run resumed from
epoch e draws the same batches as one that never stopped. Files are safetensors written under
a temporary name and renamed: a kill mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from edgetrain.runs.files import load_weights, save_weights
from edgetrain.training.sgd import SGD, CosineSchedule


def save_checkpoint(path: Path, epoch: int, parts: dict[str, nn.Module],
                    optimizers: dict[str, tuple[SGD, CosineSchedule]]) -> None:
    state = {}
    for name, part in parts.items():
        state.update({f"{name}.{k}": v for k, v in part.state_dict().items()})
    steps = {}
    for name, (opt, sched) in optimizers.items():
        state.update({f"{name}.{k}": v for k, v in opt.state_dict().items()})
        steps[name] = sched.step_count
    save_weights(path, state, {"epoch": epoch, "schedule_steps": json.dumps(steps)})


def load_checkpoint(path: Path, parts: dict[str, nn.Module],
                    optimizers: dict[str, tuple[SGD, CosineSchedule]], device) -> int:
    """Restore ``parts`` and ``optimizers`` in place; return the last finished epoch."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_weights(path, device)
    for name, part in parts.items():
        prefix = f"{name}."
        part.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                              if k.startswith(prefix)})
    steps = json.loads(meta["schedule_steps"])
    for name, (opt, sched) in optimizers.items():
        prefix = f"{name}."
        opt.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                             if k.startswith(prefix)})
        sched.step_count = steps[name]
        opt.lr = sched.lr_at(sched.step_count)
    return int(meta["epoch"])
