"""Activation checkpointing of one residual block, without `torch.utils.checkpoint`.

Why not torch's: its first call imports torch._dynamo (with sympy and triton), about 150 MB of
resident memory that the process then holds to the end (measured with torch 2.14.1:
`python benchmarks/import_costs.py`). Checkpointing is what the planner turns on when the
budget is tight, exactly when 150 MB hurts most. The mechanism needed here is small: a block
takes one tensor and returns ``(output, energy)``, the energy a scalar or None
(edgetrain/models/energy.py).

Two differences from torch's: BatchNorm's running statistics are updated once per step, not
again when the block is recomputed in backward (torch updates them twice); and only the
reentrant style is offered, so parameters receive gradients through an inner backward call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def recompute_in_backward(block: nn.Module, x: torch.Tensor, need_energy: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``block(x, need_energy)`` that keeps only ``x`` for backward and runs the block again
    there. The energy (a scalar) comes out of the first run; its gradient flows through the
    recomputed one."""
    # The anchor makes the outputs require grad even when x does not (the cached features that
    # feed a later module), so that backward reaches this block's parameters.
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _Recompute.apply(block, anchor, x, need_energy)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block: nn.Module, anchor: torch.Tensor,  # noqa: ARG004
                x: torch.Tensor, need_energy: bool):
        ctx.block, ctx.need_energy = block, need_energy
        ctx.set_materialize_grads(False)  # an output nobody used gets None, not a zero tensor
        # The only activation kept: the block's input. Everything inside is freed at once.
        ctx.save_for_backward(x)
        with torch.no_grad():
            return block(x, need_energy)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        (x,) = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[2]
        x = x.detach().requires_grad_(needs_x)
        # Peak of this block's backward: its full activations exist again, for this block only.
        # The recompute uses batch statistics as the first run did, so the energy it rebuilds
        # (BatchNorm form) is the one the forward returned.
        with torch.enable_grad(), _running_stats_frozen(ctx.block):
            outputs = ctx.block(x, ctx.need_energy)
        pairs = [(out, g) for out, g in zip(outputs, grads)
                 if g is not None and out is not None and out.requires_grad]
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [g for _, g in pairs])
        return None, None, (x.grad if needs_x else None), None


@contextmanager
def _running_stats_frozen(block: nn.Module) -> Iterator[None]:
    """Recompute with batch statistics (as the first forward did) but leave running statistics
    as the first forward left them: momentum 0 makes the update a no-op."""
    norms = [m for m in block.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
