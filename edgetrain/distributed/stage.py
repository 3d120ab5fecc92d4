"""One module and its head as one rank trains them, and the state that travels to rank 0.

The pipeline trains its modules through :class:`Stage` (one stage per rank), and
data-parallel sequential mode each module in turn (every rank a replica of it). A stage is
edgetrain's training phase
(:class:`~edgetrain.training.phase.Phase`), built and stepped as single-process training does;
with replicas its forward and backward go through ``DistributedDataParallel`` and its update
through a :class:`~edgetrain.distributed.replicas.ReplicaSGD`
(:class:`~edgetrain.distributed.replicas.Replicas`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from edgetrain.distributed.replicas import Replicas, reduce_sum
from edgetrain.distributed.topology import Topology, gather_all, talking
from edgetrain.training.phase import Optim, Phase
from edgetrain.training.steps import (
    EpochStats,
    NonFiniteLossError,
    accumulate,
)
from edgetrain.training.transport import Multipliers


def input_shape(ctx, k: int) -> tuple[int, int, int]:
    """The shape of one input sample of module ``k`` (channels, height, width)."""
    plan = ctx.plans[k]
    return plan.in_channels, plan.in_size, plan.in_size


Shards = list[int]
"""Each replica's share of one batch, in samples (replica order)."""


@dataclass
class Timers:
    """Where one rank's time went (seconds), and what it trained on."""

    compute_s: float = 0.0
    """Forward, backward (with DDP's gradient all-reduce, which overlaps it) and SGD steps,
    without the BatchNorm statistics' all-reduce."""
    allreduce_s: float = 0.0
    """Waiting in the replicas' BatchNorm statistics all-reduce after backward (communication
    and slower replicas)."""
    grad_allreduce_s: float = 0.0
    """The replicas' gradient all-reduce in flight: DDP runs it during backward, so it overlaps
    ``compute_s`` and is not all waiting."""
    recv_wait_s: float = 0.0
    """Waiting for the previous stage's activations."""
    send_wait_s: float = 0.0
    """Waiting for the next stage to take a batch (the in-flight bound)."""
    sync_s: float = 0.0
    """Epoch ends: statistics, state to rank 0, checkpoint and barriers."""
    eval_s: float = 0.0
    images: int = 0
    """Training samples this rank stepped on."""

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(self).items()}


class Stage:
    """Module ``k`` of the run with its head, optimizer, schedule (and multipliers), built as
    single-process training builds them: the same seed gives the same initial weights."""

    def __init__(self, ctx, k: int, topo: Topology, micro_batch: int, total_steps: int,
                 checkpointing: bool):
        cfg = ctx.config
        self.ctx, self.k, self.topo = ctx, k, topo
        self.micro_batch = micro_batch
        self.phase = Phase.module(ctx.spec, ctx.plans[k], ctx.num_classes, ctx.device,
                                  Optim.of(cfg), total_steps, ctx.taus[k], init=cfg.init,
                                  gain=cfg.init_gain, seed=cfg.seed * 1000 + k,
                                  checkpointing=checkpointing,
                                  label_smoothing=cfg.label_smoothing)
        self.module, self.head = self.phase.model, self.phase.head
        self.opt, self.sched = self.phase.opt, self.phase.sched
        self.multipliers = Multipliers() if cfg.tau_schedule == "multipliers" else None
        self.replicas = (Replicas(self.phase, topo, micro_batch, checkpointing)
                         if topo.replicas > 1 else None)
        self.timers = Timers()

    @property
    def tau(self) -> float:
        return self.multipliers.tau if self.multipliers is not None else self.ctx.taus[self.k]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One input sample's shape (channels, height, width)."""
        return input_shape(self.ctx, self.k)

    def _talking(self):
        """With replicas, a step's backward waits on DDP's gradient all-reduce: a replica that
        died is reported by rank (a step's own errors keep their text in the message)."""
        if self.replicas is None:
            return nullcontext()
        return talking(self.topo, f"training module {self.k + 1} (the replicas' gradient "
                       "all-reduce)", peers=[r for r in self.topo.replica_ranks
                                             if r != self.topo.rank], only_lost_peers=True)

    def close(self) -> None:
        """Drop what only training needs beyond the weights: DDP's buckets and the gradients."""
        if self.replicas is not None:
            self.replicas.close()
            self.replicas = None

    def train_epoch(self, batches: Iterable[tuple[torch.Tensor | None, torch.Tensor | None,
                                                   Shards]],
                    epoch: int, on_output: Callable[[torch.Tensor, torch.Tensor, int], None]
                    | None = None, progress: Callable[[], None] | None = None) -> EpochStats:
        """One epoch over ``batches``: ``(x, y, shards)`` with this rank's shard (None where it
        is empty) and every replica's shard size. ``on_output`` gets each step's detached
        output (for the next stage)."""
        stats = EpochStats()
        self.module.train()
        self.head.train()
        replicas = self.replicas
        for step, (x, y, shards) in enumerate(batches):
            if replicas is not None:
                replicas.begin(shards)
            start = time.perf_counter()
            reduced_before = replicas.allreduce_s if replicas is not None else 0.0
            grads_before = replicas.grad_allreduce_s if replicas is not None else 0.0
            numbers = None
            with self._talking():
                if x is None:
                    replicas.empty_step(self.input_shape, self.tau)
                    self.sched.step()
                else:
                    # The output is kept only for a next stage to receive (the pipeline).
                    out, numbers = self.phase.step(x, y, self.micro_batch,
                                                   keep_output=on_output is not None,
                                                   tau=self.tau)
            if replicas is not None:
                reduced = replicas.allreduce_s - reduced_before
                self.timers.allreduce_s += reduced
                self.timers.grad_allreduce_s += replicas.grad_allreduce_s - grads_before
            else:
                reduced = 0.0
            self.timers.compute_s += time.perf_counter() - start - reduced
            if numbers is not None:
                self.timers.images += len(y)
                if on_output is not None:
                    on_output(out, y, step)
                del out
                try:
                    accumulate(stats, numbers, len(y))
                except FloatingPointError as e:
                    raise NonFiniteLossError(self.k, epoch, step, e.args[0]) from None
            if self.multipliers is not None:
                # lambda follows the cross-entropy of the whole batch, the same on every
                # replica (a local one would let the replicas' penalty weights drift apart).
                share = (len(y) / sum(shards)) if numbers is not None else 0.0
                ce = float(numbers["ce"]) * share if numbers is not None else 0.0
                self.multipliers.update(reduce_sum(self.topo, [ce], "adding up the "
                                                   "cross-entropy for --tau-schedule "
                                                   "multipliers")[0])
            if progress is not None:
                progress()
        return stats

    # -- state that travels: to rank 0 for checkpoints and module files, from it on resume --

    def payload(self) -> dict:
        """What rank 0 writes for this module (:func:`payload_of`)."""
        return payload_of(self.module, self.head, self.opt, self.sched, self.multipliers)

    def load(self, payload: dict) -> None:
        self.module.load_state_dict(payload["module"])
        self.head.load_state_dict(payload["head"])
        self.opt.load_state_dict(payload["opt"])
        self.sched.step_count = payload["steps"]
        self.opt.lr = self.sched.lr_at(self.sched.step_count)
        if self.multipliers is not None and payload["multipliers"] is not None:
            self.multipliers.load_state_dict(payload["multipliers"])

    def digest(self) -> str:
        """A checksum of the weights, statistics and momentum: replicas must agree on it."""
        h = hashlib.blake2b(digest_size=16)
        for part in (self.module.state_dict(), self.head.state_dict(), self.opt.state_dict()):
            for name, t in sorted(part.items()):
                h.update(name.encode())
                h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


