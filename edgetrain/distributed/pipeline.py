"""Parallel mode across processes: a pipeline of modules, one module per rank.

Single-process parallel mode (edgetrain/training/scheduler.py, ``train_parallel``) runs, for
every batch t, module 1's step, then module 2's step on module 1's detached output, and so on.
Module k's step on batch t needs exactly two things: its input (module k-1's forward output
on batch t, computed before module k-1's own update at t) and its own weights after its steps
0..t-1. No gradient goes back. So the modules can run on K processes at once, each on a
different batch, and compute exactly the same weights::

    rank of stage k (replica r), each epoch:
        for t in batches:
            x, y = stage 0: batch t of the epoch (same seeds as one process), this replica's
                   shard;  stage k > 0: received from stage k-1         (transport.Inbox)
            out = greedy_step(module k, head k, x, y)   # backward + SGD step, this rank only
                  (with replicas: DDP all-reduces the gradient over the stage's replicas)
            send (out, y) to stage k+1, at most --in-flight undelivered  (transport.Outbox)
        evaluate: the test set flows through the pipeline the same way (eval mode)
        epoch's numbers and state -> rank 0, which writes the checkpoint and the log

The pipeline drains at every epoch's end (evaluation and the checkpoint need every stage at
the same epoch): K - 1 steps of idle time per epoch on the first stage, little against
hundreds of steps. Rank 0 holds the whole network's weights and momentum only while it writes
a checkpoint or the final files; it never runs more than its own module.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

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
    check_replicas_agree,
    checkpoint_parts,
    input_shape,
    payload_of,
)
from edgetrain.distributed.topology import Topology, talking
from edgetrain.distributed.transport import Inbox, Outbox
from edgetrain.training.checkpoints import (
    CheckpointDamagedError,
    NonFiniteWeightsError,
    load_checkpoint,
    save_checkpoint,
)
from edgetrain.training.phase import Optim, Phase
from edgetrain.training.steps import NonFiniteLossError, test_half
from edgetrain.training.transport import Multipliers

CHECKPOINT = "parallel"
"""The epoch checkpoint's name: single-process parallel mode's, in its layout, so either kind
of run can resume the other's (with --replicas 1 they compute the same)."""


@dataclass
class PipelineResult:
    """What rank 0 knows when training ends."""

    payloads: list[dict] | None
    """Every stage's final state (rank 0 only)."""
    accuracies: list[float | None]
    halves: list[float | None]
    train_time_s: float
    first_epoch: int


def train_pipeline(ctx, topo: Topology, stage_micro: int, eval_shard: int,
                   in_flight: int, checkpointing: bool) -> tuple[Stage, PipelineResult]:
    """Train this rank's stage for the run's epochs; return it and (on rank 0) the results."""
    cfg = ctx.config
    k, r, R = topo.stage, topo.replica, topo.replicas
    shard = cfg.batch_size // R
    n_train = len(ctx.data.train)
    sizes = batch_sizes(n_train, cfg.batch_size)
    stage = Stage(ctx, k, topo, stage_micro, cfg.epochs * len(sizes), checkpointing)
    outbox = Outbox(topo, topo.next, in_flight) if topo.next is not None else None
    first = _start(ctx, topo, stage)
    start = time.perf_counter()
    accuracies: list = [None] * topo.stages
    halves: list = [None] * topo.stages
    payloads = None
    with ctx.bars.task(f"stage 1 of {topo.stages} (rank 0; {topo.world_size} ranks)",
                       total=cfg.epochs * len(sizes)) as update:
        update(advance=first * len(sizes))
        for epoch in range(first, cfg.epochs):
            if k == 0:
                batches = _first_stage_batches(ctx, r, shard, epoch, R)
                inbox = None
            else:
                inbox = Inbox(topo, topo.previous, [
                    (shard_size(b, shard, r), *input_shape(ctx, k)) for b in sizes
                    if shard_size(b, shard, r)], f"epoch {epoch + 1}'s training batches")
                batches = _received(inbox, sizes, shard, r, R)
            status = f"epoch {epoch + 1}/{cfg.epochs}"
            stats = stage.train_epoch(
                batches, epoch,
                on_output=None if outbox is None else functools.partial(
                    _send_output, outbox, f"epoch {epoch + 1}"),
                progress=functools.partial(update, status=status))
            if inbox is not None:
                stage.timers.recv_wait_s += inbox.wait_s
            evaluate = cfg.eval_every_epoch or epoch == cfg.epochs - 1
            payloads, accuracies, halves = _end_epoch(ctx, topo, stage, outbox, epoch, stats,
                                                      evaluate, eval_shard)
        if first >= cfg.epochs:
            # Resumed after the last epoch's checkpoint: only the evaluation is missing.
            payloads, accuracies, halves = _end_epoch(ctx, topo, stage, outbox,
                                                      cfg.epochs - 1, None, True, eval_shard)
    if outbox is not None:
        outbox.flush()
        stage.timers.send_wait_s = outbox.wait_s
    return stage, PipelineResult(payloads, accuracies, halves, time.perf_counter() - start,
                                 first)


