"""Every family edgetrain trains, behind one description: the network's blocks (what K
contiguous modules are cut from), how to build a run of them, and the head each module gets.

    spec = network_spec("vgg11", in_channels=1, image_size=28)
    module = spec.build_module(0, 4)          # blocks 0-3 only: nothing else is allocated

The CIFAR ResNets' spec is :class:`edgetrain.models.resnet.ResNetSpec`; VGG, the vision
transformers and torchvision's networks are described here. A spec's ``blocks`` give each
block's channels in and out and its stride (a block's output side is ``ceil(side / stride)``),
from which the planner sizes every module's activations without building anything.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgetrain.errors import UserInputError
from edgetrain.models.catalog import DEFAULT_WIDTHS, MODELS, model_problems
from edgetrain.models.chain import BlockChain
from edgetrain.models.energy import direct_energy
from edgetrain.models.resnet import BlockSpec, ResNetSpec, init_weights, resnet_spec


def network_spec(model: str, in_channels: int, image_size: int,
                 widths: tuple[int, ...] | None = None, shortcut: str = "conv",
                 pretrained: Path | None = None):
    """The spec of ``--model``: ``widths`` and ``shortcut`` apply to the CIFAR ResNets only,
    ``pretrained`` (a torchvision state dict) to torchvision's networks only."""
    if problems := model_problems(model, tuple(widths or DEFAULT_WIDTHS)):
        raise UserInputError(problems)
    kind = MODELS[model]
    if kind == "resnet":
        return resnet_spec(model, in_channels, widths, shortcut)
    if kind == "vgg":
        return VGGSpec(model, in_channels)
    if kind == "vit":
        if model.startswith("swin"):
            return SwinNetSpec(model, in_channels, image_size)
        return ViTNetSpec(model, in_channels, image_size)
    return TorchvisionSpec(model, in_channels, pretrained)


def _count_parameters(spec) -> int:
    """Parameters of the whole network's modules, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = spec.build_module(0, len(spec.blocks), materialize=False)
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class VGGSpec:
    """VGG-11/16/19 with BatchNorm (edgetrain/models/vgg.py): one block per conv layer, no
    stem; the stage's max-pool closes the block that ends a stage."""

    name: str
    in_channels: int
    head = "dgl"

    @functools.cached_property
    def layers(self):
        from edgetrain.models.vgg import vgg_layers

        return tuple(vgg_layers(self.name, self.in_channels))

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        return tuple(BlockSpec(layer.in_channels, layer.out_channels, 2 if layer.pool else 1)
                     for layer in self.layers)

    def stem_size(self, image_size: int) -> int:
        return image_size

    def stem_cost(self, image_size: int) -> float:
        return 0.0

    def parameter_count(self) -> int:
        return _count_parameters(self)

    def build_module(self, start: int, stop: int, init: str = "default", gain: float = 0.1,
                     materialize: bool = True) -> BlockChain:
        from edgetrain.models.vgg import VGGBlock

        chosen = self.layers[start:stop]
        module = BlockChain(None, [VGGBlock(layer) for layer in chosen], chosen[-1].out_channels)
        init_weights(module, init, gain)
        return module


@dataclass(frozen=True)
class ViTNetSpec:
    """A vision transformer preset (edgetrain/models/vit.py): the patch embedding is module
    1's stem, every block keeps the token grid."""

    name: str
    in_channels: int
    image_size: int
    head = "token"

    @property
    def vit(self):
        from edgetrain.models.vit import VIT_PRESETS

        return VIT_PRESETS[self.name]

    def __post_init__(self):
        if self.image_size % self.vit.patch:
            raise UserInputError(
                f"--model {self.name} cuts images into {self.vit.patch}x{self.vit.patch} "
                f"patches, but the images are {self.image_size} px; choose --image-size a "
                f"multiple of {self.vit.patch}.")

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        return (BlockSpec(self.vit.dim, self.vit.dim, 1),) * self.vit.depth

    def stem_size(self, image_size: int) -> int:
        return image_size // self.vit.patch

    def stem_cost(self, image_size: int) -> float:
        return float(self.vit.dim * self.stem_size(image_size) ** 2)

    def parameter_count(self) -> int:
        return _count_parameters(self)

    def build_module(self, start: int, stop: int, init: str = "default", gain: float = 0.1,
                     materialize: bool = True) -> BlockChain:
        from edgetrain.models.vit import PatchEmbedding, ViTBlock, ViTModule

        stem = PatchEmbedding(self.in_channels, self.image_size, self.vit) if start == 0 else None
        module = ViTModule(stem, [ViTBlock(self.vit) for _ in range(start, stop)], self.vit)
        init_weights(module, init, gain)
        return module


