"""Data-parallel replicas of one module: DistributedDataParallel within the stage's group.

With ``--replicas R`` every batch of ``B`` samples is cut into R shards of ``m = B / R``
(``x.split(m)``: the last, short batch may leave the last replicas with a smaller shard or
none). Replica i trains on shard i. The single-process run this equals, up to the order of
floating-point sums, is the same global batch trained in micro-batches of ``m`` (what the
planner's gradient accumulation does): each micro-batch normalises with its own BatchNorm
statistics, exactly as each replica does.

The gradients: :class:`Replicas` wraps the module and its head (``Joint``) in
``torch.nn.parallel.DistributedDataParallel`` over the stage's process group (gloo or NCCL),
and :func:`edgetrain.training.steps.greedy_step` runs the forward pass through it. DDP
all-reduces gradient buckets while backward is still running; with micro-batches only the
last one's backward communicates (the others run under ``no_sync``). DDP averages over the R
replicas, so each replica's loss is first multiplied by ``R * shard / B``: the average becomes
the sum weighted by each replica's share of the batch, which is what the single process
computes when shards differ (a short last batch). A replica whose shard of that batch is
empty still takes part (every rank must run the same backward passes): it steps on two zero
samples with its loss multiplied by 0, so its gradients are zero (``empty_step``). The
gradients live in DDP's buckets (``gradient_as_bucket_view``): no second gradient-sized
buffer. With activation checkpointing
(edgetrain's reentrant recompute), DDP runs with ``static_graph``, which that needs.

BatchNorm running statistics. In training mode they do not change what a step computes, only
evaluation and the saved model. The micro-batch run updates them once per micro-batch, in
order; DDP would copy rank 0's at every forward pass (``forward_sync_buffers``), which is
switched off. Instead,
:class:`ReplicaSGD`, the optimizer the replicas step with, combines them in one small
all-reduce before the SGD step so that they equal the micro-batch run's: with momentum a,
replica i having made c_i updates starting from the common value r0 and ended at r_i, the
sequential result is
``(1-a)^C r0 + sum_i (1-a)^(c_{i+1} + ... + c_{R-1}) (r_i - (1-a)^c_i r0)``, ``C = sum c_i``.
"""

from __future__ import annotations

import inspect
import math
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from edgetrain.distributed.topology import Topology, talking
from edgetrain.training.phase import Phase
from edgetrain.training.sgd import SGD
from edgetrain.training.steps import EpochStats, Joint
from edgetrain.training.transport import module_loss, transport_weight


def shard_size(batch: int, shard: int, index: int) -> int:
    """Samples of a ``batch`` that replica ``index`` trains on, with shards of ``shard``.

    >>> [shard_size(64, 32, i) for i in range(2)], [shard_size(24, 16, i) for i in range(2)]
    ([32, 32], [16, 8])
    >>> shard_size(10, 16, 1)
    0
    """
    return max(0, min(shard, batch - index * shard))


def take_shard(x: torch.Tensor, y: torch.Tensor, shard: int, index: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    start = index * shard
    return x[start:start + shard], y[start:start + shard]


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The size of each batch of one pass over ``n`` samples.

    >>> batch_sizes(150, 64)
    [64, 64, 22]
    """
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


# DDP's switch for copying replica 0's buffers at every forward pass: ``forward_sync_buffers``
# where torch has it (it deprecates ``broadcast_buffers``), ``broadcast_buffers`` in the older
# torch a device may ship (JetPack). This project's pinned torch takes the first.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(
                       DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


class Replicas:
    """Module ``phase.model`` and its head, trained by the R replicas of this rank's stage:
    ``DistributedDataParallel`` over ``Joint(model, head)`` in the stage's process group, and a
    :class:`ReplicaSGD` for the BatchNorm statistics. Built on every replica at the same time
    (DDP's constructor checks the parameters' shapes and broadcasts replica 0's weights: a
    collective). :meth:`close` drops DDP and its buckets; the module and head stay."""

    def __init__(self, phase: Phase, topo: Topology, micro_batch: int, checkpointing: bool):
        self.phase, self.topo = phase, topo
        self.grad_allreduce_s = 0.0
        devices = [topo.device.index] if topo.device.type == "cuda" else None
        with talking(topo, "setting up the replicas (DistributedDataParallel)",
                     peers=[r for r in topo.replica_ranks if r != topo.rank]):
            self.ddp = DistributedDataParallel(
                Joint(phase.model, phase.head), device_ids=devices,
                process_group=topo.stage_group, gradient_as_bucket_view=True,
                static_graph=checkpointing, **_NO_BUFFER_SYNC)
        self.ddp.register_comm_hook(self, _timed_allreduce)
        self.sgd = ReplicaSGD(phase.opt, [phase.model, phase.head], topo, micro_batch)
        phase.ddp, phase.step_opt = self.ddp, self.sgd

    @property
    def allreduce_s(self) -> float:
        """Waiting in the BatchNorm statistics' all-reduce (the gradients' overlaps backward:
        ``grad_allreduce_s``)."""
        return self.sgd.allreduce_s

    def begin(self, shards: list[int]) -> None:
        """This step's shard size of every replica (0: none)."""
        self.sgd.begin(shards)
        self.phase.loss_scale = self.topo.replicas * shards[self.topo.replica] / sum(shards)

    def empty_step(self, shape: tuple[int, ...], tau: float) -> None:
        """This replica's shard is empty (``shape``: one input sample's): it adds nothing but
        takes part in the gradient and statistics all-reduces, as every replica must.

        DDP needs the same backward on every replica (with ``static_graph``, the same graph as
        every other step), so this is an ordinary step on two zero samples with the loss
        multiplied by 0: every gradient is exactly zero. Two, because BatchNorm cannot
        normalise one sample at 1x1; their updates of its running statistics are undone.
        """
        self.sgd.zero_grad()
        x = torch.zeros(2, *shape, device=self.topo.device)
        y = torch.zeros(2, dtype=torch.long, device=self.topo.device)
        out, transport, logits = self.ddp(x, transport_weight(tau) > 0)
        loss, _ = module_loss(logits, y, transport, tau, self.phase.label_smoothing)
        (loss * 0).backward()
        del out, transport, logits, loss
        self.sgd.undo_statistics()
        self.sgd.step()

    def close(self) -> None:
        """Drop DDP (its buckets hold the gradients) and the gradients: the module and head
        are kept, frozen or saved by the caller."""
        self.phase.ddp, self.phase.step_opt = None, self.phase.opt
        for p in self.sgd.params:
            p.grad = None
        del self.ddp