def _send_output(outbox: Outbox, epoch: str, out: torch.Tensor, y: torch.Tensor,
                 step: int) -> None:
    outbox.send(out, y, f"batch {step + 1} of {epoch}")


def _first_stage_batches(ctx, replica: int, shard: int, epoch: int, replicas: int):
    """Stage 0: the epoch's batches exactly as single-process parallel mode draws them
    (order and augmentation seeded by the epoch), then this replica's shard. Each replica
    draws (and augments) the whole batch so that every shard is the one a single process
    would cut; the images are small against a module's step."""
    from edgetrain.training.scheduler import raw_batches

    for x, y in raw_batches(ctx, True, True, epoch, epoch):
        shards = [shard_size(len(y), shard, i) for i in range(replicas)]
        if shards[replica] == 0:
            yield None, None, shards
            continue
        xs, ys = take_shard(x, y, shard, replica)
        del x, y
        yield xs, ys, shards


def _received(inbox: Inbox, sizes: list[int], shard: int, replica: int, replicas: int):
    for batch in sizes:
        shards = [shard_size(batch, shard, i) for i in range(replicas)]
        if shards[replica] == 0:
            yield None, None, shards
            continue
        x, y = next(inbox)
        yield x, y, shards


def _end_epoch(ctx, topo: Topology, stage: Stage, outbox: Outbox | None, epoch: int, stats,
               evaluate: bool, eval_shard: int):
    """Evaluate through the pipeline; rank 0 gathers numbers and states, checkpoints, logs."""
    full = half = None
    if evaluate:
        t = time.perf_counter()
        full, half = evaluate_stage(ctx, topo, stage, outbox, eval_shard)
        stage.timers.eval_s += time.perf_counter() - t
    t = time.perf_counter()
    if stats is not None:
        stats = reduce_stats(topo, stats)
    check_replicas_agree(topo, stage, epoch)
    numbers = {"stats": stats.as_dict() if stats is not None else None, "full": full,
               "half": half, "lr": stage.opt.lr,
               "tau": stage.multipliers.tau if stage.multipliers is not None else None}
    payloads = accuracies = halves = None
    if topo.rank == 0:
        received = [{**numbers, "state": stage.payload()}]
        for s in range(1, topo.stages):
            box = [None]
            source = topo.rank_of(s, 0)
            with talking(topo, f"collecting stage {s + 1}'s state after epoch {epoch + 1}",
                         source):
                dist.recv_object_list(box, src=source)
            received.append(box[0])
        payloads = [p.pop("state") for p in received]
        accuracies = [p["full"] for p in received]
        halves = [p["half"] for p in received]
        if stats is not None:
            _checkpoint(ctx, epoch, payloads)
            for s, p in enumerate(received):
                ctx.run.log("epoch", module=s, epoch=epoch, lr=p["lr"],
                            test_accuracy=p["full"], test_accuracy_half=p["half"],
                            **({"tau": p["tau"]} if p["tau"] is not None else {}),
                            **p["stats"])
    elif topo.replica == 0:
        with talking(topo, f"sending stage {topo.stage + 1}'s state to rank 0", 0):
            dist.send_object_list([{**numbers, "state": stage.payload()}], dst=0)
    stage.timers.sync_s += time.perf_counter() - t
    return payloads, accuracies, halves


