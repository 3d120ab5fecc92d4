"""What a module of a network costs in memory when it trains, counted block by block.

The split planner (edgetrain/memory/layout.py) needs the peak of every candidate module,
``blocks start .. stop - 1`` with its head, without building and probing each one. A module's
training peak is, at the start of its backward pass:

    batch x (input + sum of its blocks' saved activations + its head's + the gradient pair)
    + weights, buffers, gradients and momentum of its blocks and head

* *input*: the module's input batch (raw images for module 1, else the previous module's
  output), kept by its first convolution;
* *saved activations*: what autograd keeps for backward beyond a block's input, counted with
  ``saved_tensors_hooks`` (edgetrain/memory/breakdown.py) at the block's real
  resolution, at two batch sizes so that what does not grow with the batch (BatchNorm's
  statistics) is not scaled with it (the stem's are charged to block 0); a block's output is
  the next block's input, one storage, counted once;
* *the gradient pair*: backward holds the gradient of an activation and of the one before it
  at once, two buffers of the module's largest activation (autograd frees neither earlier);
* *head*: what the head keeps beyond its input (the DGL head: one activation of the module's
  output size; the light head pools first), and its weights, gradients and momentum.

With per-block activation checkpointing (edgetrain/models/recompute.py) a block keeps only its
input, and backward recomputes one block at a time: saved = the block inputs plus the largest
block's activations, once.

Counted, not measured: the numbers depend on shapes only, so the same configuration plans the
same split on every machine and every run (a resumed run's split is read from plan.json anyway).
The planner's probes then measure the modules it chose.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from edgetrain.memory.breakdown import count_saved_activations, parameter_bytes, trainable_bytes
from edgetrain.models.heads import HEADS, make_head
from edgetrain.models.resnet import ResNetSpec

_COUNT_BATCHES = (2, 4)
FLOAT_BYTES = 4


@dataclass(frozen=True)
class BlockCost:
    """Per sample, in bytes, except ``state_bytes`` and ``fixed_bytes``."""

    input_bytes: float
    """The block's input (for block 0: the raw image; the stem sits in front of it)."""
    stem_bytes: float
    """Block 0 only: what the stem keeps beyond the image (its output, block 0's real input,
    included). The stem is never checkpointed."""
    saved_bytes: float
    """What the block keeps for backward beyond its input (its output included)."""
    output_bytes: float
    """Its output: the next block's input, and what its head reads."""
    largest_bytes: float
    """Its largest activation (input, stem output or output): the gradient pair's size."""
    state_bytes: int
    """Weights and buffers, gradients and momentum (once per module, not per sample)."""
    fixed_bytes: float = 0.0
    """What the stem (block 0) and the block keep whatever the batch: BatchNorm's per-channel
    statistics (once per module, not per sample)."""


@dataclass(frozen=True)
class HeadCost:
    saved_bytes: float
    """Per sample: what the head keeps beyond its input."""
    largest_bytes: float
    """Per sample: the largest activation inside the head (its gradient pair's size)."""
    state_bytes: int
    fixed_bytes: float = 0.0
    """What the head keeps whatever the batch (BatchNorm's statistics)."""


def _state_bytes(module: torch.nn.Module) -> int:
    """Weights and buffers, gradients and momentum."""
    return parameter_bytes(module) + 2 * trainable_bytes(module)


@dataclass(frozen=True)
class NetworkCosts:
    """Counted costs of every block of a network, and of each head kind after every block."""

    blocks: tuple[BlockCost, ...]
    heads: dict[str, tuple[HeadCost, ...]]
    """Head kind -> its cost when it follows block b (index b)."""

    @classmethod
    def count(cls, spec: ResNetSpec, image_size: int, num_classes: int,
              need_transport: bool = False) -> NetworkCosts:
        """Count every block's and head's cost (``need_transport``: TRGL's energy asked for;
        in its BatchNorm form it keeps only storages BatchNorm keeps anyway).

        Counted at two batch sizes: what a block keeps is ``fixed + per_sample * batch``, and
        the fixed part (BatchNorm's per-channel statistics) must not be scaled with the batch.
        """
        small, large = (_count_at(spec, image_size, num_classes, need_transport, b)
                        for b in _COUNT_BATCHES)
        span = _COUNT_BATCHES[1] - _COUNT_BATCHES[0]

        def split(a: float, b: float) -> tuple[float, float]:
            """(per sample, fixed) of a count that was ``a`` at the small batch, ``b`` at the
            large one."""
            per = (b - a) / span
            return per, a - per * _COUNT_BATCHES[0]

        blocks = []
        for a, b in zip(small["blocks"], large["blocks"], strict=True):
            stem, stem_fixed = split(a["stem"], b["stem"])
            saved, fixed = split(a["saved"], b["saved"])
            blocks.append(BlockCost(
                input_bytes=a["input"], stem_bytes=stem, saved_bytes=saved,
                output_bytes=a["output"], largest_bytes=a["largest"],
                state_bytes=a["state"], fixed_bytes=stem_fixed + fixed))
        heads = {}
        for kind in HEADS:
            heads[kind] = []
            for a, b in zip(small["heads"][kind], large["heads"][kind], strict=True):
                saved, fixed = split(a["saved"], b["saved"])
                heads[kind].append(HeadCost(saved, a["largest"], a["state"], fixed))
        return cls(tuple(blocks), {k: tuple(v) for k, v in heads.items()})

    def module_bytes(self, start: int, stop: int, head: str, batch: int,
                     checkpointing: bool = False) -> int:
        """The counted training peak of a module holding blocks ``start .. stop - 1`` and a
        ``head`` head, at batch size ``batch`` (see the module docstring)."""
        return self.module_count(start, stop, head, batch, checkpointing).total_bytes

    def module_count(self, start: int, stop: int, head: str, batch: int,
                     checkpointing: bool = False) -> ModuleCount:
        """:meth:`module_bytes`, part by part."""
        blocks = self.blocks[start:stop]
        h = self.heads[head][stop - 1]
        recompute = fixed = recompute_fixed = 0.0
        if checkpointing:
            # Kept through forward: the stem's activations, each block's input, and the last
            # block's output (the head's input); in backward one block at a time is recomputed
            # (its BatchNorm statistics with it).
            saved = (blocks[0].stem_bytes + sum(b.input_bytes for b in blocks[1:])
                     + blocks[-1].output_bytes)
            recompute = max(b.saved_bytes - b.output_bytes for b in blocks)
            recompute_fixed = max(b.fixed_bytes for b in blocks)
        else:
            saved = blocks[0].stem_bytes + sum(b.saved_bytes for b in blocks)
            fixed = sum(b.fixed_bytes for b in blocks)
        pair = 2 * max(max(b.largest_bytes for b in blocks), h.largest_bytes)
        return ModuleCount(
            input_bytes=int(batch * blocks[0].input_bytes),
            saved_bytes=round(batch * saved + fixed),
            recompute_bytes=round(batch * recompute + recompute_fixed),
            head_saved_bytes=round(batch * h.saved_bytes + h.fixed_bytes),
            gradient_pair_bytes=int(batch * pair),
            state_bytes=sum(b.state_bytes for b in blocks) + h.state_bytes)


