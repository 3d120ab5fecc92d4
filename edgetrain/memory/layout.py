"""The layout planner: where the network is cut, which head each module gets, and (with
``--modules auto``) how many modules there are.

Split (``--split``): ``memory``, the default, cuts where the largest module's *counted* peak
(edgetrain/memory/costs.py: input batch, saved activations, backward's gradient pair, weights,
gradients and momentum, and the module's head) is as small as it can be, by the exact dynamic
programme of :func:`edgetrain.models.split.min_max_partition` over the cost of every candidate
module (a module's cost is not a plain sum of block costs: its input and its head depend on
where it starts and ends). ``even`` and ``balanced`` cut by block counts and by activation
elements, as before.

Heads (``--head``): ``dgl`` or ``light`` everywhere, or ``auto``: first the split that is best
when every module may take the light head (whose cost is never above the DGL head's); then each
module gets the DGL head if its count with it stays within that best peak, the light head
otherwise. So the light head goes exactly where the head decides the peak; where it does not,
the paper's head stays.

K (``--modules auto``, under ``--memory-budget``): for K = 1, 2, ... the split above, then the
planner's probes (edgetrain/memory/planner.py) on its modules, largest counted first; the first
K whose every module fits the budget at the requested batch, without micro-batches or
checkpointing, is chosen. If none does, the K whose largest module needs least is kept and the
memory planner fits it with micro-batches, then checkpointing. Every candidate's verdict is
kept as the reason.

The layout is written to plan.json (``layout``) and read back from there on ``--resume``: a
resumed run trains the split it started with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from edgetrain.memory.costs import NetworkCosts
from edgetrain.models.heads import HEAD_CHOICES, HEADS
from edgetrain.models.resnet import ResNetSpec
from edgetrain.models.split import (
    ModulePlan,
    check_modules,
    min_max_partition,
    plan_modules,
    split_network,
)
from edgetrain.units import format_bytes


@dataclass(frozen=True)
class Layout:
    """How the network is cut into modules, and why."""

    strategy: str
    """even, balanced or memory (the --split asked for)."""
    sizes: tuple[int, ...]
    """Blocks per module."""
    heads: tuple[str, ...]
    """Each module's head: dgl or light."""
    head_choice: str
    """The --head asked for: dgl, light or auto."""
    batch_size: int
    """The batch the counts are for."""
    counted_peak_bytes: tuple[int, ...]
    """Each module's counted training peak (above the framework and the data)."""
    reason: str
    """Why this split and these heads, in words."""
    modules_reason: str | None = None
    """With --modules auto: why this K, in words."""
    candidates: list[dict] = field(default_factory=list)
    """With --modules auto: each K tried, its split and its verdict."""

    @property
    def num_modules(self) -> int:
        return len(self.sizes)

    def plans(self, spec: ResNetSpec, image_size: int) -> list[ModulePlan]:
        return plan_modules(spec, list(self.sizes), image_size, list(self.heads))

    def as_dict(self) -> dict:
        return {**asdict(self), "sizes": list(self.sizes), "heads": list(self.heads),
                "counted_peak_bytes": list(self.counted_peak_bytes)}

    @classmethod
    def from_dict(cls, data: dict, source, num_blocks: int) -> Layout:
        """The layout recorded in plan.json, checked against the network (``num_blocks``).
        RecordError names the file and the field."""
        from edgetrain.models.split import SPLIT_STRATEGIES
        from edgetrain.records import Fields, RecordError

        f = Fields(data, source, ", field 'layout'")
        sizes = tuple(f.ints("sizes", low=1))
        heads = tuple(f.list("heads"))
        if sum(sizes) != num_blocks or len(heads) != len(sizes) or \
                any(h not in HEADS for h in heads):
            raise RecordError(f"{source}: field 'layout' must cut the network's {num_blocks} "
                              f"blocks into modules, one head ({'/'.join(HEADS)}) each (found "
                              f"sizes {list(sizes)!r:.60}, heads {list(heads)!r:.60}).")
        counted = tuple(f.ints("counted_peak_bytes", low=0))
        if len(counted) != len(sizes):
            raise RecordError(f"{source}: field 'layout': one counted peak per module.")
        return cls(f.str("strategy", choices=SPLIT_STRATEGIES), sizes, heads,
                   f.str("head_choice", choices=HEAD_CHOICES), f.int("batch_size", low=1),
                   counted, f.str("reason"), f.str("modules_reason", optional=True),
                   f.list("candidates", optional=True) or [])


