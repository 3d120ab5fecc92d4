"""``--memory-budget`` per rank: each rank plans only what it holds.

The budget is what one device has, so it applies to each rank on its own. A pipeline rank
holds one module, its head and optimizer, plus the batches in flight: up to ``--in-flight``
outgoing outputs and two incoming inputs (edgetrain/distributed/transport.py). Its probe
builds exactly that and runs a few steps at the shard size (``--batch-size / --replicas``);
the planner (edgetrain/memory/planner.py) then picks the shard's micro-batch or
checkpointing as for any phase. In sequential mode each rank plans every module at the shard
size, as single-process sequential mode plans it at the batch size.

With replicas, DistributedDataParallel keeps the gradients in its buckets for the whole step
(edgetrain/distributed/replicas.py), where one process frees them before the forward pass:
the probe holds a gradient-sized buffer besides, which counts them at the forward pass's peak
(and twice during backward, erring on the safe side).

Replicas of one stage use the smallest micro-batch any of them planned (so they agree on how
often BatchNorm's statistics were updated: edgetrain/distributed/replicas.py), and the test
set flows through the pipeline in shards of the smallest micro-batch of all ranks.
"""

from __future__ import annotations

from edgetrain.memory.planner import PROBE_STEPS, MemoryPlan, Prober, make_plan, random_batch
from edgetrain.records import RecordError
from edgetrain.training.phase import Optim, Phase


def stage_prober(ctx, k: int, incoming: int, outgoing: int, buckets: bool = False
                 ) -> Prober:
    """Module ``k``'s step with ``incoming`` input batches and ``outgoing`` output batches
    held besides (the in-flight buffers of a pipeline rank), and with ``buckets`` a buffer
    the size of the gradients (DDP's, with replicas)."""
    plan = ctx.plans[k]
    shape = (plan.in_channels, plan.in_size, plan.in_size)
    out_shape = (plan.out_channels, plan.out_size, plan.out_size)
    cfg = ctx.config

    def prober(batch_size: int, checkpointing: bool) -> None:
        import torch

        phase = Phase.module(ctx.spec, plan, ctx.num_classes, ctx.device, Optim.of(cfg),
                             PROBE_STEPS, ctx.taus[k], checkpointing=checkpointing)
        held = [torch.randn(batch_size, *shape, device=ctx.device) for _ in range(incoming)]
        held += [torch.randn(batch_size, *out_shape, device=ctx.device)
                 for _ in range(outgoing)]
        if buckets:
            held.append(torch.zeros(sum(p.numel() for p in phase.opt.params),
                                    device=ctx.device))
        for _ in range(PROBE_STEPS):
            x, y = random_batch(shape, batch_size, ctx.num_classes, ctx.device)
            phase.step(x, y)
        del phase, x, y, held

    return prober


def rank_phases(ctx, topo, in_flight: int) -> list[tuple[str, Prober]]:
    """The phases this rank trains, each with its prober."""
    who = topo.describe()
    if topo.stages > 1 or ctx.config.mode == "parallel":
        k = topo.stage
        incoming = 2 if k > 0 else 0
        outgoing = in_flight if k < topo.stages - 1 else 0
        return [(f"{who}: module {k + 1}",
                 stage_prober(ctx, k, incoming, outgoing, topo.replicas > 1))]
    return [(f"{who}: module {k + 1}", stage_prober(ctx, k, 0, 0, topo.replicas > 1))
            for k in range(len(ctx.plans))]


def plan_rank(ctx, topo, in_flight: int, shard: int, framework_bytes: int) -> MemoryPlan:
    budget = ctx.config.memory_budget
    return make_plan(rank_phases(ctx, topo, in_flight), shard, budget.bytes, ctx.meter,
                     framework_bytes=framework_bytes, budget_text=str(budget))


def combined(plans: list[MemoryPlan]) -> MemoryPlan:
    """Every rank's phases in one plan (rank order): plan.json of a distributed run."""
    first = plans[0]
    return MemoryPlan(first.budget_bytes, first.usable_bytes, first.safety_margin, first.meter,
                      [p for plan in plans for p in plan.phases],
                      max(p.probe_time_s for p in plans))


def stored_plan(ctx, stored, world_size: int, per_rank: int, shard: int
                ) -> MemoryPlan | None:
    """The resumed run's plan as it was made, if the budget and batch are unchanged: a
    resumed run trains as planned (its micro-batches decide its BatchNorm statistics)."""
    config = ctx.config
    if stored is None or stored.memory_budget != config.memory_budget or \
            stored.batch_size != config.batch_size or not ctx.run.plan_path.exists():
        return None
    try:
        return MemoryPlan.read(ctx.run.plan_path, world_size * per_rank, shard)
    except RecordError as e:
        ctx.run.log("plan_remade", reason=str(e))
        return None


def slice_plan(plan: MemoryPlan, rank: int, per_rank: int) -> MemoryPlan:
    return MemoryPlan(plan.budget_bytes, plan.usable_bytes, plan.safety_margin, plan.meter,
                      plan.phases[rank * per_rank:(rank + 1) * per_rank], plan.probe_time_s)
