"""The `--memory-budget` planner: fit each training phase into the budget before it starts.

For every phase (one module and its head in sequential mode; all modules in parallel mode; the
whole network end to end) the planner runs a short probe (``PROBE_STEPS`` forward/backward/SGD
steps at two small batch sizes, on random inputs of the phase's real input shape), measures the
peak with the meter, and fits ``peak(b) = fixed + per_sample * b``. ``fixed`` holds everything
that does not grow with the batch: the framework, the dataset, weights, gradients, optimizer
state; ``per_sample`` the activations kept for backward. Then, against ``usable = budget -
margin`` (:func:`margin_bytes`):

1. the requested batch size if ``peak(B)`` fits; with ``--batch-growth N`` (sequential mode)
   the largest ``B * 2^j <= N * B`` that fits instead, the module's learning rate scaled by the
   same factor (the linear scaling rule, Goyal et al. 2017): a module whose activations are
   small trains at a larger batch, in fewer steps;
2. else the largest micro-batch that fits, with gradient accumulation up to the requested batch
   (same effective batch and learning rate; BatchNorm then normalises over micro-batches, so
   results differ slightly), as long as the micro-batch is at least ``MIN_MICRO_BATCH``;
3. else the same with per-block activation checkpointing inside the module (re-probed): for
   module-wise training this is module-wise plus recompute, the smallest configuration
   edgetrain has;
4. else stop before training with an error naming the phase, its minimum need and the budget.

How many modules, where they are cut and which head each gets is planned before this, from
counted costs and these probes (edgetrain/memory/layout.py: ``--split memory``, ``--head
auto``, ``--modules auto``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from edgetrain.errors import UserInputError
from edgetrain.memory.meter import MemoryMeter
from edgetrain.units import format_bytes

SAFETY_MARGIN = 0.10
"""Share kept free for what a probe cannot see (allocator fragmentation, a larger last batch of
the cache reader, Python garbage): of the whole budget, or, where the allocator is held to the
budget, of what the framework leaves of it (:func:`margin_bytes`)."""
HELD_MARGIN_FLOOR = 24 * 2**20
"""The least margin kept where the allocator is held to the budget: a probe's line can miss a
phase's live memory by a few MiB (8 MiB measured in a planner test), and there that is not
absorbed but fails the run."""
MIN_MICRO_BATCH = 8
"""Smallest micro-batch the planner will choose before it turns to checkpointing: below it,
BatchNorm statistics get noisy and throughput collapses."""
PROBE_STEPS = 2


class BudgetError(UserInputError):
    """The run cannot fit the memory budget; raised before any training."""


class BudgetExceededError(UserInputError):
    """A run held to its budget needed more during training (its plan was wrong, or changed by
    hand); finished modules and checkpoints are kept."""


@dataclass(frozen=True)
class PhasePlan:
    """How one phase (a module, or the whole network) will train, and what it should cost."""

    phase: str
    batch_size: int
    """The phase's batch: the requested one, or (``--batch-growth``) a larger one."""
    micro_batch: int
    accumulation: int
    checkpointing: bool
    fixed_bytes: int
    per_sample_bytes: float
    predicted_peak_bytes: int
    probes: list[tuple[int, int]] = field(default_factory=list)
    """(batch size, measured peak bytes) of each probe step set."""


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    usable_bytes: int
    safety_margin: float
    meter: str
    phases: list[PhasePlan]
    probe_time_s: float

    def phase(self, index: int) -> PhasePlan:
        return self.phases[index]

    def as_dict(self) -> dict:
        return {**asdict(self), "phases": [asdict(p) for p in self.phases]}

    @classmethod
    def read(cls, path, phases: int, batch_size: int, growth: int = 1) -> MemoryPlan:
        """The plan in ``path`` (plan.json), checked: ``phases`` phases planned for
        ``batch_size`` (each phase's own batch ``batch_size * 2^j``, at most ``growth`` times
        it). A resumed run trains as planned, not as a new probe would plan on a machine whose
        memory has changed since. RecordError names the file and field."""
        from edgetrain.records import Fields, RecordError, read_json_object

        f = Fields(read_json_object(path), path)
        rows = f.list("phases")
        if len(rows) != phases:
            raise RecordError(f"{path}: field 'phases' must hold {phases} phases (found "
                              f"{len(rows)}).")
        plans = []
        for i, row in enumerate(rows):
            p = Fields(row, path, f", phase {i}")
            own = p.int("batch_size", low=1, high=batch_size * growth)
            micro = p.int("micro_batch", low=1, high=own)
            accumulation = p.int("accumulation", low=1, high=own)
            if own % batch_size or (own // batch_size) & (own // batch_size - 1) or \
                    math.ceil(own / micro) != accumulation:
                raise RecordError(f"{path}, phase {i}: batch_size, micro_batch and accumulation "
                                  f"do not fit --batch-size {batch_size} (--batch-growth "
                                  f"{growth}).")
            probes = [tuple(x) for x in p.list("probes")]
            if not all(len(x) == 2 and all(isinstance(v, int) for v in x) for x in probes):
                raise RecordError(f"{path}, phase {i}: field 'probes' must be [batch, bytes] "
                                  "pairs.")
            plans.append(PhasePlan(p.str("phase"), own, micro, accumulation,
                                   p.bool("checkpointing"), p.int("fixed_bytes"),
                                   p.float("per_sample_bytes", low=0),
                                   p.int("predicted_peak_bytes", low=0), probes))
        return cls(f.int("budget_bytes", low=1), f.int("usable_bytes", low=0),
                   f.float("safety_margin", low=0, high=1), f.str("meter"), plans,
                   f.float("probe_time_s", low=0))


Prober = Callable[[int, bool], None]
"""``prober(batch_size, checkpointing)`` builds the phase, runs PROBE_STEPS training steps at
that batch size and frees everything it built."""

Line = tuple[int, float, list[tuple[int, int]]]
"""``(fixed bytes, bytes per sample, probes)`` of one phase, as :func:`fit_line` measured it."""


def measure(prober: Prober, batch_size: int, checkpointing: bool, meter: MemoryMeter) -> int:
    meter.reset()
    prober(batch_size, checkpointing)
    return meter.read().peak_bytes


def fit_line(prober: Prober, batch_size: int, checkpointing: bool, meter: MemoryMeter
             ) -> tuple[int, float, list[tuple[int, int]]]:
    """Probe at two small batch sizes and fit ``peak = fixed + per_sample * b``."""
    small = max(2, min(batch_size, 32) // 4)
    large = max(small * 2, min(batch_size, 32))
    # The first probe pays one-off costs (lazy kernel loading, allocator warm-up): run it once
    # unmeasured so they land in neither point of the line... but in the fixed cost below.
    warm = measure(prober, small, checkpointing, meter)
    p_small = measure(prober, small, checkpointing, meter)
    p_large = measure(prober, large, checkpointing, meter)
    per_sample = max(0.0, (p_large - p_small) / (large - small))
    # Whatever the warm-up raised the resident set to stays resident: count it as fixed.
    fixed = max(p_small - per_sample * small, warm - per_sample * small)
    return int(fixed), per_sample, [(small, warm), (small, p_small), (large, p_large)]


def plan_phase(phase: str, prober: Prober, batch_size: int, usable: int, meter: MemoryMeter,
               checkpointing: bool = False, line: Line | None = None, growth: int = 1,
               max_batch: int | None = None) -> PhasePlan | int:
    """A plan for one phase, or, if nothing fits, the least it needs (at the smallest
    micro-batch the planner allows). ``line``: the phase's measured line, if probed already.
    ``growth``: how many times the requested batch the phase may grow to (powers of 2, at most
    ``max_batch``) when it fits whole."""
    fixed, per_sample, probes = line or fit_line(prober, batch_size, checkpointing, meter)

    def predict(b: int) -> int:
        return int(fixed + per_sample * b)

    smallest = min(batch_size, MIN_MICRO_BATCH)
    if predict(batch_size) <= usable:
        own = batch_size
        while (own * 2 <= batch_size * growth and own * 2 <= (max_batch or own * 2)
               and predict(own * 2) <= usable):
            own *= 2
        return PhasePlan(phase, own, own, 1, checkpointing, fixed, per_sample, predict(own),
                         probes)
    if per_sample > 0 and predict(smallest) <= usable:
        micro = min(batch_size, int((usable - fixed) // per_sample))
    else:
        return predict(smallest)
    accumulation = math.ceil(batch_size / micro)
    micro = math.ceil(batch_size / accumulation)  # even micro-batches
    return PhasePlan(phase, batch_size, micro, accumulation, checkpointing, fixed, per_sample,
                     predict(micro), probes)


def margin_bytes(budget: int, framework_bytes: int = 0, held: bool = False) -> int:
    """What the planner keeps free of ``budget``.

    Unheld (glibc, jemalloc, mimalloc, CUDA), a share of the whole budget: what the probes
    cannot see includes allocator fragmentation, which grows with everything the allocator
    serves. Held (``held``: tcmalloc's heap limited to the budget, see
    :func:`edgetrain.memory.allocator.hold_heap_to`), fragmentation is given back before it can
    cross the budget, and what is left to absorb (a larger last batch, Python garbage) grows
    with training memory, not with the framework measured before any data or model existed
    (``framework_bytes``, 500-600 MiB of CUDA-build torch on a CPU): the share is of what the
    framework leaves, and at least :data:`HELD_MARGIN_FLOOR`."""
    if not held:
        return int(budget * SAFETY_MARGIN)
    return max(HELD_MARGIN_FLOOR, int((budget - framework_bytes) * SAFETY_MARGIN))


def usable_bytes(budget: int, framework_bytes: int = 0, held: bool = False) -> int:
    return budget - margin_bytes(budget, framework_bytes, held)


def budget_for(need_bytes: int, framework_bytes: int = 0, held: bool = False) -> int:
    """The smallest budget whose usable part holds ``need_bytes``."""
    if not held:
        return math.ceil(need_bytes / (1 - SAFETY_MARGIN))
    # Where the share is above the floor, budget - (budget - framework) * share = need.
    shared = math.ceil((need_bytes - framework_bytes * SAFETY_MARGIN) / (1 - SAFETY_MARGIN))
    return max(need_bytes + HELD_MARGIN_FLOOR, shared)


def make_plan(phases: list[tuple], batch_size: int, budget: int,
              meter: MemoryMeter, framework_bytes: int = 0, held: bool = False,
              budget_text: str | None = None, lines: dict | None = None, growth: int = 1,
              max_batch: int | None = None, alternatives: str | None = None) -> MemoryPlan:
    """Plan every phase; raise BudgetError naming each phase that cannot fit. ``held``: the
    allocator will be held to the budget (:func:`margin_bytes`). ``alternatives``: what else
    the error suggests besides a larger budget (default: smaller modules, lighter heads).

    ``phases``: ``(name, prober)`` or ``(name, prober, key)``; ``lines`` maps a key to the
    line its phase was already probed for (``--modules auto`` probes candidate modules first),
    and takes the lines probed here. ``growth``/``max_batch``: see :func:`plan_phase`.

    All phases are first tried without checkpointing; only those that do not fit are re-probed
    with it (its first use loads more of torch, which would inflate every later probe).
    """
    start = time.perf_counter()
    margin = margin_bytes(budget, framework_bytes, held)
    usable = budget - margin
    lines = {} if lines is None else lines
    results: dict[str, PhasePlan | int] = {}
    for checkpointing in (False, True):
        for name, prober, *key in phases:
            if isinstance(results.get(name), PhasePlan):
                continue
            line = lines.get((*key, checkpointing)) if key else None
            if line is None:
                line = fit_line(prober, batch_size, checkpointing, meter)
                if key:
                    lines[(*key, checkpointing)] = line
            result = plan_phase(name, prober, batch_size, usable, meter, checkpointing, line,
                                growth, max_batch)
            results[name] = result if isinstance(result, PhasePlan) else min(
                result, results.get(name, result))
    failures = [(name, r) for name, r in results.items() if not isinstance(r, PhasePlan)]
    if failures:
        flag = f"--memory-budget {budget_text or budget}"
        needs = [f"{name} needs at least {format_bytes(need)} (micro-batch "
                 f"{min(batch_size, MIN_MICRO_BATCH)})"
                 for name, need in failures]
        least = budget_for(max(need for _, need in failures), framework_bytes, held)
        hint = (f"Raise --memory-budget to at least {format_bytes(least)}, or "
                + (alternatives or "use a larger --modules (smaller modules; --modules auto "
                   "finds the smallest K that fits), --head light, a smaller --model or "
                   "--widths."))
        if framework_bytes + margin_bytes(framework_bytes, framework_bytes, held) > usable:
            hint = (f"The framework alone (Python and torch, before any data or model) already "
                    f"takes {format_bytes(framework_bytes)} here, so no run fits this budget on "
                    f"this machine: raise --memory-budget above "
                    f"{format_bytes(budget_for(framework_bytes, framework_bytes, held) * 1.2)}.")
        raise BudgetError(
            f"{flag} ({format_bytes(budget)}) is too small: after a safety margin of "
            f"{format_bytes(margin)} {format_bytes(usable)} is usable, but " + "; ".join(needs)
            + f" (measured with: {meter.description}). {hint}"
        )
    plans = [results[name] for name, *_ in phases]
    # safety_margin stays a share of the whole budget, as plan.json has always recorded it.
    return MemoryPlan(budget, usable, margin / budget, meter.description, plans,
                      round(time.perf_counter() - start, 3))


def random_batch(shape: tuple[int, ...], batch_size: int, num_classes: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(batch_size, *shape, device=device),
            torch.randint(0, num_classes, (batch_size,), device=device))
