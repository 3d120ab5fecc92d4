"""Probers: build one training phase (edgetrain/training/phase.py), run a few steps at a given
batch size, free it.

The planner (edgetrain/memory/planner.py) measures these to predict each phase's peak.
Inputs are random tensors of the phase's real input shape: memory depends on shapes, not values.
"""

from __future__ import annotations

from edgetrain.memory.planner import PROBE_STEPS, Prober, fit_line, random_batch
from edgetrain.models.split import ModulePlan
from edgetrain.training.phase import Optim, Phase
from edgetrain.units import format_bytes


def module_prober(ctx, k: int, plan: ModulePlan | None = None, tau: float | None = None
                  ) -> Prober:
    """Module ``k`` and its head, as sequential mode trains them (``plan``/``tau``: of a
    candidate layout rather than the run's)."""
    plan = plan or ctx.plans[k]
    tau = ctx.taus[k] if tau is None else tau
    shape = (plan.in_channels, plan.in_size, plan.in_size)
    cfg = ctx.config

    def prober(batch_size: int, checkpointing: bool) -> None:
        phase = Phase.module(ctx.spec, plan, ctx.num_classes, ctx.device, Optim.of(cfg),
                             PROBE_STEPS, tau, checkpointing=checkpointing)
        for _ in range(PROBE_STEPS):
            x, y = random_batch(shape, batch_size, ctx.num_classes, ctx.device)
            phase.step(x, y, keep_output=False)
        del phase, x, y

    return prober


def parallel_prober(ctx) -> Prober:
    """All modules, heads and optimizers, one batch flowing through them all."""
    cfg = ctx.config
    info = ctx.data.info
    shape = (info.in_channels, info.image_size, info.image_size)

    def prober(batch_size: int, checkpointing: bool) -> None:
        phases = [Phase.module(ctx.spec, plan, ctx.num_classes, ctx.device, Optim.of(cfg),
                               PROBE_STEPS, ctx.taus[k], checkpointing=checkpointing)
                  for k, plan in enumerate(ctx.plans)]
        for _ in range(PROBE_STEPS):
            x, y = random_batch(shape, batch_size, ctx.num_classes, ctx.device)
            for phase in phases:
                x, _ = phase.step(x, y)
        del phases, x, y

    return prober


def end_to_end_prober(ctx) -> Prober:
    cfg = ctx.config
    info = ctx.data.info
    shape = (info.in_channels, info.image_size, info.image_size)

    def prober(batch_size: int, checkpointing: bool) -> None:
        phase = Phase.end_to_end(ctx.spec, ctx.plans, ctx.num_classes, ctx.device,
                                 Optim.of(cfg), PROBE_STEPS, checkpointing=checkpointing)
        for _ in range(PROBE_STEPS):
            x, y = random_batch(shape, batch_size, ctx.num_classes, ctx.device)
            phase.step(x, y)
        del phase, x, y

    return prober


def phases(ctx) -> list[tuple[str, Prober, tuple]]:
    """The phases of this run, in training order, each with its prober and a key that names
    what it builds (a module is the same phase whatever K it belongs to)."""
    cfg = ctx.config
    if cfg.method == "e2e":
        return [("end-to-end network", end_to_end_prober(ctx), ("e2e",))]
    if cfg.mode == "parallel":
        return [(f"all {len(ctx.plans)} modules (parallel)", parallel_prober(ctx),
                  ("parallel", *((p.start, p.stop, p.head) for p in ctx.plans)))]
    return [(f"module {k + 1}", module_prober(ctx, k), module_key(p))
            for k, p in enumerate(ctx.plans)]


def module_key(plan: ModulePlan) -> tuple:
    return ("module", plan.start, plan.stop, plan.head)


def layout_verdict(ctx, taus_for, usable: int, lines: dict):
    """The probe verdict on a candidate layout for ``--modules auto``
    (edgetrain/memory/layout.py): its modules, largest count first, each probed (once per
    run: ``lines`` keeps every measured line) until one does not fit at the requested batch
    without micro-batches."""
    batch = ctx.config.batch_size

    def verdict(plans: list[ModulePlan], order: list[int]) -> tuple[bool, int, str]:
        taus = taus_for(len(plans))
        largest = 0
        for i in order:
            key = (*module_key(plans[i]), False)
            if key not in lines:
                prober = module_prober(ctx, i, plans[i], taus[i])
                lines[key] = fit_line(prober, batch, False, ctx.meter)
            fixed, per_sample, _ = lines[key]
            need = int(fixed + per_sample * batch)
            if need > usable:
                return False, need, (f"module {i + 1} ({plans[i].num_blocks} blocks, "
                                     f"{plans[i].head} head) needs {format_bytes(need)}, over "
                                     f"the usable {format_bytes(usable)}")
            largest = max(largest, need)
        return True, largest, (f"its largest module needs {format_bytes(largest)}, within the "
                               f"usable {format_bytes(usable)}")

    return verdict

