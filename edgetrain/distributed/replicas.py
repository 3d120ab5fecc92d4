"""Data-parallel replicas of one module: shards of each batch, one gradient all-reduce per step.

With ``--replicas R`` every batch of ``B`` samples is cut into R shards of ``m = B / R``
(``x.split(m)``: the last, short batch may leave the last replicas with a smaller shard or
none). Replica i trains on shard i. The single-process run this equals, up to the order of
floating-point sums, is the same global batch trained in micro-batches of ``m`` (what the
planner's gradient accumulation does): each micro-batch normalises with its own BatchNorm
statistics, exactly as each replica does.

Why not ``DistributedDataParallel``: :func:`edgetrain.training.steps.greedy_step` does its
own micro-batch accumulation and calls the optimizer itself, edgetrain has its own SGD, and
its activation checkpointing is a reentrant recompute that DDP supports only with
``static_graph``; the module and its head are two modules, and a replica whose shard of the
last batch is empty must still take part. So :class:`ReplicaSGD` wraps the optimizer that
``greedy_step`` is given: its ``step`` first sums every replica's gradient, weighted by its
share of the batch, with one ``torch.distributed.all_reduce`` of one flat buffer (PyTorch's
own engine: gloo or NCCL), then takes the ordinary SGD step. Every replica applies the same
update to the same weights, so the replicas stay identical (checked at every epoch's end).
What this gives up against DDP: gradient buckets are not reduced while backward is still
running, so communication does not overlap computation; for modules this small the one
all-reduce per step is short (its time is in the report, ``allreduce_s``).

BatchNorm running statistics. In training mode they do not change what a step computes, only
evaluation and the saved model. The micro-batch run updates them once per micro-batch, in
order; DDP would keep rank 0's. Here they are combined in the same all-reduce so that they
equal the micro-batch run's: with momentum a, replica i having made c_i updates starting from
the common value r0 and ended at r_i, the sequential result is
``(1-a)^C r0 + sum_i (1-a)^(c_{i+1} + ... + c_{R-1}) (r_i - (1-a)^c_i r0)``, ``C = sum c_i``.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from edgetrain.distributed.topology import Topology, talking
from edgetrain.training.sgd import SGD
from edgetrain.training.steps import EpochStats


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


class ReplicaSGD:
    """The optimizer a replica hands to ``greedy_step``: all-reduce, then SGD.

    Before each step, :meth:`begin` says how large this step's shards are; ``zero_grad`` (which
    ``greedy_step`` calls first) also remembers BatchNorm's running statistics, so that
    ``step`` can combine every replica's updates of them (module docstring).
    """

    def __init__(self, opt: SGD, parts: list[nn.Module], topo: Topology, micro_batch: int):
        self.opt, self.topo, self.micro_batch = opt, topo, micro_batch
        self.norms = [m for part in parts for m in part.modules()
                      if isinstance(m, _BatchNorm) and m.track_running_stats]
        if any(m.momentum is None for m in self.norms):  # an internal invariant: CIFAR ResNets
            raise ValueError("cumulative-average BatchNorm (momentum=None) is not supported")
        self.allreduce_s = 0.0
        self._share = 1.0
        self._updates: list[int] = []
        self._before: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def params(self) -> list[nn.Parameter]:
        return self.opt.params

    @property
    def lr(self) -> float:
        return self.opt.lr

    def begin(self, shards: list[int]) -> None:
        """This step's shard size of every replica (0: none)."""
        total = sum(shards)
        self._share = shards[self.topo.replica] / total
        # BatchNorm forward calls per replica: one per micro-batch of its shard.
        self._updates = [math.ceil(s / self.micro_batch) for s in shards]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none)
        self._before = [(m.running_mean.clone(), m.running_var.clone()) for m in self.norms]

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        after = self._replica_position()
        mine = self._updates[self.topo.replica]
        pieces = [g.reshape(-1) * self._share for g in grads]
        for m, (mean0, var0) in zip(self.norms, self._before):
            keep = (1 - m.momentum) ** mine
            weight = (1 - m.momentum) ** after
            pieces += [(m.running_mean - keep * mean0).reshape(-1) * weight,
                       (m.running_var - keep * var0).reshape(-1) * weight]
        flat = torch.cat(pieces)
        start = time.perf_counter()
        with talking(self.topo, "averaging gradients over the replicas",
                     peers=[r for r in self.topo.replica_ranks if r != self.topo.rank]):
            dist.all_reduce(flat, group=self.topo.stage_group)
        self.allreduce_s += time.perf_counter() - start
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
            offset += g.numel()
        total = sum(self._updates)
        for m, (mean0, var0) in zip(self.norms, self._before):
            n = m.running_mean.numel()
            decay = (1 - m.momentum) ** total
            m.running_mean.copy_(decay * mean0 + flat[offset:offset + n].view_as(mean0))
            m.running_var.copy_(decay * var0 + flat[offset + n:offset + 2 * n].view_as(var0))
            m.num_batches_tracked.fill_(int(m.num_batches_tracked) - mine + total)
            offset += 2 * n
        del flat
        self.opt.step()

    def empty_step(self) -> None:
        """This replica's shard is empty: it adds nothing but must take part."""
        self.zero_grad()
        self.step()

    def _replica_position(self) -> int:
        """BatchNorm updates made after this replica's in the micro-batch order."""
        return sum(self._updates[self.topo.replica + 1:])


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