def choose_split(spec: ResNetSpec, costs: NetworkCosts, num_modules: int, image_size: int,
                 strategy: str, head_choice: str, batch_size: int,
                 checkpointing: bool = False) -> Layout:
    """The split of ``spec`` into ``num_modules`` modules by ``strategy``, with heads by
    ``head_choice`` (see the module docstring)."""
    check_modules(spec, num_modules)
    n = len(spec.blocks)

    def count(s: int, t: int, head: str) -> int:
        return costs.module_bytes(s, t, head, batch_size, checkpointing)

    def cheapest(s: int, t: int) -> int:
        kinds = HEADS if head_choice == "auto" else (head_choice,)
        return min(count(s, t, h) for h in kinds)

    if strategy == "memory":
        sizes = min_max_partition(n, num_modules, cheapest)
    else:
        sizes = [p.num_blocks for p in split_network(spec, num_modules, image_size, strategy)]
    bounds = _bounds(sizes)
    best = max(cheapest(s, t) for s, t in bounds)
    if head_choice == "auto":
        if strategy == "memory":
            # Where the DGL head never decides the peak, the all-DGL split is as good: take it
            # (its cuts may differ from the light-head split's at the same peak).
            dgl_sizes = min_max_partition(n, num_modules, lambda s, t: count(s, t, "dgl"))
            if max(count(s, t, "dgl") for s, t in _bounds(dgl_sizes)) <= best:
                sizes, bounds = dgl_sizes, _bounds(dgl_sizes)
        heads = tuple("dgl" if count(s, t, "dgl") <= best else "light" for s, t in bounds)
    else:
        heads = (head_choice,) * num_modules
    counted = tuple(count(s, t, h) for (s, t), h in zip(bounds, heads))
    return Layout(strategy, tuple(sizes), heads, head_choice, batch_size, counted,
                  _reason(spec, costs, strategy, sizes, heads, counted, batch_size,
                          checkpointing))


def _bounds(sizes: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """[(start, stop)] of consecutive modules of ``sizes`` blocks."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _reason(spec, costs: NetworkCosts, strategy: str, sizes, heads, counted, batch_size: int,
            checkpointing: bool) -> str:
    largest = max(range(len(counted)), key=counted.__getitem__)
    text = (f"{strategy} split {'|'.join(map(str, sizes))}: largest counted module peak "
            f"{format_bytes(counted[largest])} (module {largest + 1}) at batch {batch_size}")
    if strategy == "memory" and len(sizes) > 1:
        even = [p.num_blocks for p in split_network(spec, len(sizes), 32, "even")]
        even_peak = max(costs.module_bytes(s, t, "dgl", batch_size, checkpointing)
                        for s, t in _bounds(even))
        text += f"; the even split {'|'.join(map(str, even))} with DGL heads: " \
                f"{format_bytes(even_peak)}"
    light = [k + 1 for k, h in enumerate(heads) if h == "light"]
    if light and len(light) < len(heads):
        text += (f"; light head on module{'s' if len(light) > 1 else ''} "
                 f"{', '.join(map(str, light))} (with the DGL head it would decide the peak)")
    elif light:
        text += "; light heads"
    return text


Verdict = Callable[[list[ModulePlan], list[int]], tuple[bool, int, str]]
"""``verdict(plans, order)``: probe the modules of a candidate layout in ``order`` (largest
count first); ``(fits at the requested batch, the largest need found, words)``."""


def choose_num_modules(spec: ResNetSpec, costs: NetworkCosts, image_size: int, strategy: str,
                       head_choice: str, batch_size: int, verdict: Verdict) -> Layout:
    """``--modules auto``: the smallest K whose every module fits at the requested batch."""
    candidates: list[dict] = []
    best: tuple[int, Layout] | None = None
    since_best = 0
    for k in range(1, len(spec.blocks) + 1):
        layout = choose_split(spec, costs, k, image_size, strategy, head_choice, batch_size)
        plans = layout.plans(spec, image_size)
        order = sorted(range(k), key=lambda i: -layout.counted_peak_bytes[i])
        fits, need, words = verdict(plans, order)
        candidates.append({"modules": k, "sizes": list(layout.sizes),
                           "heads": list(layout.heads), "fits": fits, "need_bytes": need,
                           "verdict": words})
        if fits:
            tried = "; ".join(f"K={c['modules']}: {c['verdict']}" for c in candidates[:-1])
            reason = (f"K={k} chosen because it is the smallest K whose every module fits at "
                      f"batch {batch_size} without micro-batches: {words}"
                      + (f" (tried first: {tried})" if tried else ""))
            return _with_modules(layout, reason, candidates)
        if best is None or need < best[0]:
            best, since_best = (need, layout), 0
        else:
            since_best += 1
            if since_best == 3:
                # Three more modules did not lower the need: what fills the budget is not the
                # modules (the framework, the data, one block's activations).
                break
    assert best is not None
    layout = best[1]
    reason = (f"K={layout.num_modules} chosen because no K fits at batch {batch_size} without "
              f"micro-batches; its largest module needs least ({format_bytes(best[0])}), so "
              "micro-batches (then checkpointing) fit it")
    return _with_modules(layout, reason, candidates)


def _with_modules(layout: Layout, reason: str, candidates: list[dict]) -> Layout:
    from dataclasses import replace

    return replace(layout, modules_reason=reason, candidates=candidates)
