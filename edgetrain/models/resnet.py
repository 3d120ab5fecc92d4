"""CIFAR-style ResNets (He et al. 2016, section 4.2) built from basic blocks.

Every block returns its kinetic energy ``mean(r ** 2)`` beside its output, because TRGL's
transport regulariser penalises it (../METHOD.md: r after the branch's last BatchNorm, before the
skip addition and the final ReLU). The block computes it from that BatchNorm's parameters and
batch statistics, keeping no activation for it (edgetrain/models/energy.py). The network is
described as a flat list of :class:`BlockSpec` so a module made of any contiguous run of blocks
can be built on its own, without ever instantiating the rest of the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.errors import UserInputError
from edgetrain.models.catalog import DEFAULT_WIDTHS, RESNET_DEPTHS, SHORTCUTS, model_problems
from edgetrain.models.chain import BlockChain
from edgetrain.models.energy import batchnorm_branch, check_transport_form


@dataclass(frozen=True)
class BlockSpec:
    """One residual block: channels in and out, and the stride of its first conv."""

    in_channels: int
    out_channels: int
    stride: int

    def output_size(self, input_size: int) -> int:
        return (input_size + self.stride - 1) // self.stride


@dataclass(frozen=True)
class ResNetSpec:
    """A whole network: the stem and the flat list of blocks that modules are cut from."""

    name: str
    in_channels: int
    stem_channels: int
    blocks: tuple[BlockSpec, ...]
    shortcut: str = "conv"
    """Downsampling shortcut: ``conv`` (1x1 conv + BN, option B of He et al.) or ``zero-pad``
    (subsample, then zero channels: option A, parameter-free, the authors' choice)."""

    head = "dgl"
    """The auxiliary head every module gets (edgetrain/models/heads.py)."""

    @property
    def out_channels(self) -> int:
        return self.blocks[-1].out_channels

    def stem_size(self, image_size: int) -> int:
        """Side of the stem's output: the 3x3 stem keeps the resolution."""
        return image_size

    def stem_cost(self, image_size: int) -> float:
        """Per-sample activation elements of the stem's output."""
        return float(self.stem_channels * image_size * image_size)

    def build_module(self, start: int, stop: int, init: str = "default", gain: float = 0.1
                     ) -> ResNetModule:
        """Blocks ``[start, stop)`` (and the stem if ``start`` is 0); nothing else of the
        network is allocated."""
        stem = (self.in_channels, self.stem_channels) if start == 0 else None
        module = ResNetModule(list(self.blocks[start:stop]), stem=stem, shortcut=self.shortcut)
        init_weights(module, init, gain)
        return module

    def parameter_count(self) -> int:
        """Parameters of the network's modules, counted from the spec (nothing is built).

        >>> resnet_spec("resnet20", 3).parameter_count()
        271824
        """
        count = self.in_channels * self.stem_channels * 9 + 2 * self.stem_channels
        for b in self.blocks:
            count += b.in_channels * b.out_channels * 9 + b.out_channels ** 2 * 9
            count += 4 * b.out_channels
            if self.shortcut == "conv" and (b.stride != 1 or b.in_channels != b.out_channels):
                count += b.in_channels * b.out_channels + 2 * b.out_channels
        return count


def resnet_spec(name: str, in_channels: int, widths: tuple[int, ...] | None = None,
                shortcut: str = "conv") -> ResNetSpec:
    """The block list of a CIFAR ResNet: ``resnet20`` has 3 stages of 3 blocks (9 blocks).

    >>> spec = resnet_spec("resnet20", in_channels=3)
    >>> len(spec.blocks), spec.blocks[3]
    (9, BlockSpec(in_channels=16, out_channels=32, stride=2))
    >>> len(resnet_spec("resnet110", 3).blocks)
    54
    """
    widths = tuple(widths or DEFAULT_WIDTHS)
    if problems := model_problems(name, widths):
        raise UserInputError(problems)
    per_stage = (RESNET_DEPTHS[name] - 2) // 6
    blocks: list[BlockSpec] = []
    channels = widths[0]
    for stage, width in enumerate(widths):
        for i in range(per_stage):
            stride = 2 if (stage > 0 and i == 0) else 1
            blocks.append(BlockSpec(channels, width, stride))
            channels = width
    if shortcut not in SHORTCUTS:
        raise UserInputError(f"--shortcut {shortcut!r} is not known; choose one of "
                             f"{', '.join(SHORTCUTS)}.")
    return ResNetSpec(name=name, in_channels=in_channels, stem_channels=widths[0],
                      blocks=tuple(blocks), shortcut=shortcut)


class Stem(nn.Module):
    """conv3x3 -> BN -> ReLU. Sits in module 1 and is not penalised by the regulariser."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ZeroPadShortcut(nn.Module):
    """Option A of He et al.: keep every ``stride``-th pixel, append zero channels. No
    parameters, so a downsampling block's skip is as close to the identity as it can be."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class BasicBlock(nn.Module):
    """Two 3x3 convs with a skip; ``forward(x, need_energy)`` returns
    ``(relu(shortcut(x) + r), mean(r ** 2) or None)``.

    Downsampling blocks use a 1x1 conv + BN shortcut (option B of He et al.) or, with
    ``shortcut="zero-pad"``, a parameter-free one (option A); either way they are penalised
    like the others. ``transport_form`` (edgetrain/models/energy.py): ``"bn"`` takes the energy from
    ``bn2``'s scale, shift and batch statistics while ``bn2`` is in training mode (no activation
    kept for it) and falls back to the direct form in eval mode; ``"direct"`` always computes
    ``mean(r ** 2)`` from r (keeping r for backward).
    """

    def __init__(self, spec: BlockSpec, transport_form: str = "bn", shortcut: str = "conv"):
        super().__init__()
        self.conv1 = nn.Conv2d(spec.in_channels, spec.out_channels, 3, stride=spec.stride,
                               padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.out_channels)
        self.conv2 = nn.Conv2d(spec.out_channels, spec.out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(spec.out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if (spec.stride != 1 or spec.in_channels != spec.out_channels) and \
                shortcut == "zero-pad" and spec.out_channels >= spec.in_channels:
            self.shortcut = ZeroPadShortcut(spec.in_channels, spec.out_channels, spec.stride)
        elif spec.stride != 1 or spec.in_channels != spec.out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(spec.in_channels, spec.out_channels, 1, stride=spec.stride, bias=False),
                nn.BatchNorm2d(spec.out_channels),
            )
        self.transport_form = check_transport_form(transport_form)

    def forward(self, x: torch.Tensor, need_energy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.conv2(F.relu(self.bn1(self.conv1(x))))
        r, energy = batchnorm_branch(self.bn2, z, need_energy, self.transport_form)
        return F.relu(self.shortcut(x) + r), energy


class ResNetModule(BlockChain):
    """A contiguous run of basic blocks (plus the stem if it is the first module).

    In training mode each block takes its energy from its last BatchNorm's parameters and batch
    statistics, so the penalty keeps no activation beyond what vanilla greedy keeps; in eval
    mode, or with ``transport_form = "direct"`` on the blocks (:func:`edgetrain.models.network.
    set_transport_form`), from r itself, keeping r for backward: one extra activation per
    block.
    """

    def __init__(self, blocks: list[BlockSpec], stem: tuple[int, int] | None = None,
                 shortcut: str = "conv"):
        super().__init__(Stem(*stem) if stem is not None else None,
                         [BasicBlock(b, shortcut=shortcut) for b in blocks],
                         blocks[-1].out_channels)


def init_weights(module: nn.Module, scheme: str = "default", gain: float = 0.1) -> None:
    """Initialise ``module``'s convs and linear layers; BatchNorm gets unit scale, zero shift.

    ``default``: Kaiming (fan out) for convs, N(0, 0.01) for linear layers: the usual CIFAR
    ResNet start. ``orthogonal``: orthogonal matrices scaled by ``gain`` for both (the authors'
    code: gain 0.1), which starts every residual branch near zero, each block near the
    identity.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and scheme == "orthogonal":
            nn.init.orthogonal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
