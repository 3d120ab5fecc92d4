"""torchvision's ResNet-18/34/50 and MobileNetV2, cut into blocks that return their energy.

The networks are built by torchvision's own classes, so a user's (pretrained) state dict loads
into them; each block is wrapped, not rewritten: the wrapper holds torchvision's block as
``block`` and reruns its forward with the residual branch exposed, so the parameters, buffers
and their names (``block.conv1.weight`` ...) are torchvision's.

Every residual branch here ends in BatchNorm (``bn2`` of BasicBlock, ``bn3`` of Bottleneck, the
last layer of an InvertedResidual's ``conv``), so the energy takes the BatchNorm form (energy.py:
no activation kept). MobileNetV2 blocks that change shape have no residual connection (the
linear bottleneck is the whole block) and are not penalised.

Importing torchvision costs about 165 MB of resident memory (it imports torch._dynamo); only
these families import it.
"""

from __future__ import annotations

import torch
from torch import nn

from edgetrain.models.energy import batchnorm_branch


class ResNetBlock(nn.Module):
    """torchvision's ``BasicBlock`` or ``Bottleneck``; ``forward(x, need_energy)`` returns
    ``(relu(r + identity), mean(r ** 2) or None)`` with ``r`` the branch after its last BN."""

    def __init__(self, block: nn.Module, transport_form: str = "bn"):
        super().__init__()
        self.block = block
        self.bottleneck = hasattr(block, "conv3")
        self.transport_form = transport_form

    def forward(self, x: torch.Tensor, need_energy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.block
        out = b.relu(b.bn1(b.conv1(x)))
        if self.bottleneck:
            out = b.relu(b.bn2(b.conv2(out)))
            r, energy = batchnorm_branch(b.bn3, b.conv3(out), need_energy, self.transport_form)
        else:
            r, energy = batchnorm_branch(b.bn2, b.conv2(out), need_energy, self.transport_form)
        identity = b.downsample(x) if b.downsample is not None else x
        return b.relu(r + identity), energy


class InvertedResidualBlock(nn.Module):
    """torchvision's MobileNetV2 ``InvertedResidual``: ``x + r`` where it has a residual
    connection (stride 1, same channels), else the linear bottleneck alone (no energy)."""

    def __init__(self, block: nn.Module, transport_form: str = "bn"):
        super().__init__()
        self.block = block
        self.transport_form = transport_form

    def forward(self, x: torch.Tensor, need_energy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.block
        if not b.use_res_connect:
            return b.conv(x), None
        body = b.conv[:-1](x)
        r, energy = batchnorm_branch(b.conv[-1], body, need_energy, self.transport_form)
        return x + r, energy


class Plain(nn.Module):
    """A layer with no residual branch (a stem, MobileNetV2's last 1x1 conv): no energy."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.block = layer

    def forward(self, x: torch.Tensor, need_energy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.block(x), None


def torchvision_blocks(name: str, in_channels: int = 3) -> tuple[nn.Module, list[nn.Module]]:
    """``(stem, blocks)`` of torchvision network ``name`` (resnet18/34/50, mobilenet_v2),
    randomly initialised as torchvision does; load a state dict into the network first (see
    :func:`split_torchvision`) to start from pretrained weights.

    With ``in_channels`` other than 3 the first conv is replaced (its pretrained weights cannot
    apply), the rest is torchvision's.
    """
    from torchvision import models

    net = getattr(models, name.replace("tv-", ""))(weights=None)
    return split_torchvision(net, in_channels)


def split_torchvision(net: nn.Module, in_channels: int = 3
                      ) -> tuple[nn.Module, list[nn.Module]]:
    """Cut an existing torchvision ResNet or MobileNetV2 (weights and all) into a stem and
    blocks; its classifier is dropped (edgetrain trains its own heads)."""
    from torchvision.models import MobileNetV2, ResNet

    if isinstance(net, ResNet):
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, 7, 2, 3, bias=False)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        blocks = [ResNetBlock(b) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
                  for b in layer]
        return stem, blocks
    if isinstance(net, MobileNetV2):
        features = list(net.features)
        if in_channels != 3:
            first = features[0][0]
            features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, first.stride, 1,
                                       bias=False)
        return features[0], [InvertedResidualBlock(b) if hasattr(b, "use_res_connect")
                             else Plain(b) for b in features[1:]]
    raise TypeError(f"{type(net).__name__} is not a torchvision ResNet or MobileNetV2")