class Saved:
    """A received state, shaped like what :func:`edgetrain.training.checkpoints.save_checkpoint`
    reads from a part (``state_dict()``) or an optimizer's schedule (``step_count``)."""

    def __init__(self, state: dict | None = None, step_count: int = 0):
        self.state = state or {}
        self.step_count = step_count

    def state_dict(self) -> dict:
        return self.state


def payload_of(module, head, opt, sched, multipliers) -> dict:
    """Weights (BatchNorm statistics included), momentum, schedule position and multipliers,
    as CPU tensors: the state of one module that travels between ranks and to checkpoints."""
    def cpu(state):
        return {n: t.detach().cpu() for n, t in state.items()}
    return {"module": cpu(module.state_dict()), "head": cpu(head.state_dict()),
            "opt": cpu(opt.state_dict()), "steps": sched.step_count,
            "multipliers": cpu(multipliers.state_dict()) if multipliers is not None else None}


def checkpoint_parts(payloads: list[dict], numbered: bool = True) -> tuple[dict, dict]:
    """``(parts, optimizers)`` of the payloads under a single-process run's checkpoint names,
    so that the file is the same as one process writes: parallel mode's ``module{k}``,
    ``head{k}``, ``multipliers{k}``, ``opt{k}``; with ``numbered=False`` (one payload),
    sequential mode's ``module``, ``head``, ``multipliers``, ``opt``."""
    parts, optimizers = {}, {}
    for k, p in enumerate(payloads):
        n = k if numbered else ""
        parts[f"module{n}"] = Saved(p["module"])
        parts[f"head{n}"] = Saved(p["head"])
        if p["multipliers"] is not None:
            parts[f"multipliers{n}"] = Saved(p["multipliers"])
        optimizers[f"opt{n}"] = (Saved(p["opt"]), Saved(step_count=p["steps"]))
    return parts, optimizers


def check_replicas_agree(topo: Topology, stage: Stage, epoch: int, name: str = "stage"
                         ) -> None:
    """Every replica of every stage holds the same weights, statistics and momentum (an
    internal invariant: identical updates on identical weights); ``name`` is what the error
    calls a stage ("stage", or "module" in sequential mode)."""
    if topo.replicas == 1:
        return
    digests = gather_all(topo, stage.digest(), "comparing the replicas' weights")
    for s in range(topo.stages):
        if len({digests[topo.rank_of(s, i)] for i in range(topo.replicas)}) > 1:
            which = stage.k if topo.stages == 1 else s
            raise RuntimeError(f"the replicas of {name} {which + 1} hold different weights "
                               f"after epoch {epoch + 1}")
