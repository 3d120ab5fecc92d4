"""The auxiliary classifier that each module trains against (the DGL head)."""

from __future__ import annotations

import torch
from torch import nn


class AuxHead(nn.Module):
    """DGL head (Belilovsky et al. 2020), as used by TRGL for ResNets:
    conv3x3 (C->C, no bias) -> ReLU -> AvgPool to ``pool x pool`` -> BN -> flatten -> Linear.

    The last module's head is the network's classifier, so the stitched network is simply the
    modules in order followed by that head.
    """

    def __init__(self, channels: int, num_classes: int, pool: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * pool * pool, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.pool(torch.relu(self.conv(x))))
        return self.fc(torch.flatten(x, 1))
