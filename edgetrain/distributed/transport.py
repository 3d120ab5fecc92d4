"""Activations between pipeline stages: torch.distributed point-to-point, bounded in flight.

Stage k sends each batch's detached output and its labels to stage k+1 (``dist.isend``); no
gradient ever travels back (module-wise training). Both sides know every message's shape in
advance (batch sizes follow from the data size, ``--batch-size`` and ``--replicas``; shapes
from the split), so nothing but the tensors is sent.

**The in-flight bound** (``--in-flight N``). An :class:`Outbox` keeps at most N sends that the
next stage has not taken yet: before it hands a new batch to ``isend`` it waits until the
oldest one has been delivered. Gloo and NCCL both deliver a send only into a receive the peer
has posted (seen with gloo here: an ``isend`` of 10 floats does not complete until the peer
calls ``recv``), so a delivered send means the next stage has asked for that batch. An
:class:`Inbox` posts the receive of the next batch while its stage computes on the current
one (the transfer overlaps compute). So per rank, activation memory is bounded by its
module's own step, plus N outgoing batches kept alive until delivered, plus two incoming
(the one being trained on and the next). With N = 1 stage k runs at most two batches ahead of
stage k+1.

Every wait has the job's timeout (``--dist-timeout``): a peer that dies (its connection
closes) or stops answering ends the wait with a :class:`PeerError` naming that peer. A gloo
pair that timed out is closed for good, so there is no retry: the job stops.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

import torch
import torch.distributed as dist

from edgetrain.distributed.topology import Topology, talking


class Outbox:
    """Batches for the next stage; at most ``limit`` not yet delivered."""

    def __init__(self, topo: Topology, peer: int, limit: int):
        self.topo, self.peer, self.limit = topo, peer, limit
        self.pending: deque = deque()
        self.wait_s = 0.0
        self.sent = 0

    def send(self, x: torch.Tensor, y: torch.Tensor, what: str) -> None:
        while len(self.pending) >= self.limit:
            self._deliver_oldest()
        # The tensors must stay alive (and unchanged) until delivered: the deque holds them.
        x, y = x.contiguous(), y.contiguous()
        with talking(self.topo, f"sending {what}", self.peer):
            works = [dist.isend(x, self.peer, group=self.topo.data_group),
                     dist.isend(y, self.peer, group=self.topo.data_group)]
        self.pending.append((works, x, y, what))
        self.sent += 1

    def flush(self) -> None:
        while self.pending:
            self._deliver_oldest()

    def _deliver_oldest(self) -> None:
        works, _, _, what = self.pending.popleft()
        start = time.perf_counter()
        with talking(self.topo, f"delivering {what} (the next stage did not take it)",
                     self.peer):
            for work in works:
                work.wait(self.topo.timeout)
        self.wait_s += time.perf_counter() - start


class Inbox:
    """The batches of one phase (an epoch's training, or an evaluation) from the previous
    stage, in order; ``shapes`` lists each batch's activation shape (batch first)."""

    def __init__(self, topo: Topology, peer: int, shapes: Iterable[tuple[int, ...]],
                 what: str):
        self.topo, self.peer, self.what = topo, peer, what
        self.shapes = iter(shapes)
        self.posted: deque = deque()
        self.wait_s = 0.0
        self.count = 0
        self._post_next()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.posted:
            raise StopIteration
        works, x, y, index = self.posted.popleft()
        # Prefetch: the next batch travels while this one is trained on.
        self._post_next()
        start = time.perf_counter()
        with talking(self.topo, f"receiving {self.what}, batch {index + 1}", self.peer):
            for work in works:
                work.wait(self.topo.timeout)
        self.wait_s += time.perf_counter() - start
        return x, y

    def _post_next(self) -> None:
        shape = next(self.shapes, None)
        if shape is None:
            return
        device = self.topo.device
        x = torch.empty(shape, device=device)
        y = torch.empty(shape[0], dtype=torch.int64, device=device)
        with talking(self.topo, f"receiving {self.what}", self.peer):
            works = [dist.irecv(x, self.peer, group=self.topo.data_group),
                     dist.irecv(y, self.peer, group=self.topo.data_group)]
        self.posted.append((works, x, y, self.count))
        self.count += 1