@torch.inference_mode()
def evaluate_stage(ctx, topo: Topology, stage: Stage, outbox: Outbox | None, eval_shard: int
                   ) -> tuple[float, float]:
    """This stage's head accuracy on the test set (whole, and the authors' fixed half), the
    test batches flowing through the pipeline as training batches do; replicas share the test
    set the same way."""
    from edgetrain.training.scheduler import raw_batches

    k, r, R = topo.stage, topo.replica, topo.replicas
    n_test = len(ctx.data.test)
    batch = eval_shard * R
    sizes = batch_sizes(n_test, batch)
    half = test_half(n_test, ctx.config.seed)
    stage.module.eval()
    stage.head.eval()
    if k == 0:
        inputs = (take_shard(x, y, eval_shard, r)
                  for x, y in raw_batches(ctx, False, False, None, batch_size=batch))
    else:
        inputs = Inbox(topo, topo.previous, [
            (shard_size(b, eval_shard, r), *input_shape(ctx, k)) for b in sizes
            if shard_size(b, eval_shard, r)], "the test batches")
    correct = correct_half = seen_half = 0
    for t, size in enumerate(sizes):
        mine = shard_size(size, eval_shard, r)
        if mine == 0:
            if k == 0:
                next(inputs)  # the batch is drawn for every replica; this one's is empty
            continue
        x, y = next(inputs)
        out, _ = stage.module(x, need_transport=False)
        if outbox is not None:
            outbox.send(out, y, f"test batch {t + 1}")
        right = stage.head(out).argmax(1) == y
        begin = t * batch + r * eval_shard
        in_half = half[begin:begin + mine].to(right.device)
        correct += int(right.sum())
        correct_half += int((right & in_half).sum())
        seen_half += int(in_half.sum())
    if isinstance(inputs, Inbox):
        stage.timers.recv_wait_s += inputs.wait_s
    correct, correct_half, seen_half = reduce_sum(
        topo, [correct, correct_half, seen_half], "adding up the test accuracy")
    return correct / max(n_test, 1), correct_half / max(seen_half, 1)


def _checkpoint(ctx, epoch: int, payloads: list[dict]) -> None:
    parts, optimizers = checkpoint_parts(payloads)
    try:
        save_checkpoint(ctx.run.checkpoint_path(CHECKPOINT), epoch, parts, optimizers,
                        ctx.run.run_id)
    except NonFiniteWeightsError as e:
        raise NonFiniteLossError(None, epoch, None, "non-finite weights", str(e)) from None


def _start(ctx, topo: Topology, stage: Stage) -> int:
    """The first epoch to train. Rank 0 reads the epoch checkpoint (if any), checks it
    against every module's shapes, and sends each rank its stage's state."""
    payloads, first = None, 0
    if topo.rank == 0:
        payloads, first = _read_checkpoint(ctx)
    box = [first]
    with talking(topo, "learning where training starts", 0):
        dist.broadcast_object_list(box, src=0)
    first = box[0]
    if first == 0:
        return 0
    if topo.rank == 0:
        for rank in range(1, topo.world_size):
            with talking(topo, "sending the checkpoint's state", rank):
                dist.send_object_list([payloads[rank % topo.stages]], dst=rank)
        mine = payloads[0]
    else:
        box = [None]
        with talking(topo, "receiving the checkpoint's state from rank 0", 0):
            dist.recv_object_list(box, src=0)
        mine = box[0]
    stage.load(mine)
    return first


def _read_checkpoint(ctx) -> tuple[list[dict] | None, int]:
    """Every stage's state in the run's epoch checkpoint and the epoch to continue from;
    ``(None, 0)`` for a fresh start (also when the checkpoint is damaged: it is discarded and
    the log says why, as in single-process training)."""
    cfg = ctx.config
    path = ctx.run.checkpoint_path(CHECKPOINT)
    if not path.exists():
        return None, 0
    steps = cfg.epochs * len(batch_sizes(len(ctx.data.train), cfg.batch_size))
    parts, optimizers, built = {}, {}, []
    # Built on the CPU, weights only, to check and unpack the file: freed right after.
    for k, plan in enumerate(ctx.plans):
        phase = Phase.module(ctx.spec, plan, ctx.num_classes, torch.device("cpu"),
                             Optim.of(cfg), steps, ctx.taus[k])
        module, head, opt, sched = phase.model, phase.head, phase.opt, phase.sched
        parts[f"module{k}"], parts[f"head{k}"] = module, head
        if cfg.tau_schedule == "multipliers":
            parts[f"multipliers{k}"] = Multipliers()
        optimizers[f"opt{k}"] = (opt, sched)
        built.append((module, head, opt, sched, parts.get(f"multipliers{k}")))
    try:
        first = load_checkpoint(path, parts, optimizers, torch.device("cpu"), cfg.epochs,
                                ctx.run.run_id) + 1
    except CheckpointDamagedError as e:
        ctx.run.log("checkpoint_discarded", phase=CHECKPOINT, reason=str(e))
        path.unlink()
        return None, 0
    ctx.run.log("resume", phase=CHECKPOINT, epoch=first)
    payloads = [payload_of(*parts) for parts in built]
    return payloads, first
