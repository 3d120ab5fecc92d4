"""VGG-11/16/19 with BatchNorm (Simonyan & Zisserman 2015), as a list of blocks to cut modules
from.

A VGG has no residual branch. TRGL writes each layer whose input and output shapes match as
``T = id + (T - id)`` and penalises ``mean((T(x) - x) ** 2)`` (../../shared/METHOD.md), in the
direct form: the difference is kept for backward, one activation per penalised layer (there is
no BatchNorm at the end of a branch to take the energy from, see energy.py). Layers that change
the shape (a wider conv, a max-pool) are not penalised.

Each block is one ``conv3x3 -> BN -> ReLU`` layer, followed by the stage's 2x2 max-pool when it
ends a stage (the pool is part of the block but not of ``T``: ``T(x) - x`` is taken before it).
Pools use ``ceil_mode`` so 28 px inputs survive five stages (28, 14, 7, 4, 2, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.models.energy import direct_energy

# Output channels of each conv; "M" closes a stage with a max-pool (torchvision's configs).
VGG_CONFIGS: dict[str, tuple] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


@dataclass(frozen=True)
class VGGLayer:
    """One conv layer: channels in and out, and whether a max-pool follows it."""

    in_channels: int
    out_channels: int
    pool: bool

    @property
    def penalised(self) -> bool:
        """``T(x)`` and ``x`` have the same shape only if the conv keeps the channel count."""
        return self.in_channels == self.out_channels


def vgg_layers(name: str, in_channels: int, width_multiplier: float = 1.0) -> list[VGGLayer]:
    """The conv layers of VGG ``name``, widths scaled (at least 4 channels).

    >>> [(l.out_channels, l.pool, l.penalised) for l in vgg_layers("vgg11", 3, 0.25)][:3]
    [(16, True, False), (32, True, False), (64, False, False)]
    >>> sum(l.penalised for l in vgg_layers("vgg16", 3))
    9
    """
    layers: list[VGGLayer] = []
    channels = in_channels
    for item in VGG_CONFIGS[name]:
        if item == "M":
            layers[-1] = VGGLayer(layers[-1].in_channels, layers[-1].out_channels, True)
            continue
        width = max(4, round(item * width_multiplier))
        layers.append(VGGLayer(channels, width, False))
        channels = width
    return layers


class VGGBlock(nn.Module):
    """``conv3x3 -> BN -> ReLU`` (= T), then the stage's max-pool if it ends one;
    ``forward(x, need_energy)`` returns ``(output, mean((T(x) - x) ** 2) or None)``."""

    def __init__(self, layer: VGGLayer):
        super().__init__()
        self.conv = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(layer.out_channels)
        self.pool = layer.pool
        self.penalised = layer.penalised

    def forward(self, x: torch.Tensor, need_energy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = F.relu(self.bn(self.conv(x)))
        # The direct form keeps T(x) - x for backward: the price of penalising a layer that
        # has no residual branch of its own.
        energy = direct_energy(t - x) if need_energy and self.penalised else None
        if self.pool:
            t = F.max_pool2d(t, 2, ceil_mode=True)
        return t, energy

    @staticmethod
    def output_size(layer: VGGLayer, size: int) -> int:
        return -(-size // 2) if layer.pool else size
