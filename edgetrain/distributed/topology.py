"""Who is who in a distributed run: ranks, stages, replicas, process groups, the launch env.

A run of ``--modules K --replicas R`` in ``--mode parallel`` is ``K x R`` processes: R copies of
a K-stage pipeline. Ranks are numbered **replica-major**::

    rank = replica * K + stage          stage k of replica r

so one pipeline is K consecutive ranks. torchrun gives each node consecutive ranks, so with K
processes per node every pipeline stays inside one node (activations, the heavy traffic of a
CNN, never cross the network; gradients of the small modules do, once per step). Rank 0 is
stage 0 of replica 0: it reads the data and owns the run folder.

In ``--mode sequential`` every rank is a replica of the one module being trained (K = 1 in
this numbering): ``R`` = the world size.

Two kinds of process group:

* the **control** group (the default group, always gloo, on the CPU): setup agreement, epoch-end
  exchanges of numbers and state with rank 0, barriers; gloo's ``monitored_barrier`` can name
  the rank that did not arrive;
* the **data** groups: point-to-point activations between stages and each stage's gradient
  all-reduce among its replicas: gloo on the CPU, NCCL on GPUs.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from edgetrain.distributed.errors import LaunchError, PeerError, is_peer_failure, peer_failure

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun (or any launcher speaking PyTorch's env:// protocol) sets for each process."""

