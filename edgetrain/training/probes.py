"""Probers: build one training phase, run a few steps at a given batch size, free it.

The planner (edgetrain/memory/planner.py) measures these to predict each phase's peak.
Inputs are random tensors of the phase's real input shape: memory depends on shapes, not values.
"""

from __future__ import annotations

import torch.nn.functional as F

from edgetrain.memory.planner import PROBE_STEPS, Prober, random_batch
from edgetrain.models.network import build_head, build_module, build_network, set_checkpointing
from edgetrain.training.steps import greedy_step, make_optimizer


def module_prober(ctx, k: int) -> Prober:
    """Module ``k`` and its head, as sequential mode trains them."""
    plan = ctx.plans[k]
    shape = (plan.in_channels, plan.in_size, plan.in_size)
    cfg = ctx.config

    def prober(batch_size: int, checkpointing: bool) -> None:
        module = build_module(ctx.spec, plan).to(ctx.device)
        head = build_head(plan, ctx.num_classes).to(ctx.device)
        set_checkpointing(module, checkpointing)
        opt, _ = make_optimizer([*module.parameters(), *head.parameters()], cfg.lr,
                                cfg.momentum, cfg.weight_decay, PROBE_STEPS)
        for _ in range(PROBE_STEPS):
            x, y = random_batch(shape, batch_size, ctx.num_classes, ctx.device)
            greedy_step(module, head, x, y, ctx.taus[k], 0.0, opt)
        del module, head, opt, x, y

    return prober


def parallel_prober(ctx) -> Prober:
    """All modules, heads and optimizers, one batch flowing through them all."""
    cfg = ctx.config
    info = ctx.data.info
    shape = (info.in_channels, info.image_size, info.image_size)

    def prober(batch_size: int, checkpointing: bool) -> None:
        parts = []
        for plan in ctx.plans:
            module = build_module(ctx.spec, plan).to(ctx.device)
            head = build_head(plan, ctx.num_classes).to(ctx.device)
            set_checkpointing(module, checkpointing)
            opt, _ = make_optimizer([*module.parameters(), *head.parameters()], cfg.lr,
                                    cfg.momentum, cfg.weight_decay, PROBE_STEPS)
            parts.append((module, head, opt))
        for _ in range(PROBE_STEPS):
            x, y = random_batch(shape, batch_size, ctx.num_classes, ctx.device)
            for k, (module, head, opt) in enumerate(parts):
                x, _ = greedy_step(module, head, x, y, ctx.taus[k], 0.0, opt)
        del parts, x, y

    return prober


def end_to_end_prober(ctx) -> Prober:
    cfg = ctx.config
    info = ctx.data.info
    shape = (info.in_channels, info.image_size, info.image_size)

    def prober(batch_size: int, checkpointing: bool) -> None:
        network = build_network(ctx.spec, ctx.plans, ctx.num_classes).to(ctx.device)
        set_checkpointing(network, checkpointing)
        opt, _ = make_optimizer(network.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay,
                                PROBE_STEPS)
        for _ in range(PROBE_STEPS):
            x, y = random_batch(shape, batch_size, ctx.num_classes, ctx.device)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(network(x), y).backward()
            opt.step()
        del network, opt, x, y

    return prober


def phases(ctx) -> list[tuple[str, Prober]]:
    """The phases of this run, in training order, each with its prober."""
    cfg = ctx.config
    if cfg.method == "e2e":
        return [("end-to-end network", end_to_end_prober(ctx))]
    if cfg.mode == "parallel":
        return [(f"all {len(ctx.plans)} modules (parallel)", parallel_prober(ctx))]
    return [(f"module {k + 1}", module_prober(ctx, k)) for k in range(len(ctx.plans))]

