"""A Vision Transformer (Dosovitskiy et al. 2021) small enough to train on a CPU, as blocks.

    patch embedding (the stem: conv with kernel = stride = patch, + learned positions)
    -> depth x pre-norm block:  x = x + a(x),  a = Attention(LayerNorm(x))
                                x = x + m(x),  m = MLP(LayerNorm(x))
    -> head: LayerNorm -> mean over tokens -> Linear

TRGL penalises both residual branches of every block, ``mean(a ** 2) + mean(m ** 2)``, in the
direct form (neither branch ends in BatchNorm, see energy.py): one saved activation per branch.
The patch embedding is not penalised (it is not a residual branch). Tokens are ``[N, T, D]``;
there is no class token: the head averages the tokens, as the TRGL paper's transformer heads do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.models.chain import BlockChain
from edgetrain.models.energy import direct_energy


@dataclass(frozen=True)
class ViTSpec:
    patch: int
    """Patch side in pixels (the image side must be a multiple of it)."""
    dim: int
    """Token width."""
    depth: int
    """Number of blocks."""
    heads: int
    """Attention heads (dim must be a multiple of it)."""
    mlp_ratio: int = 2
    """MLP hidden width = mlp_ratio x dim."""


VIT_PRESETS: dict[str, ViTSpec] = {
    # Sized for a CPU: vit-tiny trains Fashion-MNIST at a few hundred images/s on 2 cores.
    "vit-tiny": ViTSpec(patch=4, dim=64, depth=6, heads=4),
    "vit-small": ViTSpec(patch=4, dim=128, depth=8, heads=4),
}


class PatchEmbedding(nn.Module):
    """Image ``[N, C, H, W]`` -> tokens ``[N, (H/p)(W/p), D]`` plus learned positions."""

    def __init__(self, in_channels: int, image_size: int, spec: ViTSpec):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, spec.dim, spec.patch, stride=spec.patch)
        tokens = (image_size // spec.patch) ** 2
        self.position = nn.Parameter(torch.zeros(1, tokens, spec.dim))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.position


class PreNormBlock(nn.Module):
    """A pre-norm transformer block's two residual branches, ``x = x + a``, ``a =
    attention(norm1(x))``, then ``x + m``, ``m = fc2(gelu(fc1(norm2(x))))``; ``forward(x,
    need_energy)`` returns ``(x + a + m, mean(a ** 2) + mean(m ** 2) or None)`` (direct form:
    neither branch ends in BatchNorm). Subclasses give ``attention`` and the layers."""

    def forward(self, x: torch.Tensor, need_energy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a = self.attention(self.norm1(x))
        x = x + a
        m = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        energy = direct_energy(a) + direct_energy(m) if need_energy else None
        return x + m, energy


class ViTBlock(PreNormBlock):
    """Pre-norm transformer block over all tokens (see :class:`PreNormBlock`)."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.heads = spec.heads
        self.norm1 = nn.LayerNorm(spec.dim)
        self.qkv = nn.Linear(spec.dim, 3 * spec.dim)
        self.proj = nn.Linear(spec.dim, spec.dim)
        self.norm2 = nn.LayerNorm(spec.dim)
        self.fc1 = nn.Linear(spec.dim, spec.mlp_ratio * spec.dim)
        self.fc2 = nn.Linear(spec.mlp_ratio * spec.dim, spec.dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        # The fused kernel keeps no [T, T] attention matrix for backward where it can.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class ViTModule(BlockChain):
    """A run of transformer blocks (and the patch embedding in the first module).

    Between modules the tokens travel on their patch grid, ``[N, D, H/p, W/p]``, the layout of
    every other family (the disk cache and the heads see images): the module turns them into
    ``[N, T, D]`` on entry and back on exit. The exit is one copy of the module's output, the
    tensor the next module (or the cache) takes anyway.
    """

    def __init__(self, stem: PatchEmbedding | None, blocks: list[ViTBlock], spec: ViTSpec):
        super().__init__(stem, blocks, spec.dim)
        self.patch = spec.patch

    def forward(self, x: torch.Tensor, need_transport: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stem is not None:
            side = x.shape[-1] // self.patch
            tokens = self.stem(x)
        else:
            side = x.shape[-1]
            tokens = x.flatten(2).transpose(1, 2)
        tokens, transport = self.run_blocks(tokens, need_transport)
        n, _, d = tokens.shape
        return tokens.transpose(1, 2).reshape(n, d, side, side), transport


class TokenHead(nn.Module):
    """The transformer head: LayerNorm -> mean over tokens -> Linear. Takes tokens
    ``[N, T, D]`` or a module's output on its patch grid ``[N, D, h, w]``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.flatten(2).transpose(1, 2)
        return self.fc(self.norm(x).mean(dim=1))
