"""Sequential mode across processes: each module trained data-parallel over every rank.

Single-process sequential mode (edgetrain/training/scheduler.py, ``train_sequential``) trains
module 1 for E epochs, freezes it, caches its outputs, then module 2 on that cache, and so on.
Here every rank is a replica of the one module in training (``--replicas`` = the world size):

    for each module k:
        every rank: module k built with the single-process run's seed (same initial weights)
        for each epoch:
            every rank: each batch exactly as one process draws it (raw data for module 1,
                        cache k-1 for the others, same order and augmentation seeds), cut
                        into R shards; this rank steps on its shard, the update averaged over
                        the ranks (replicas.Replicas: DistributedDataParallel)
            every rank: its shard of the test set; the accuracy summed over the ranks
            rank 0:     the epoch checkpoint and the log line
        every rank: its share of cache k (batch i of each split on rank i mod R), sent to
                    rank 0, which writes it (every training view and the test set)
        rank 0:     modules/module_k, the "module" log line; the others wait at a barrier
    rank 0:     the stitched network, its test accuracy

The result equals one process training at the same global batch in micro-batches of one
rank's shard (BatchNorm normalises each shard on its own), up to the order of floating-point
sums: what replicas.py shows for the pipeline's replicas holds here module by module.

Where the cache lives: rank 0 writes it into ``--out``, and every rank reads its batches from
there, so ``--out`` must be a folder every rank sees (one machine, or a shared file system).
Each rank reads only its shard's rows of every batch from the cache (the batch order is
drawn the same on every rank); raw images (module 1, or --cache none) are drawn whole and cut.

The cache pass is shared: each rank computes the outputs of every R-th batch and sends them
to rank 0 (the data group: gloo on the CPU, NCCL on GPUs), which writes the one cache in
sample order, as a single process writes it. Every rank reads every input batch of the pass
(module 1's images, or cache k-1) and computes only its own. Multi-lap training, batch growth
and the ORT backend are refused with --distributed (config.py).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from edgetrain.distributed.replicas import (
    batch_sizes,
    reduce_stats,
    reduce_sum,
    shard_size,
    take_shard,
)
from edgetrain.distributed.stage import (
    Stage,
    Timers,
    check_replicas_agree,
    checkpoint_parts,
    payload_of,
)
from edgetrain.distributed.topology import Topology, barrier, talking
from edgetrain.training import scheduler
from edgetrain.training.checkpoints import (
    CheckpointDamagedError,
    NonFiniteWeightsError,
    load_checkpoint,
    save_checkpoint,
)
from edgetrain.training.phase import Optim, Phase
from edgetrain.training.steps import NonFiniteLossError, freeze
from edgetrain.training.transport import Multipliers


def train_sequential_replicas(ctx, topo: Topology, micros: list[list[int]],
                              checkpointing: list[bool]) -> dict:
    """Train every module in turn on all ranks; rank 0 writes what single-process sequential
    mode writes. Returns the outcome ``run._finish`` reports (the network and records on rank
    0 only)."""
    cfg = ctx.config
    n_train = len(ctx.data.train)
    sizes = batch_sizes(n_train, cfg.batch_size)
    done = _finished(ctx, topo)
    totals = Timers()
    records: list[dict] = []
    frozen: list[torch.nn.Module] = []  # --cache none: the trained modules, recomputed
    start = time.perf_counter()
    for k in range(len(ctx.plans)):
        if k in done:
            records.append(done[k])
            _skip_finished(ctx, topo, k, done, frozen)
            continue
        ctx.meter.reset()
        t = time.perf_counter()
        # The replicas of module k agree on one micro-batch: the smallest any rank planned.
        micro = min(m[k] for m in micros)
        stage = Stage(ctx, k, topo, micro, cfg.epochs * len(sizes), checkpointing[k])
        accuracy = _train_module(ctx, topo, stage, k, sizes, frozen)
        _add(totals, stage.timers)
        train_time, train_peak = time.perf_counter() - t, ctx.meter.read().peak_bytes
        stage.close()  # DDP's buckets and the gradients go before the cache pass,
        module, head = freeze(stage.module), freeze(stage.head)
        del stage  # and the optimizer's momentum
        records.append(_finish_module(ctx, topo, k, module, head, accuracy, train_time,
                                      train_peak))
        if cfg.cache == "none":
            frozen.append(module)
        del module, head
    if topo.rank == 0 and cfg.cache == "disk":
        ctx.run.remove("cache")  # every rank has passed the last module's barrier
    train_time = time.perf_counter() - start
    network = accuracy = None
    if topo.rank == 0:
        stitched = scheduler.stitch(ctx)
        accuracy = scheduler.test_accuracy(ctx, stitched)
        network = stitched.state_dict()
    images = n_train * cfg.epochs  # each image through the whole network, once per epoch
    return {"kind": "sequential", "modules": records, "network": network,
            "accuracy": accuracy, "images": images,
            "rank": {"train_time_s": round(train_time, 3),
                     "images_per_s": round(images / max(train_time, 1e-9), 1),
                     "micro_batch": min(min(m) for m in micros),
                     "checkpointing": any(checkpointing), **totals.as_dict(),
                     "communication_wait_s": round(totals.allreduce_s + totals.sync_s, 3)}}


def _train_module(ctx, topo: Topology, stage: Stage, k: int, sizes: list[int],
                  frozen: list[torch.nn.Module]) -> float | None:
    """Module k's epochs on this rank (from its epoch checkpoint, if any); returns the head's
    last test accuracy (every rank has it)."""
    cfg = ctx.config
    shard = cfg.batch_size // topo.replicas
    first = _start(ctx, topo, stage, k, len(sizes))
    accuracy = None
    with ctx.bars.task(f"module {k + 1}/{len(ctx.plans)} ({topo.world_size} ranks)",
                       total=cfg.epochs * len(sizes)) as update:
        update(advance=first * len(sizes))
        for epoch in range(first, cfg.epochs):
            batches = _shards(ctx, k, epoch, frozen, shard, topo.replica, topo.replicas,
                              sizes)
            status = f"epoch {epoch + 1}/{cfg.epochs}"
            stats = stage.train_epoch(batches, epoch,
                                      progress=lambda status=status: update(status=status))
            last = epoch == cfg.epochs - 1
            full = half = None
            if cfg.eval_every_epoch or last:
                t = time.perf_counter()
                full, half = _evaluate(ctx, topo, stage, k, epoch, frozen)
                stage.timers.eval_s += time.perf_counter() - t
            accuracy = full
            t = time.perf_counter()
            stats = reduce_stats(topo, stats)
            check_replicas_agree(topo, stage, epoch, name="module")
            if topo.rank == 0:
                _checkpoint(ctx, stage, k, epoch)
                ctx.run.log("epoch", module=k, epoch=epoch, lr=stage.opt.lr,
                            test_accuracy=full, test_accuracy_half=half,
                            **({"tau": stage.multipliers.tau}
                               if stage.multipliers is not None else {}),
                            **stats.as_dict())
            stage.timers.sync_s += time.perf_counter() - t
    if first >= cfg.epochs:
        # Resumed after the module's last epoch checkpoint: only its evaluation is missing.
        accuracy, _ = _evaluate(ctx, topo, stage, k, cfg.epochs - 1, frozen)
    return accuracy


def _shards(ctx, k: int, epoch: int, frozen: list, shard: int, replica: int, replicas: int,
            sizes: list[int]):
    """``(x, y, shards)`` of each batch of the epoch: this rank's shard (None where it is
    empty) and every replica's shard size, as :meth:`Stage.train_epoch` takes them. From the
    disk cache a rank reads its own rows only (the batch order is the same on every rank);
    raw data (module 1, or --cache none) is drawn whole, as one process draws it, and cut."""
    from_cache = k > 0 and ctx.config.cache == "disk"
    part = (replica * shard, shard) if from_cache else None
    batches = scheduler.module_inputs(ctx, k, True, epoch, frozen, part=part)
    for size, (x, y) in zip(sizes, batches, strict=True):
        shards = [shard_size(size, shard, i) for i in range(replicas)]
        if not from_cache:
            x, y = take_shard(x, y, shard, replica)
        if shards[replica] == 0:
            yield None, None, shards
            continue
        yield x, y, shards


@torch.inference_mode()
def _evaluate(ctx, topo: Topology, stage: Stage, k: int, epoch: int,
              frozen: list[torch.nn.Module]) -> tuple[float, float]:
    """Module k's head on the test set (whole, and the authors' fixed half): each rank its
    shard of every test batch, the counts summed over the ranks."""
    stage.module.eval()
    stage.head.eval()
    n_test = len(ctx.data.test)
    batch = ctx.inference_batch_size(k)
    shard = max(1, -(-batch // topo.replicas))
    from_cache = k > 0 and ctx.config.cache == "disk"
    inputs = scheduler.module_inputs(ctx, k, False, epoch, frozen,
                                     part=(topo.replica * shard, shard) if from_cache else None)
    correct = correct_half = seen_half = 0
    for start, (x, y) in zip(range(0, n_test, batch), inputs, strict=True):
        begin = start + topo.replica * shard
        xs, ys = (x, y) if from_cache else take_shard(x, y, shard, topo.replica)
        if len(ys) == 0:
            continue
        right = stage.head(stage.module(xs, need_transport=False)[0]).argmax(1) == ys
        in_half = ctx.test_half[begin:begin + len(ys)].to(right.device)
        correct += int(right.sum())
        correct_half += int((right & in_half).sum())
        seen_half += int(in_half.sum())
    correct, correct_half, seen_half = reduce_sum(
        topo, [correct, correct_half, seen_half], f"adding up module {k + 1}'s test accuracy")
    return correct / max(n_test, 1), correct_half / max(seen_half, 1)


def _finish_module(ctx, topo: Topology, k: int, module, head, accuracy: float | None,
                   train_time: float, train_peak: int) -> dict:
    """Cache k (every rank computes a share, rank 0 writes it), then on rank 0 the module file
    and its log line (single-process sequential mode's order: a run killed before the log line
    redoes the module from its last checkpoint). The other ranks wait for it."""
    result = None
    cache_time, cache_peak = 0.0, None
    if scheduler.writes_cache(ctx, k):
        ctx.meter.reset()
        t = time.perf_counter()
        cached = _cache_together(ctx, topo, k, module, head)
        accuracy = cached if cached is not None else accuracy
        cache_time, cache_peak = time.perf_counter() - t, ctx.meter.read().peak_bytes
    if topo.rank == 0:
        scheduler._save_module(ctx, k, module, head, ctx.config.epochs - 1,
                               {"module": k, "lap": 0,
                                "blocks": f"{ctx.plans[k].start}:{ctx.plans[k].stop}"})
        result = {**scheduler._module_result(ctx, k, accuracy, train_time, train_peak,
                                             cache_time, cache_peak),
                  "ranks": list(range(topo.world_size))}
        ctx.run.log("module", **result)
        ctx.run.checkpoint_path(ctx.checkpoint_name(k)).unlink(missing_ok=True)
        if k > 0:
            ctx.run.remove(f"cache/module_{k - 1}")  # module k+1 reads only cache k
    barrier(topo, f"rank 0 writing module {k + 1}'s cache and weights")
    return result


@torch.inference_mode()
def _cache_together(ctx, topo: Topology, k: int, module, head) -> float | None:
    """Module k's cache, computed by every rank and written by rank 0: batch i of each split
    on rank ``i mod R``, its outputs sent to rank 0 in order. Returns the head's test accuracy
    (on rank 0; None elsewhere). Memory on rank 0: one batch of outputs at a time."""
    plan = ctx.plans[k]
    shape = (plan.out_channels, plan.out_size, plan.out_size)
    ranks, me = topo.world_size, topo.rank
    accuracy = None
    for split, train, view in scheduler.cache_splits(ctx):
        correct = 0
        writer = scheduler.cache_writer(ctx, k, split) if me == 0 else None
        try:
            for i, (x, y) in enumerate(scheduler.cache_inputs(ctx, k, split, train, view)):
                owner = i % ranks
                if owner == me:
                    out, _ = module(x, need_transport=False)
                    if not train:
                        correct += int((head(out).argmax(1) == y).sum())
                    if me != 0:
                        with talking(topo, f"sending batch {i + 1} of cache {k + 1} ({split})",
                                     0):
                            dist.send(out.contiguous(), 0, group=topo.data_group)
                        continue
                elif me == 0:
                    out = torch.empty(len(y), *shape, device=ctx.device)
                    with talking(topo, f"receiving batch {i + 1} of cache {k + 1} ({split})",
                                 owner):
                        dist.recv(out, owner, group=topo.data_group)
                else:
                    continue
                writer.append(out, y)
                del out
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()
        if not train:
            total = reduce_sum(topo, [correct], f"adding up module {k + 1}'s test accuracy")[0]
            accuracy = total / max(len(ctx.data.test), 1) if me == 0 else None
    return accuracy


# -- resume: rank 0 reads, every rank learns ---------------------------------------------------

def _finished(ctx, topo: Topology) -> dict[int, dict]:
    """Modules an earlier run of this folder finished (rank 0 reads the log and checks the
    files; every rank learns which)."""
    done = {k: r for (lap, k), r in ctx.finished_modules().items() if lap == 0} \
        if topo.rank == 0 and ctx.config.resume else {}
    box = [done]
    with talking(topo, "learning which modules are finished", 0):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _skip_finished(ctx, topo: Topology, k: int, done: dict, frozen: list) -> None:
    """A module finished by an earlier run: with --cache none every rank needs its weights
    (rank 0 sends them); with the disk cache, rank 0 checks (and if need be rebuilds) the
    cache the next unfinished module reads."""
    if ctx.config.cache == "none":
        state = None
        if topo.rank == 0:
            module, _ = scheduler.load_module(ctx, k)
            state = {n: t.cpu() for n, t in module.state_dict().items()}
        box = [state]
        with talking(topo, f"receiving finished module {k + 1}'s weights", 0):
            dist.broadcast_object_list(box, src=0)
        from edgetrain.models.network import build_module

        module = build_module(ctx.spec, ctx.plans[k])
        module.load_state_dict(box[0])
        frozen.append(freeze(module.to(ctx.device)))
        return
    if topo.rank == 0 and k < len(ctx.plans) - 1 and k + 1 not in done:
        scheduler.ensure_cache(ctx, k)
    barrier(topo, f"rank 0 checking module {k + 1}'s cache")


def _start(ctx, topo: Topology, stage: Stage, k: int, steps_per_epoch: int) -> int:
    """The first epoch of module k: after its epoch checkpoint (rank 0 reads it, every rank
    loads the same state), or 0."""
    payload, first = None, 0
    if topo.rank == 0:
        payload, first = _read_checkpoint(ctx, k, steps_per_epoch)
    box = [(first, payload)]
    with talking(topo, f"learning where module {k + 1} starts", 0):
        dist.broadcast_object_list(box, src=0)
    first, payload = box[0]
    if first > 0:
        stage.load(payload)
    return first


def _read_checkpoint(ctx, k: int, steps_per_epoch: int) -> tuple[dict | None, int]:
    """Module k's epoch checkpoint, in single-process sequential mode's format and name (so
    either kind of run resumes the other's): its state and the epoch to continue from."""
    cfg = ctx.config
    path = ctx.run.checkpoint_path(ctx.checkpoint_name(k))
    if not path.exists():
        return None, 0
    # Built on the CPU to check and unpack the file; freed when the payload is sent.
    phase = Phase.module(ctx.spec, ctx.plans[k], ctx.num_classes, torch.device("cpu"),
                         Optim.of(cfg), cfg.epochs * steps_per_epoch, ctx.taus[k])
    parts = {"module": phase.model, "head": phase.head}
    multipliers = Multipliers() if cfg.tau_schedule == "multipliers" else None
    if multipliers is not None:
        parts["multipliers"] = multipliers
    try:
        first = load_checkpoint(path, parts, {"opt": (phase.opt, phase.sched)},
                                torch.device("cpu"), cfg.epochs, ctx.run.run_id) + 1
    except CheckpointDamagedError as e:
        ctx.run.log("checkpoint_discarded", phase=ctx.checkpoint_name(k), reason=str(e))
        path.unlink()
        return None, 0
    ctx.run.log("resume", phase=ctx.checkpoint_name(k), epoch=first)
    return payload_of(phase.model, phase.head, phase.opt, phase.sched, multipliers), first


def _checkpoint(ctx, stage: Stage, k: int, epoch: int) -> None:
    """Rank 0: module k's epoch checkpoint, as single-process sequential mode writes it."""
    parts, optimizers = checkpoint_parts([stage.payload()], numbered=False)
    try:
        save_checkpoint(ctx.run.checkpoint_path(ctx.checkpoint_name(k)), epoch, parts,
                        optimizers, ctx.run.run_id)
    except NonFiniteWeightsError as e:
        raise NonFiniteLossError(k, epoch, None, "non-finite weights", str(e)) from None


def _add(totals: Timers, timers: Timers) -> None:
    for name, value in vars(timers).items():
        setattr(totals, name, getattr(totals, name) + value)