def _timed_allreduce(replicas, bucket):
    """DDP's own all-reduce of one gradient bucket (sum, then divide by R), timed from launch
    to completion; it overlaps backward, so the time is in flight, not all waiting.
    (Unannotated: DDP checks the annotations' objects, which postponed evaluation makes
    strings.)"""
    start = time.perf_counter()

    def done(fut: torch.futures.Future) -> torch.Tensor:
        replicas.grad_allreduce_s += time.perf_counter() - start
        return fut.value()

    return default_hooks.allreduce_hook(replicas.topo.stage_group, bucket).then(done)


class ReplicaSGD:
    """The optimizer a replica hands to ``greedy_step``: combine the replicas' BatchNorm
    statistics (module docstring), then SGD on the gradients DDP has already averaged.

    Before each step, :meth:`begin` says how large this step's shards are; ``zero_grad`` (which
    ``greedy_step`` calls first) also remembers BatchNorm's running statistics, so that
    ``step`` can combine every replica's updates of them.
    """

    def __init__(self, opt: SGD, parts: list[nn.Module], topo: Topology, micro_batch: int):
        self.opt, self.topo, self.micro_batch = opt, topo, micro_batch
        self.norms = [m for part in parts for m in part.modules()
                      if isinstance(m, _BatchNorm) and m.track_running_stats]
        if any(m.momentum is None for m in self.norms):  # an internal invariant: CIFAR ResNets
            raise ValueError("cumulative-average BatchNorm (momentum=None) is not supported")
        self.allreduce_s = 0.0
        self._updates: list[int] = []
        self._before: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    @property
    def params(self) -> list[nn.Parameter]:
        return self.opt.params

    @property
    def lr(self) -> float:
        return self.opt.lr

    def begin(self, shards: list[int]) -> None:
        # BatchNorm forward calls per replica: one per micro-batch of its shard.
        self._updates = [math.ceil(s / self.micro_batch) for s in shards]

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The gradients are views into DDP's buckets, which DDP keeps: zeroing them in place
        # frees nothing and keeps the views (set_to_none would drop them).
        self.opt.zero_grad(set_to_none=False)
        self._before = [(m.running_mean.clone(), m.running_var.clone(),
                         int(m.num_batches_tracked)) for m in self.norms]

    @torch.no_grad()
    def undo_statistics(self) -> None:
        """BatchNorm's running statistics back to where this step began."""
        for m, (mean0, var0, tracked) in zip(self.norms, self._before):
            m.running_mean.copy_(mean0)
            m.running_var.copy_(var0)
            m.num_batches_tracked.fill_(tracked)

    @torch.no_grad()
    def step(self) -> None:
        if self.norms:
            self._combine_statistics()
        self.opt.step()

    def _combine_statistics(self) -> None:
        after = sum(self._updates[self.topo.replica + 1:])  # updates made after this replica's
        mine = self._updates[self.topo.replica]
        pieces = []
        for m, (mean0, var0, _) in zip(self.norms, self._before):
            keep = (1 - m.momentum) ** mine
            weight = (1 - m.momentum) ** after
            pieces += [(m.running_mean - keep * mean0).reshape(-1) * weight,
                       (m.running_var - keep * var0).reshape(-1) * weight]
        flat = torch.cat(pieces)
        start = time.perf_counter()
        with talking(self.topo, "combining the replicas' BatchNorm statistics",
                     peers=[r for r in self.topo.replica_ranks if r != self.topo.rank]):
            dist.all_reduce(flat, group=self.topo.stage_group)
        self.allreduce_s += time.perf_counter() - start
        total, offset = sum(self._updates), 0
        for m, (mean0, var0, tracked) in zip(self.norms, self._before):
            n = m.running_mean.numel()
            decay = (1 - m.momentum) ** total
            m.running_mean.copy_(decay * mean0 + flat[offset:offset + n].view_as(mean0))
            m.running_var.copy_(decay * var0 + flat[offset + n:offset + 2 * n].view_as(var0))
            m.num_batches_tracked.fill_(tracked + total)
            offset += 2 * n


def reduce_sum(topo: Topology, values: list[float], what: str) -> list[float]:
    """Sum ``values`` over this stage's replicas (float64)."""
    if topo.replicas == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=topo.device)
    with talking(topo, what, peers=[r for r in topo.replica_ranks if r != topo.rank]):
        dist.all_reduce(t, group=topo.stage_group)
    return t.tolist()


def reduce_stats(topo: Topology, stats: EpochStats) -> EpochStats:
    """The epoch's numbers over all replicas of the stage: what one process training on the
    whole batches would have summed."""
    loss, ce, transport, correct, seen = reduce_sum(
        topo, [stats.loss, stats.ce, stats.transport, stats.correct, stats.seen],
        "adding up the epoch's training numbers")
    return EpochStats(loss, ce, transport, int(round(correct)), int(round(seen)))