@dataclass(frozen=True)
class ModuleCount:
    """A module's counted training peak, part by part (bytes at the batch size asked for)."""

    input_bytes: int
    saved_bytes: int
    """What the module's blocks keep for backward beyond the input."""
    recompute_bytes: int
    """With checkpointing: the largest block's activations, alive again in its backward."""
    head_saved_bytes: int
    gradient_pair_bytes: int
    state_bytes: int
    """Weights and buffers, gradients and momentum of the module and its head."""

    @property
    def floor_bytes(self) -> int:
        """Everything but the gradient pair: what autograd keeps, the input, the state."""
        return (self.input_bytes + self.saved_bytes + self.recompute_bytes
                + self.head_saved_bytes + self.state_bytes)

    @property
    def total_bytes(self) -> int:
        return self.floor_bytes + self.gradient_pair_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "floor_bytes": self.floor_bytes, "total_bytes": self.total_bytes}


def _largest_inner_activation(head: torch.nn.Module, x: torch.Tensor) -> int:
    """Elements x bytes of the largest tensor a head's layers produce on ``x``."""
    largest = 0

    def hook(module, inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in head.modules() if m is not head]
    with torch.no_grad():
        head(x)
    for handle in handles:
        handle.remove()
    return largest


def _head(spec, kind: str, channels: int, num_classes: int, size: int) -> torch.nn.Module:
    """Head ``kind`` after a block; a transformer's modules always take its token head."""
    if spec.head == "token":
        from edgetrain.models.vit import TokenHead

        return TokenHead(channels, num_classes)
    return make_head(kind, channels, num_classes, size)


def _count_at(spec: ResNetSpec, image_size: int, num_classes: int, need_transport: bool,
              batch: int) -> dict:
    """Raw counts at one batch size: bytes saved for backward by the stem, each block and each
    head kind after each block; per-sample sizes of inputs, outputs and largest activations;
    state bytes."""
    blocks, heads = [], {kind: [] for kind in HEADS}
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the values do not matter, only the shapes
        image = torch.randn(batch, spec.in_channels, image_size, image_size)
        x, size = image, image_size
        for i, block_spec in enumerate(spec.blocks):
            # Block i on its own, as the family builds it (block 0 with the network's stem);
            # the stem's share is counted apart: it is never checkpointed.
            module = spec.build_module(i, i + 1)
            stem_saved = 0
            if module.stem is not None:
                _, stem_saved = count_saved_activations(
                    lambda module=module: module.stem(image),
                    [*module.stem.parameters(), image])
            out, saved = count_saved_activations(
                lambda module=module, x=x: module(x, need_transport)[0],
                [*module.parameters(), x])
            saved -= stem_saved
            out = out.detach()
            largest = max(x[0].numel(), out[0].numel())
            blocks.append({
                "input": x[0].numel() * FLOAT_BYTES,
                "stem": stem_saved, "saved": saved,
                "output": out[0].numel() * FLOAT_BYTES, "largest": largest * FLOAT_BYTES,
                "state": _state_bytes(module)})
            size = block_spec.output_size(spec.stem_size(size) if i == 0 else size)
            for kind in HEADS:
                head = _head(spec, kind, block_spec.out_channels, num_classes, size)
                _, head_saved = count_saved_activations(
                    lambda head=head, out=out: head(out), [*head.parameters(), out])
                heads[kind].append({"saved": head_saved,
                                    "largest": _largest_inner_activation(head, out) / batch,
                                    "state": _state_bytes(head)})
            x = out
    return {"blocks": blocks, "heads": heads}