@dataclass(frozen=True)
class SwinNetSpec:
    """A Swin-style hierarchical transformer preset (edgetrain/models/swin.py): the patch
    embedding is module 1's stem; the blocks are the transformer blocks and, opening every
    stage after the first, the patch merging (stride 2)."""

    name: str
    in_channels: int
    image_size: int
    head = "token"

    @property
    def swin(self):
        from edgetrain.models.swin import SWIN_PRESETS

        return SWIN_PRESETS[self.name]

    def __post_init__(self):
        swin = self.swin
        sides = [self.image_size // swin.patch // 2 ** s for s in range(len(swin.dims))]
        if self.image_size % swin.patch or any(side % 2 for side in sides[:-1]) \
                or sides[-1] < 1:
            need = swin.patch * 2 ** (len(swin.dims) - 1)
            raise UserInputError(
                f"--model {self.name} cuts images into {swin.patch}x{swin.patch} patches and "
                f"halves the token grid {len(swin.dims) - 1} time(s), but the images are "
                f"{self.image_size} px; choose --image-size a multiple of {need}.")

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        return tuple(BlockSpec(d_in, d_out, 2 if kind == "merge" else 1)
                     for kind, _, d_in, d_out in self.swin.layers())

    def stem_size(self, image_size: int) -> int:
        return image_size // self.swin.patch

    def stem_cost(self, image_size: int) -> float:
        return float(self.swin.dims[0] * self.stem_size(image_size) ** 2)

    def parameter_count(self) -> int:
        return _count_parameters(self)

    def build_module(self, start: int, stop: int, init: str = "default", gain: float = 0.1,
                     materialize: bool = True) -> BlockChain:
        from edgetrain.models.swin import PatchEmbedding, SwinModule, build_blocks

        stem = PatchEmbedding(self.in_channels, self.swin) if start == 0 else None
        blocks = build_blocks(self.swin, self.image_size, start, stop)
        module = SwinModule(stem, blocks, self.blocks[stop - 1].out_channels)
        init_weights(module, init, gain)
        return module


@dataclass(frozen=True)
class TorchvisionSpec:
    """torchvision's ResNet-18/34/50 or MobileNetV2, built by torchvision's own classes
    (edgetrain/models/torchvision_blocks.py). The network is laid out once on the meta device
    (no memory) to read its blocks; a module is cut from a meta copy and only its own tensors
    are then allocated and initialised as torchvision initialises them."""

    name: str
    in_channels: int
    pretrained: Path | None = None
    """A torchvision state dict each module starts from (its own tensors only)."""
    head = "dgl"

    def _meta_parts(self) -> tuple[nn.Module, list[nn.Module]]:
        from edgetrain.models.torchvision_blocks import torchvision_blocks

        with torch.device("meta"):
            return torchvision_blocks(self.name, self.in_channels)

    @functools.cached_property
    def _layout(self) -> tuple[tuple[BlockSpec, ...], int, int]:
        stem, blocks = self._meta_parts()
        specs = tuple(BlockSpec(*_channels_and_stride(b)) for b in blocks)
        _, stem_out, stem_stride = _channels_and_stride(stem)
        return specs, stem_out, stem_stride

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        return self._layout[0]

    def stem_size(self, image_size: int) -> int:
        return -(-image_size // self._layout[2])

    def stem_cost(self, image_size: int) -> float:
        return float(self._layout[1] * self.stem_size(image_size) ** 2)

    def parameter_count(self) -> int:
        return _count_parameters(self)

    def build_module(self, start: int, stop: int, init: str = "default", gain: float = 0.1,
                     materialize: bool = True) -> BlockChain:
        stem, blocks = self._meta_parts()
        chosen = blocks[start:stop]
        module = BlockChain(stem if start == 0 else None, chosen,
                            self.blocks[stop - 1].out_channels)
        if not materialize or torch.empty(()).device.type == "meta":  # a shape check
            return module
        # Only this module's tensors are allocated; then torchvision's own initialisation
        # (Kaiming fan-out convs, unit BatchNorm: init_weights' default) or the orthogonal one.
        module = module.to_empty(device="cpu")
        init_weights(module, init, gain)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
        if self.pretrained is not None:
            self._load_pretrained(module, start, stop)
        return module

    def _load_pretrained(self, module: BlockChain, start: int, stop: int) -> None:
        """Copy this module's share of the pretrained state dict in: block i of the network is
        the torchvision submodule at ``prefix`` (layer2.0, features.5, ...), and its tensors are
        ``prefix.*`` in the file. A first conv for other than 3 input channels gets the sum of
        the RGB filters (the usual start for grey images)."""
        state = _read_state_dict(self.pretrained)
        net_stem, net_blocks, names = self._meta_named_parts()

        def file_name(meta_part: nn.Module, key: str) -> str:
            owner, _, leaf = key.rpartition(".")
            return names[id(meta_part.get_submodule(owner) if owner else meta_part)] + leaf

        wanted: dict[str, str] = {}  # our name -> the file's name
        if start == 0:
            for key in module.stem.state_dict():
                wanted[f"stem.{key}"] = file_name(net_stem, key)
        for j, i in enumerate(range(start, stop)):
            for key in module.blocks[j].state_dict():
                wanted[f"blocks.{j}.{key}"] = file_name(net_blocks[i], key)
        mine = module.state_dict()
        missing = sorted(theirs for theirs in wanted.values() if theirs not in state)
        if missing:
            raise UserInputError(
                f"--pretrained {self.pretrained} is not a {self.name} state dict: it lacks "
                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}. Give "
                f"torchvision's {self.name.removeprefix('tv-')} weights.")
        with torch.no_grad():
            for ours, theirs in wanted.items():
                value = state[theirs]
                if value.shape != mine[ours].shape and value.dim() == 4 and \
                        value.shape[1] == 3 and mine[ours].shape[1] == self.in_channels:
                    value = value.sum(dim=1, keepdim=True).expand_as(mine[ours])
                if value.shape != mine[ours].shape:
                    raise UserInputError(
                        f"--pretrained {self.pretrained}: {theirs} has shape "
                        f"{tuple(value.shape)}, {self.name} needs {tuple(mine[ours].shape)}.")
                mine[ours].copy_(value)

    def _meta_named_parts(self):
        """The meta network's stem and blocks (edgetrain's wrappers around torchvision's own
        layers) and every torchvision layer's name in a state dict, with its dot."""
        from torchvision import models

        from edgetrain.models.torchvision_blocks import split_torchvision

        with torch.device("meta"):
            net = getattr(models, self.name.removeprefix("tv-"))(weights=None)
            names = {id(m): f"{n}." for n, m in net.named_modules()}
            stem, blocks = split_torchvision(net, 3)  # 3 channels: the file's own layers
        return stem, blocks, names


class CustomSpec:
    """A network given from Python as a list of blocks (edgetrain.api.fit): each an
    ``nn.Module`` or a function that returns one. A block returns its output, or ``(output,
    energy)`` to supply its own transport energy (e.g. ``mean(r ** 2)`` of its residual
    branch); otherwise a block whose output has its input's shape is penalised as
    ``T = id + (T - id)``, ``mean((T(x) - x) ** 2)`` in the direct form (METHOD.md, the VGG
    rule), and one that changes the shape is not.

    Memory: modules are built one at a time from the blocks, as copies: the blocks given are
    never trained in place (the planner's probes and resumed runs build modules too). Given
    as functions, only the current module's blocks ever exist; given as modules, the caller
    holds them all. Blocks take and return images ``[N, C, H, W]``; the head is the DGL
    conv head. ``--init`` does not apply: the blocks keep the weights they come with.
    """

    name = "custom"
    head = "dgl"

    def __init__(self, blocks: list, in_channels: int, image_size: int):
        self.items = check_blocks(blocks)
        self.in_channels = in_channels
        self.blocks = self._layout(in_channels, image_size)

    def _block(self, i: int) -> nn.Module:
        item = self.items[i]
        if isinstance(item, nn.Module):
            return copy.deepcopy(item)
        made = item()
        if not isinstance(made, nn.Module):
            raise UserInputError(f"blocks[{i}]() returned {type(made).__name__}, not a "
                                 "torch.nn.Module.")
        return made

    @torch.no_grad()
    def _layout(self, channels: int, side: int) -> tuple[BlockSpec, ...]:
        """Each block's channels and stride, from one forward of a 2-image batch in eval mode
        (running statistics untouched), one block alive at a time."""
        x, specs = torch.zeros(2, channels, side, side), []
        for i in range(len(self.items)):
            block = UserBlock(self._block(i)).eval()
            try:
                y, _ = block(x)
            except Exception as e:  # the user's code: say which block and with what input
                raise UserInputError(f"blocks[{i}] fails on an input of shape "
                                     f"{tuple(x.shape)}: {type(e).__name__}: {e}") from None
            stride = max(1, round(side / y.shape[-1])) if y.dim() == 4 and y.shape[-1] else 0
            if not stride or y.shape[-2] != y.shape[-1] or y.shape[-1] != -(-side // stride):
                raise UserInputError(f"blocks[{i}] returns shape {tuple(y.shape)} for input "
                                     f"{tuple(x.shape)}: blocks must map [N, C, H, W] images "
                                     "to images whose side is the input's divided by a stride.")
            specs.append(BlockSpec(x.shape[1], y.shape[1], stride))
            x, side = y, y.shape[-1]
        return tuple(specs)

    def stem_size(self, image_size: int) -> int:
        return image_size

    def stem_cost(self, image_size: int) -> float:
        return 0.0

    def parameter_count(self) -> int:
        return sum(sum(p.numel() for p in self._block(i).parameters())
                   for i in range(len(self.items)))

    def build_module(self, start: int, stop: int, init: str = "default", gain: float = 0.1,
                     materialize: bool = True) -> BlockChain:
        return BlockChain(None, [UserBlock(self._block(i)) for i in range(start, stop)],
                          self.blocks[stop - 1].out_channels)


def check_blocks(blocks) -> list:
    """``blocks`` as a list, or a clear error: before anything is read or written."""
    if not isinstance(blocks, (list, tuple)) or not blocks or not all(
            isinstance(b, nn.Module) or callable(b) for b in blocks):
        raise UserInputError("blocks must be a non-empty list of torch.nn.Module objects (or "
                             "functions returning one).")
    return list(blocks)


class UserBlock(nn.Module):
    """A user's block in edgetrain's protocol: ``forward(x, need_energy)`` returns
    ``(output, energy or None)`` (see :class:`CustomSpec` for the energy)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, need_energy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.block(x)
        if isinstance(out, tuple):
            return out[0], out[1] if need_energy else None
        if need_energy and out.shape == x.shape:
            # Direct form: T(x) - x is kept for backward.
            return out, direct_energy(out - x)
        return out, None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch file (tensors only: ``weights_only``), or a clear error."""
    try:
        # Memory-mapped: a module copies in its own tensors and only their pages are read, not
        # the whole file (a ResNet-50's is 100 MB); the mapping goes with the dict.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a damaged file, another format: say which file and why
        raise UserInputError(f"--pretrained {path} cannot be read as a torch state dict "
                             f"({type(e).__name__}: {str(e)[:200]}).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"--pretrained {path} holds no state dict of tensors.")
    return state


def _channels_and_stride(layer: nn.Module) -> tuple[int, int, int]:
    """``(in, out, stride)`` of a block from its convs (works on the meta device); pools count
    in the stride (a ResNet stem's max-pool)."""
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    stride = 1
    for m in layer.modules():
        if isinstance(m, nn.Conv2d) and m.stride[0] > 1 and m.kernel_size[0] > 1:
            stride *= m.stride[0]
        elif isinstance(m, nn.MaxPool2d):
            stride *= m.stride if isinstance(m.stride, int) else m.stride[0]
    if stride == 1 and any(m.stride[0] > 1 for m in convs):  # 1x1 strided only (rare)
        stride = max(m.stride[0] for m in convs)
    out = [m for m in convs if "downsample" not in _name_in(layer, m)][-1].out_channels
    return convs[0].in_channels, out, stride


def _name_in(parent: nn.Module, child: nn.Module) -> str:
    return next(name for name, m in parent.named_modules() if m is child)


__all__ = ["CustomSpec", "ResNetSpec", "SwinNetSpec", "TorchvisionSpec", "VGGSpec", "ViTNetSpec",
           "network_spec"]
