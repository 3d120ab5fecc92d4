"""A module: a contiguous run of blocks (plus the network's stem if it is the first), whatever
the family.

Every block takes one tensor and returns ``(output, energy)``, the energy a scalar or None
(edgetrain/models/energy.py); the module sums the energies into the transport term TRGL
penalises. Between modules, every family passes images ``[N, C, H, W]`` (a transformer's
tokens are laid out on their patch grid), so the disk cache, the planner and the heads see one
shape convention.
"""

from __future__ import annotations

import torch
from torch import nn

from edgetrain.models.recompute import recompute_in_backward


class BlockChain(nn.Module):
    """``forward(x, need_transport)`` returns ``(output, transport)``: ``transport`` is the sum
    over the blocks of their kinetic energy, 0 with ``need_transport=False`` (vanilla greedy,
    inference, caching: no energy is computed)."""

    def __init__(self, stem: nn.Module | None, blocks: list[nn.Module], out_channels: int):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = out_channels
        self.checkpointing = False
        """Activation checkpointing per block: keep only each block's input for backward (the
        energy leaves the block as a scalar, in either form) and recompute the rest; less
        memory, about one more forward."""

    def run_blocks(self, x: torch.Tensor, need_transport: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        transport = x.new_zeros(())
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x, energy = recompute_in_backward(block, x, need_transport)
            else:
                x, energy = block(x, need_transport)
            if energy is not None:
                transport = transport + energy
        return x, transport

    def forward(self, x: torch.Tensor, need_transport: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stem is not None:
            x = self.stem(x)
        return self.run_blocks(x, need_transport)
