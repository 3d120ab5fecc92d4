"""Counting memory: the bytes of weights and gradients, and the activations autograd saves.
One whole training step's breakdown is edgetrain/profiler/step_cost.py.

Saved activations are counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor
autograd keeps for backward passes through the pack hook; we count each underlying storage once
(views share storage) and leave out the parameters themselves (counted as weights).
"""

from __future__ import annotations

import torch
from torch import nn


def parameter_bytes(*modules: nn.Module) -> int:
    """Weights and buffers (BatchNorm statistics) of the modules."""
    return sum(t.numel() * t.element_size() for m in modules
               for t in (*m.parameters(), *m.buffers()))


def trainable_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()
               if p.requires_grad)


def count_saved_activations(fn, exclude: list[torch.Tensor]):
    """Run ``fn()`` under a pack hook; return ``(fn's result, bytes of saved activations)``."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        # Detached: the same storage, without its grad_fn. Returning ``t`` itself makes a
        # reference cycle (an op's output -> its node -> the saved output) that Python's gc
        # cannot see, so a graph that is never backwarded (the head counted alone) was never
        # freed: `edgetrain profile` carried 16-34 MiB of it into every later module's phase.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())
