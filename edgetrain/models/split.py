"""Cut a network's block list into K contiguous modules.

Three strategies:

* ``even``: the same number of blocks per module (ResNet-110, K=4: 14|14|13|13).
* ``balanced``: even out each module's *activation elements*: a block's activations scale with
  its output size C*H*W; early blocks work at full resolution, so they cost more and balanced
  splits give later modules more blocks.
* ``memory`` (the default): the smallest possible peak of the largest module, with the cost of
  a module counted as a whole (input batch, what its blocks keep for backward, backward's
  gradient buffers, weights, gradients and momentum, and its auxiliary head), not as a plain sum
  of block costs: edgetrain/memory/layout.py counts it and hands the cost of every candidate
  module to :func:`min_max_partition` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

from edgetrain.errors import UserInputError
from edgetrain.models.catalog import SPLIT_STRATEGIES
from edgetrain.models.resnet import ResNetSpec


@dataclass(frozen=True)
class ModulePlan:
    """Module ``index`` (0-based) holds blocks ``[start, stop)``; module 0 also holds the stem."""

    index: int
    start: int
    stop: int
    in_channels: int
    out_channels: int
    in_size: int
    out_size: int
    head: str = "dgl"
    """Its auxiliary head: ``dgl`` or ``light`` (edgetrain/models/heads.py), or ``token`` (a
    transformer's, edgetrain/models/vit.py)."""

    @property
    def has_stem(self) -> bool:
        return self.index == 0

    @property
    def num_blocks(self) -> int:
        return self.stop - self.start


def even_sizes(n: int, k: int) -> list[int]:
    """The same number of blocks per module, the first ones taking the remainder.

    >>> even_sizes(54, 4)
    [14, 14, 13, 13]
    """
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def balanced_sizes(costs: list[float], k: int) -> list[int]:
    """Contiguous partition of ``costs`` into ``k`` non-empty parts minimising the largest sum.

    >>> balanced_sizes([4, 4, 2, 2, 1, 1, 1, 1], 2)
    [2, 6]
    """
    prefix = [0.0, *accumulate(costs)]
    return min_max_partition(len(costs), k, lambda s, t: prefix[t] - prefix[s])


def min_max_partition(n: int, k: int, cost: Callable[[int, int], float]) -> list[int]:
    """Sizes of the contiguous partition of ``n`` items into ``k`` non-empty parts that
    minimises the largest ``cost(start, stop)`` of a part (items ``start .. stop - 1``).

    ``cost`` need not be a sum of item costs: a module's peak is its input batch plus its
    blocks plus its head, which depends on where it ends. Exact dynamic programme, O(k n^2)
    calls of ``cost``: n is at most a few hundred blocks. Among equally good partitions the
    one with the earliest cuts wins (first found).

    >>> min_max_partition(4, 2, lambda s, t: (t - s) + (3 if t == 4 else 0))
    [3, 1]
    """
    inf = float("inf")
    # best[j][i]: smallest achievable max-part cost for the first i items in j parts.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for s in range(j - 1, i):
                value = max(best[j - 1][s], cost(s, i))
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, s
    sizes, i = [], n
    for j in range(k, 0, -1):
        s = cut[j][i]
        sizes.append(i - s)
        i = s
    return sizes[::-1]


def block_costs(spec: ResNetSpec, image_size: int) -> list[float]:
    """Per-sample activation elements of each block (the stem's are charged to block 0)."""
    costs, size = [], spec.stem_size(image_size)
    for i, block in enumerate(spec.blocks):
        size = block.output_size(size)
        cost = float(block.out_channels * size * size)
        if i == 0:
            cost += spec.stem_cost(image_size)
        costs.append(cost)
    return costs


def check_modules(spec: ResNetSpec, num_modules: int) -> None:
    n = len(spec.blocks)
    if not 1 <= num_modules <= n:
        raise UserInputError(
            f"--modules {num_modules} is out of range: {spec.name} has {n} blocks, "
            f"so K must be between 1 and {n}."
        )


def split_network(spec: ResNetSpec, num_modules: int, image_size: int,
                  strategy: str = "even",
                  module_cost: Callable[[int, int], float] | None = None) -> list[ModulePlan]:
    """Plan the K modules of ``spec`` (every head DGL). ``module_cost(start, stop)``, the
    counted peak of a module holding blocks ``start .. stop - 1``, is what ``memory`` splits by
    (edgetrain/memory/layout.py supplies it, with the heads).

    >>> from edgetrain.models.resnet import resnet_spec
    >>> [p.num_blocks for p in split_network(resnet_spec("resnet110", 3), 4, 32)]
    [14, 14, 13, 13]
    >>> [p.num_blocks for p in split_network(resnet_spec("resnet110", 3), 4, 32, "balanced")]
    [7, 8, 13, 26]
    """
    check_modules(spec, num_modules)
    n = len(spec.blocks)
    if strategy == "even":
        sizes = even_sizes(n, num_modules)
    elif strategy == "balanced":
        sizes = balanced_sizes(block_costs(spec, image_size), num_modules)
    elif strategy == "memory":
        if module_cost is None:
            raise ValueError("the memory split needs module_cost (edgetrain/memory/layout.py)")
        sizes = min_max_partition(n, num_modules, module_cost)
    else:
        raise UserInputError(
            f"--split {strategy!r} is not known; choose one of {', '.join(SPLIT_STRATEGIES)}."
        )
    return plan_modules(spec, sizes, image_size)


def plan_modules(spec: ResNetSpec, sizes: list[int], image_size: int,
                 heads: list[str] | None = None) -> list[ModulePlan]:
    """The plans of modules holding ``sizes[k]`` consecutive blocks each, module k with head
    ``heads[k]`` (default: all DGL). A recorded split, e.g. the ``modules`` and ``heads`` fields
    of a run's model.json, is rebuilt from its sizes.

    >>> from edgetrain.models.resnet import resnet_spec
    >>> [(p.start, p.stop, p.out_size) for p in plan_modules(resnet_spec("resnet8", 1), [2, 1], 28)]
    [(0, 2, 14), (2, 3, 7)]
    """
    if sum(sizes) != len(spec.blocks) or any(s < 1 for s in sizes):
        raise ValueError(f"module sizes {sizes} do not cover the {len(spec.blocks)} blocks")
    heads = heads or [spec.head] * len(sizes)
    if spec.head == "token":  # a transformer's modules all take the token head
        heads = ["token"] * len(sizes)
    if len(heads) != len(sizes):
        raise ValueError(f"{len(heads)} heads for {len(sizes)} modules")
    plans, start, size = [], 0, image_size
    for index, count in enumerate(sizes):
        blocks = spec.blocks[start:start + count]
        in_channels = spec.in_channels if index == 0 else blocks[0].in_channels
        in_size = size
        if index == 0:
            size = spec.stem_size(size)
        for block in blocks:
            size = block.output_size(size)
        plans.append(ModulePlan(index, start, start + count, in_channels,
                                blocks[-1].out_channels, in_size, size, heads[index]))
        start += count
    return plans
