"""A Swin-style hierarchical vision transformer (Liu et al. 2021), small enough for a CPU.

    patch embedding (the stem: conv with kernel = stride = patch, then LayerNorm)
    -> stage 1: pre-norm blocks on the (H/p) x (W/p) token grid, attention within windows
    -> patch merging (each 2x2 group of tokens concatenated -> LayerNorm -> Linear)
    -> stage 2: blocks on the grid of half the side, twice the width ... (as the preset says)
    -> head: LayerNorm -> mean over tokens -> Linear (the vision transformers' TokenHead)

A block is ``x = x + a(x)``, ``a`` multi-head attention of ``LayerNorm(x)`` within windows of
w x w tokens, with a learned bias per relative position of two tokens in a window; every second
block of a stage shifts the windows by w/2 (the grid rolled, and attention masked between
tokens that the roll brought together from opposite edges), so that information crosses window
borders; then ``x = x + m(x)``, ``m`` an MLP of ``LayerNorm(x)``. The window side w is the
preset's, or the largest divisor of the grid's side below it (the grid must tile into windows);
where one window covers the grid there is nothing to shift.

TRGL penalises both residual branches of every block, ``mean(a ** 2) + mean(m ** 2)``, in the
direct form (neither ends in BatchNorm, see energy.py). The patch embedding and the patch
merging are not residual branches: they are blocks of their own that carry no energy, so a
module may start or end at a stage's edge. Inside a module the tokens stay on their grid,
``[N, h, w, D]``; between modules they travel as every family's images do, ``[N, D, h, w]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.models.chain import BlockChain
from edgetrain.models.vit import PreNormBlock


@dataclass(frozen=True)
class SwinSpec:
    patch: int
    """Patch side in pixels (the image side must be a multiple of it)."""
    dims: tuple[int, ...]
    """Token width of each stage."""
    depths: tuple[int, ...]
    """Blocks per stage."""
    heads: tuple[int, ...]
    """Attention heads per stage (each stage's width a multiple of it)."""
    window: int = 7
    """Largest window side in tokens."""
    mlp_ratio: int = 2

    def layers(self) -> list[tuple[str, int, int, int]]:
        """``(kind, stage, in_dim, out_dim)`` of every block in order: "block" or "merge"
        (the patch merging that opens every stage after the first)."""
        found = []
        for s, (dim, depth) in enumerate(zip(self.dims, self.depths)):
            if s > 0:
                found.append(("merge", s, self.dims[s - 1], dim))
            found += [("block", s, dim, dim)] * depth
        return found

    def sides(self, image_size: int) -> list[int]:
        """Token grid side of each stage for ``image_size`` px images."""
        side = image_size // self.patch
        return [side // 2 ** s for s in range(len(self.dims))]


SWIN_PRESETS: dict[str, SwinSpec] = {
    # Sized for a CPU and 28-32 px images: 2 px patches, 2 stages (14x14 then 7x7 tokens on
    # Fashion-MNIST), 0.2 M parameters.
    "swin-tiny": SwinSpec(patch=2, dims=(32, 64), depths=(2, 4), heads=(2, 4)),
}


def window_side(side: int, window: int) -> int:
    """The largest divisor of ``side`` not above ``window``.

    >>> window_side(14, 7), window_side(16, 7), window_side(7, 7)
    (7, 4, 7)
    """
    return max(d for d in range(1, min(side, window) + 1) if side % d == 0)


def to_windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """``[N, H, W, D]`` -> ``[N, windows, w * w, D]``."""
    n, h, wd, d = x.shape
    x = x.reshape(n, h // w, w, wd // w, w, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // w) * (wd // w), w * w, d)


def from_windows(x: torch.Tensor, side: int, w: int) -> torch.Tensor:
    """The inverse of :func:`to_windows` for a ``side`` x ``side`` grid."""
    n, _, _, d = x.shape
    x = x.reshape(n, side // w, side // w, w, w, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, side, side, d)


class PatchEmbedding(nn.Module):
    """Image ``[N, C, H, W]`` -> tokens ``[N, H/p, W/p, D]``."""

    def __init__(self, in_channels: int, spec: SwinSpec):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, spec.dims[0], spec.patch, stride=spec.patch)
        self.norm = nn.LayerNorm(spec.dims[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """``[N, h, w, D]`` -> ``[N, h/2, w/2, D']``: each 2x2 group of tokens concatenated,
    normalised and projected. Not a residual branch: no energy."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduce = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, need_energy: bool = False) -> tuple[torch.Tensor, None]:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduce(self.norm(x)), None


class SwinBlock(PreNormBlock):
    """Pre-norm block with (shifted) window attention on a ``side`` x ``side`` grid (the two
    branches and their energy: :class:`~edgetrain.models.vit.PreNormBlock`)."""

    def __init__(self, dim: int, heads: int, side: int, window: int, shift: bool,
                 mlp_ratio: int):
        super().__init__()
        self.heads, self.side = heads, side
        self.w = window_side(side, window)
        self.shift = self.w // 2 if shift and self.w < side else 0
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        w = self.w
        # One learned bias per head and relative offset (dy, dx) of two tokens in a window.
        self.bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        yx = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij"))
        yx = yx.flatten(1)
        offset = (yx[:, :, None] - yx[:, None, :]) + (w - 1)  # [2, T, T], in 0 .. 2w-2
        # Derived from the shape alone (not state): rebuilt, never saved.
        self.register_buffer("bias_index", offset[0] * (2 * w - 1) + offset[1], persistent=False)
        self.register_buffer("shift_mask", self._shift_mask(), persistent=False)

    def _shift_mask(self) -> torch.Tensor:
        """``[windows, T, T]``: -inf between tokens the roll brought into one window from
        different regions of the grid, 0 elsewhere (all 0 without a shift)."""
        w, side, s = self.w, self.side, self.shift
        windows = (side // w) ** 2
        if s == 0:
            return torch.zeros(windows, w * w, w * w)
        region = torch.zeros(1, side, side, 1)
        cuts = (slice(0, -w), slice(-w, -s), slice(-s, None))
        for i, (ys, xs) in enumerate((ys, xs) for ys in cuts for xs in cuts):
            region[:, ys, xs, :] = i
        ids = to_windows(region, w).reshape(windows, w * w)
        different = ids[:, :, None] != ids[:, None, :]
        return torch.zeros(windows, w * w, w * w).masked_fill(different, float("-inf"))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, side, _, d = x.shape
        w, s, h = self.w, self.shift, self.heads
        if s:
            x = torch.roll(x, (-s, -s), dims=(1, 2))
        windows = to_windows(x, w)  # [N, nW, T, D]
        t = w * w
        q, k, v = self.qkv(windows).reshape(n, -1, t, 3, h, d // h).permute(3, 0, 1, 4, 2, 5)
        bias = self.bias_table[self.bias_index].permute(2, 0, 1)  # [heads, T, T]
        mask = bias[None] + self.shift_mask[:, None]  # [nW, heads, T, T]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [N, nW, heads, T, hd]
        out = self.proj(out.transpose(2, 3).reshape(n, -1, t, d))
        out = from_windows(out, side, w)
        return torch.roll(out, (s, s), dims=(1, 2)) if s else out


def build_blocks(spec: SwinSpec, image_size: int, start: int, stop: int) -> list[nn.Module]:
    """Blocks ``start .. stop - 1`` of the network (see :meth:`SwinSpec.layers`)."""
    sides = spec.sides(image_size)
    built = []
    for i, (kind, stage, dim, out_dim) in enumerate(spec.layers()):
        if not start <= i < stop:
            continue
        if kind == "merge":
            built.append(PatchMerging(dim, out_dim))
        else:
            first = next(j for j, layer in enumerate(spec.layers()) if layer[1] == stage
                         and layer[0] == "block")
            built.append(SwinBlock(dim, spec.heads[stage], sides[stage], spec.window,
                                   shift=(i - first) % 2 == 1, mlp_ratio=spec.mlp_ratio))
    return built


class SwinModule(BlockChain):
    """A run of Swin blocks (and the patch embedding in the first module); between modules the
    tokens travel as ``[N, D, h, w]``."""

    def forward(self, x: torch.Tensor, need_transport: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.stem(x) if self.stem is not None else x.permute(0, 2, 3, 1)
        tokens, transport = self.run_blocks(tokens, need_transport)
        return tokens.permute(0, 3, 1, 2).contiguous(), transport