LAUNCH_HINT = ("launch it with torchrun, e.g. `torchrun --nproc-per-node 2 -m edgetrain fit "
               "--distributed --mode parallel --modules 2 ...` (see README, Distributed)")


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master: str

    @classmethod
    def read(cls) -> LaunchEnv:
        """The launcher's variables, checked; LaunchError if they are missing or broken."""
        missing = [v for v in LAUNCH_VARIABLES if not os.environ.get(v)]
        if missing:
            raise LaunchError(f"--distributed: this process was not started by a distributed "
                              f"launcher ({', '.join(missing)} not set): {LAUNCH_HINT}.")
        try:
            rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE",
                                                               "LOCAL_RANK"))
        except ValueError:
            raise LaunchError("--distributed: RANK, WORLD_SIZE and LOCAL_RANK must be integers "
                              f"({LAUNCH_HINT}).") from None
        if not 0 <= rank < world or local < 0:
            raise LaunchError(f"--distributed: RANK {rank} is outside 0..WORLD_SIZE-1 "
                              f"({world - 1}); {LAUNCH_HINT}.")
        return cls(rank, world, local,
                   f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")


def world_problem(world_size: int, mode: str, modules: int, replicas: int) -> str | None:
    """Why ``world_size`` processes cannot run this layout, or None.

    >>> world_problem(4, "parallel", 2, 2) is None
    True
    >>> print(world_problem(3, "parallel", 2, 1))
    --distributed --mode parallel runs one process per module and replica: --modules 2 x --replicas 1 = 2 processes, but the launcher started 3 (WORLD_SIZE). Launch 2 (torchrun --nproc-per-node 2), or change --modules/--replicas to match.
    """  # noqa: E501
    need = modules * replicas if mode == "parallel" else replicas
    if world_size == need:
        return None
    if mode == "parallel":
        return (f"--distributed --mode parallel runs one process per module and replica: "
                f"--modules {modules} x --replicas {replicas} = {need} processes, but the "
                f"launcher started {world_size} (WORLD_SIZE). Launch {need} (torchrun "
                f"--nproc-per-node {need}), or change --modules/--replicas to match.")
    return (f"--distributed --mode sequential trains each module on --replicas {replicas} "
            f"data-parallel processes, but the launcher started {world_size} (WORLD_SIZE). "
            f"Use --replicas {world_size}, or launch {replicas} processes.")


@dataclass
class Topology:
    rank: int
    world_size: int
    local_rank: int
    stages: int
    """K in --mode parallel; 1 in --mode sequential (every rank trains the same module)."""
    replicas: int
    timeout_s: float
    device: torch.device
    data_backend: str = "gloo"
    stage_groups: list = field(default_factory=list)
    """Each stage's replicas (None where R = 1: nothing to average)."""
    data_group: object = None
    """The group point-to-point activations travel in (None: the default group)."""

    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def replica(self) -> int:
        return self.rank // self.stages

    def rank_of(self, stage: int, replica: int) -> int:
        return replica * self.stages + stage

    @property
    def previous(self) -> int | None:
        """The rank this one receives activations from (None for stage 0)."""
        return self.rank_of(self.stage - 1, self.replica) if self.stage > 0 else None

    @property
    def next(self) -> int | None:
        """The rank this one sends activations to (None for the last stage)."""
        return self.rank_of(self.stage + 1, self.replica) if self.stage < self.stages - 1 \
            else None

    @property
    def replica_ranks(self) -> list[int]:
        """This stage's replicas (this rank among them)."""
        return [self.rank_of(self.stage, r) for r in range(self.replicas)]

    @property
    def stage_group(self):
        return self.stage_groups[self.stage] if self.stage_groups else None

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    def describe(self, rank: int | None = None) -> str:
        """``rank 3 (stage 2, replica 2)``, 1-based stages and replicas as the CLI shows
        modules."""
        rank = self.rank if rank is None else rank
        if self.stages == 1:
            return f"rank {rank} (replica {rank + 1} of {self.replicas})"
        return (f"rank {rank} (stage {rank % self.stages + 1} of {self.stages}, replica "
                f"{rank // self.stages + 1} of {self.replicas})")


def start(env: LaunchEnv, stages: int, replicas: int, timeout_s: float,
          device: torch.device) -> Topology:
    """Join the job: the control group, then the data groups. Every rank calls this with the
    same arguments (checked right after by :func:`check_same_config`)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        # env:// reads MASTER_ADDR/MASTER_PORT (torchrun's rendezvous store); the timeout
        # bounds the rendezvous and, for gloo, every collective and wait after it.
        dist.init_process_group("gloo", timeout=timeout, rank=env.rank,
                                world_size=env.world_size)
    except (RuntimeError, ValueError, dist.DistError) as e:
        raise LaunchError(f"--distributed: rank {env.rank} could not join the job at "
                          f"{env.master} within --dist-timeout {timeout_s:g} s "
                          f"({peer_failure(str(e))}). Check that every process was started "
                          "with the same --rdzv-endpoint/--master-addr and that the port is "
                          "reachable.") from None
    backend = "nccl" if device.type == "cuda" else "gloo"
    topo = Topology(env.rank, env.world_size, env.local_rank, stages, replicas, timeout_s,
                    device, backend)
    # Every rank creates every group, in the same order (torch.distributed's rule).
    if backend != "gloo":
        topo.data_group = dist.new_group(backend=backend, timeout=timeout)
    if replicas > 1:
        topo.stage_groups = [
            dist.new_group([topo.rank_of(s, r) for r in range(replicas)], backend=backend,
                           timeout=timeout)
            for s in range(stages)]
    return topo


def check_same_config(topo: Topology, config_json: str) -> None:
    """Every rank must run the same configuration (only rank 0 writes it down)."""
    digest = hashlib.blake2b(config_json.encode(), digest_size=8).hexdigest()
    digests = gather_all(topo, digest, "comparing the ranks' flags")
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise LaunchError(
            f"--distributed: rank(s) {', '.join(map(str, differ))} were started with other "
            "flags than rank 0: every process must run the same `edgetrain fit` command "
            "(torchrun does that; check a hand-written launcher).")


def gather_all(topo: Topology, value, what: str) -> list:
    """``value`` of every rank, on every rank (small picklable objects, control group)."""
    out = [None] * topo.world_size
    # A collective cannot tell which peer failed: the message lists every one it waited on.
    with talking(topo, what, peers=[r for r in range(topo.world_size) if r != topo.rank]):
        dist.all_gather_object(out, value)
    return out


def agree(topo: Topology, problem: str | None, what: str) -> None:
    """Raise the same LaunchError on every rank if any rank found a problem: a setup step
    that fails on one rank must not leave the others waiting for it."""
    problems = gather_all(topo, problem, what)
    found = [(r, p) for r, p in enumerate(problems) if p]
    if found:
        if len(found) == 1 or len({p for _, p in found}) == 1:
            rank, text = found[0]
            who = "rank 0" if rank == 0 else topo.describe(rank)
            raise LaunchError(f"{who}: {text}" if len(found) == 1
                              else f"ranks {', '.join(str(r) for r, _ in found)}: {text}")
        raise LaunchError([f"{topo.describe(r)}: {p}" for r, p in found])


def barrier(topo: Topology, what: str, timeout_s: float | None = None) -> None:
    """Wait until every rank is here; on rank 0, a rank that does not arrive in time is named
    (gloo's monitored barrier)."""
    timeout = datetime.timedelta(seconds=timeout_s or topo.timeout_s)
    try:
        dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
    except RuntimeError as e:
        text = str(e)
        if "failed to pass monitoredBarrier" in text:
            missing = text.split("Ranks", 1)[-1].split("failed", 1)[0].strip()
            raise PeerError(topo.rank, f"rank(s) {missing} did not reach the barrier while "
                            f"{what} within --dist-timeout {timeout.total_seconds():g} s: "
                            "they died, hang, or are much slower") from None
        raise PeerError(topo.rank, f"{what}: rank 0 did not answer "
                        f"({peer_failure(text)})", text) from None


class talking:
    """``with talking(topo, what, peer):`` turns a torch.distributed failure into a
    PeerError that names this rank, what it was doing and, if known, the peer."""

    def __init__(self, topo: Topology, what: str, peer: int | None = None,
                 peers: list[int] | None = None, only_lost_peers: bool = False):
        self.topo, self.what, self.peer, self.peers = topo, what, peer, peers
        self.only_lost_peers = only_lost_peers
        """Around more than communication (a training step): only a DistError, a timeout or a
        closed connection names a peer; any other error is left as it is."""

    def __enter__(self) -> talking:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or not isinstance(error, (RuntimeError, dist.DistError)) \
                or isinstance(error, PeerError):
            return False
        text = str(error)
        if self.only_lost_peers and not (isinstance(error, dist.DistError)
                                         or is_peer_failure(text)):
            return False
        if self.peer is not None:
            who = f"; waiting on {self.topo.describe(self.peer)}"
        elif self.peers:
            who = (f"; waiting on rank {self.peers[0]}" if len(self.peers) == 1 else
                   f"; waiting on one of ranks {', '.join(map(str, self.peers))}")
        else:
            who = ""
        raise PeerError(self.topo.rank, f"{self.what}{who}: {peer_failure(text)} "
                        f"(--dist-timeout {self.topo.timeout_s:g} s)", text) from None


def finish(topo: Topology | None, clean: bool) -> None:
    """Leave the job. After a failure, pending sends to a dead peer could block a clean
    shutdown, so the process groups are then left alone: the command line ends such a rank
    with :func:`leave_after_failure`, which skips the interpreter's teardown of them."""
    if topo is not None and clean and dist.is_initialized():
        dist.destroy_process_group()


def leave_after_failure(code: int, traceback: bool = False) -> None:
    """End this rank's process now with ``code`` if it is still in a job after a failure.

    :func:`finish` leaves the process groups alone after a failure, and letting the
    interpreter's exit drop them is not safe: gloo's threads are then destroyed while still
    joinable and the C++ runtime aborts the process ("terminate called without an active
    exception", exit -6 instead of the error's code; seen in CI), or a send to a dead peer
    blocks the exit. Every file edgetrain writes is complete before this point (written
    atomically or removed in ``finally``), so skipping the interpreter's teardown loses
    nothing. Outside a distributed job this returns and the caller exits normally. A program
    that calls :func:`edgetrain.distributed.run.fit_distributed` itself does not come here (a
    library cannot end its caller's process): after a failure it should end the same way."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if traceback:
        import traceback as tb

        tb.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
