"""`edgetrain fit --distributed` (issue 15) with real processes: gloo on 127.0.0.1, 2 to 4
ranks of `python -m edgetrain fit`, one thread each.

* a pipeline of modules gives single-process parallel mode's weights bit for bit;
* replicas of each stage give the single-process run at the same global batch, trained in
  micro-batches of one replica's shard (BatchNorm normalises each shard on its own), up to the
  order of floating-point sums;
* a rank that is killed or hangs stops the others within --dist-timeout, with an error naming
  it; the whole job restarted with --resume then finishes with the uninterrupted weights;
* launches that make no sense are refused before anything is written; rank 0 alone writes.

Processes are started either by torchrun (`python -m torch.distributed.run`) or by hand with
the env:// variables torchrun sets (RANK, WORLD_SIZE, ...), which lets a test kill or stop one
rank and see what the others do (torchrun itself would tear the job down). The runs are tiny:
ResNet-8 at widths 8,16,16 on 240 built-in training images.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgetrain.cli import app
from edgetrain.runs.weights import load_weights

REPO = Path(__file__).resolve().parents[1]

TINY = ["--model", "resnet8", "--widths", "8,16,16", "--mode", "parallel", "--epochs", "2",
        "--train-limit", "240", "--test-limit", "100", "--batch-size", "64", "--lr", "0.1",
        "--threads", "1", "--device", "cpu", "--no-progress"]
"""240 = 3 x 64 + 48: the last batch is short (and, with 2 replicas, cut into 32 + 16)."""

WAIT_S = 150
"""How long a test waits for a job it expects to end (far above what a run takes)."""


# ---------------------------------------------------------------------------------------------
# Helpers: launch ranks, read their output, compare weights
# ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a rank: this checkout's edgetrain first on the path, one thread."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


class Job:
    """``world`` ranks of ``edgetrain fit`` started by hand, as torchrun would start them."""

    def __init__(self, world: int, args: list[str], logs: Path, cwds: list[Path] | None = None,
                 per_rank: dict[int, list[str]] | None = None):
        port = free_port()
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [logs / f"rank{r}.log" for r in range(world)]
        self.procs = []
        for rank in range(world):
            env = child_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port))
            with open(self.logs[rank], "wb") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "edgetrain", "fit", *args,
                     *(per_rank or {}).get(rank, [])],
                    cwd=(cwds[rank] if cwds else None), env=env, stdout=log,
                    stderr=subprocess.STDOUT))

    def wait(self, timeout: float = WAIT_S, ranks: list[int] | None = None) -> list[int]:
        """Exit codes of ``ranks`` (all by default); fails the test if one is still running
        after ``timeout`` seconds (and kills every rank)."""
        deadline = time.monotonic() + timeout
        codes = []
        for rank in ranks if ranks is not None else range(len(self.procs)):
            try:
                codes.append(self.procs[rank].wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"rank {rank} still running after {timeout} s:\n{self.output()}")
        return codes

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def text(self, rank: int) -> str:
        return " ".join(self.logs[rank].read_text(errors="replace").split())

    def output(self) -> str:
        return "\n".join(f"--- rank {r} ---\n{log.read_text(errors='replace')[-3000:]}"
                         for r, log in enumerate(self.logs))


def run_job(world: int, args: list[str], logs: Path, **kwargs) -> Job:
    job = Job(world, args, logs, **kwargs)
    codes = job.wait()
    assert codes == [0] * world, job.output()
    return job


def torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The documented launch: torchrun's own agent starts the ranks."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         "-m", "edgetrain", "fit", *args],
        cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=WAIT_S)


def invoke(*args: str):
    return CliRunner().invoke(app, ["fit", *args])


def events(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return found


def weight_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    """Every weight file of run ``a`` equals ``b``'s bit for bit."""
    assert weight_files(a) == weight_files(b)
    for name in weight_files(a):
        wa, wb = load_weights(a / name), load_weights(b / name)
        assert wa.keys() == wb.keys(), name
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not differ, f"{name}: {differ}"


def assert_close_weights(out: Path, reference: Path) -> None:
    """Every weight file of ``out`` equals ``reference``'s up to floating-point order
    (BatchNorm's update counts exactly). Seen: at most 4e-6 (a BatchNorm running variance),
    except where module 2 trains on module 1 recomputed (``--cache none``): module 1's
    weights differ by 2e-7 from the reference's, which module 2's 8 steps grow to 9e-5 (a
    float16 disk cache rounds such differences away; one process on 2 threads instead of 1
    differs by 3e-4 at this lr). Weighting two replicas' shards 1/2 + 1/2 instead of
    32/48 + 16/48 gives 4e-3: this tolerance still catches it (tested by breaking it)."""
    assert weight_files(out) == weight_files(reference)
    for name in weight_files(out):
        got, want = load_weights(out / name), load_weights(reference / name)
        assert got.keys() == want.keys()
        for key in want:
            if want[key].is_floating_point():
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-4,
                                           msg=f"{name}: {key}")
            else:  # BatchNorm's update counts are exact
                assert torch.equal(got[key], want[key]), f"{name}: {key}"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-process runs (in this process, through the CLI), one per set of flags."""
    runs: dict[tuple[str, ...], Path] = {}

    def get(*extra: str) -> Path:
        if extra not in runs:
            out = tmp_path_factory.mktemp("single") / "run"
            result = invoke(*TINY, *extra, "--out", str(out))
            assert result.exit_code == 0, result.output
            runs[extra] = out
        return runs[extra]

    return get


# ---------------------------------------------------------------------------------------------
# 1. The pipeline computes single-process parallel mode's weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("modules,in_flight", [(2, 1), (3, 2)])
def test_pipeline_equals_single_process_parallel_mode(tmp_path, single, modules, in_flight):
    """Launched by torchrun, one module per rank: the module files and the stitched model are
    single-process parallel mode's, bit for bit, for any --in-flight; the run folder holds the
    same files (rank 0 wrote them) and the report has every rank's memory and times."""
    reference = single("--modules", str(modules))
    done = torchrun(modules, [*TINY, "--modules", str(modules), "--distributed",
                              "--in-flight", str(in_flight), "--out", "run"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "run"
    assert_same_weights(reference, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())

    report = json.loads((out / "report.json").read_text())
    expected = json.loads((reference / "report.json").read_text())
    assert report["test_accuracy"] == expected["test_accuracy"]
    layout = report["distributed"]
    assert (layout["world_size"], layout["stages"], layout["replicas"],
            layout["in_flight"]) == (modules, modules, 1, in_flight)
    ranks = layout["ranks"]
    assert [r["rank"] for r in ranks] == list(range(modules))
    assert [r["stage"] for r in ranks] == list(range(modules))
    for r in ranks:
        assert r["peak_memory_bytes"] > 0 and r["images"] == 2 * 240
        assert r["communication_wait_s"] >= 0 and r["images_per_s"] > 0
    assert layout["images_per_s"] > 0
    # The same epoch numbers were logged, module by module.
    numbers = ("module", "epoch", "train_loss", "train_accuracy", "test_accuracy")
    assert [[e[k] for k in numbers] for e in events(out) if e["event"] == "epoch"] == \
        [[e[k] for k in numbers] for e in events(reference) if e["event"] == "epoch"]


# ---------------------------------------------------------------------------------------------
# 2. Replicas: the same global batch, up to floating-point order
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train_limit", ["240", "224"], ids=["short-shard", "empty-shard"])
def test_replicas_equal_single_process_at_the_same_global_batch(tmp_path, monkeypatch,
                                                                train_limit):
    """2 stages x 2 replicas (4 ranks) at --batch-size 64 against one process at batch 64
    trained in micro-batches of 32 (what the planner's gradient accumulation does): each
    replica's BatchNorm sees its 32-sample shard, as each micro-batch does, so only the order
    of floating-point sums differs (gradients: one all-reduce of two halves; BatchNorm's
    running statistics: recombined from both replicas). The last batch is 48 samples (shards
    32 + 16) or 32 (shards 32 + 0: the second replica only takes part in the all-reduce)."""
    from edgetrain.training import scheduler

    # At --lr 0.1 a single process run with 2 threads instead of 1 already differs by ~1e-2
    # after 8 steps (float rounding grows fast); at 0.02 by ~3e-4, and the replicas by ~4e-6.
    args = [*TINY, "--modules", "2", "--train-limit", train_limit, "--lr", "0.02"]
    reference = tmp_path / "micro"
    with monkeypatch.context() as patch:
        patch.setattr(scheduler.Context, "micro_batch", lambda self, phase: 32)
        result = invoke(*args, "--out", str(reference))
    assert result.exit_code == 0, result.output

    job = run_job(4, [*args, "--distributed", "--replicas", "2", "--out",
                      str(tmp_path / "run")], tmp_path / "logs")
    out = tmp_path / "run"
    assert_close_weights(out, reference)
    layout = json.loads((out / "report.json").read_text())["distributed"]
    assert (layout["world_size"], layout["stages"], layout["replicas"]) == (4, 2, 2)
    ranks = layout["ranks"]
    assert [(r["stage"], r["replica"]) for r in ranks] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert sum(r["images"] for r in ranks if r["stage"] == 0) == 2 * int(train_limit)
    # BatchNorm statistics after backward; gradients in DDP's buckets during backward.
    assert all(r["allreduce_s"] > 0 and r["grad_allreduce_s"] > 0 for r in ranks)
    assert job.text(1) == job.text(2) == job.text(3) == ""  # rank 0 alone prints the report


# ---------------------------------------------------------------------------------------------
# 2b. Sequential mode: each module in turn, data-parallel over every rank
# ---------------------------------------------------------------------------------------------

SEQUENTIAL = [*TINY[:TINY.index("--mode")], *TINY[TINY.index("--mode") + 2:], "--mode",
              "sequential", "--modules", "2", "--lr", "0.02"]


def with_model(args: list[str], *model: str) -> list[str]:
    """``args`` with ``--model resnet8 --widths ...`` replaced by ``model``."""
    i = args.index("--model")
    return [*args[:i], *model, *args[i + 4:]]


@pytest.mark.parametrize("cache,extra", [
    ("disk", ()), ("none", ()),
    # DDP with edgetrain's reentrant recompute needs static_graph (replicas.py); 224 = 3 x 64
    # + 32 leaves rank 1 an empty shard of the last batch, a graph of its own.
    ("disk", ("--activation-checkpointing", "--train-limit", "224")),
    # No BatchNorm: only the gradients are all-reduced (LayerNorm has no statistics).
    ("disk", ("vit-tiny",)),
    # The penalty weight follows the whole batch's cross-entropy on every rank: 1632 = 25 x 64
    # + 32 gives 52 steps a module, so lambda is updated at step 50 (and 32 + 0 shards). Over
    # 52 steps floating-point order alone moves module 2's weights by ~1e-3 (measured without
    # multipliers), past the weight tolerance: here lambda's path is what is compared.
    ("disk", ("--tau-schedule", "multipliers", "--train-limit", "1632")),
], ids=["disk", "none", "recompute-empty-shard", "vit", "multipliers"])
def test_sequential_replicas_equal_single_process_at_the_same_global_batch(
        tmp_path, monkeypatch, cache, extra):
    """--mode sequential on 2 ranks: module 1, then module 2 (on the cache rank 0 wrote into
    the shared --out, or on module 1 recomputed), each trained by both ranks on half of every
    batch (DistributedDataParallel); against one process at the same batch in micro-batches
    of one rank's shard."""
    from edgetrain.training import scheduler

    args = [*SEQUENTIAL, "--cache", cache]
    if extra == ("vit-tiny",):
        args = with_model(args, "--model", "vit-tiny")
    else:
        args += list(extra)
    reference = tmp_path / "micro"
    with monkeypatch.context() as patch:
        patch.setattr(scheduler.Context, "micro_batch", lambda self, phase: 32)
        result = invoke(*args, "--out", str(reference))
    assert result.exit_code == 0, result.output

    out = tmp_path / "run"
    job = run_job(2, [*args, "--distributed", "--replicas", "2", "--out", str(out)],
                  tmp_path / "logs")
    if "multipliers" not in extra:
        assert_close_weights(out, reference)
    report = json.loads((out / "report.json").read_text())
    want = json.loads((reference / "report.json").read_text())
    assert report["mode"] == "sequential" and len(report["modules"]) == 2
    for got_module, want_module in zip(report["modules"], want["modules"]):
        assert got_module["aux_test_accuracy"] == pytest.approx(
            want_module["aux_test_accuracy"], abs=0.02)
    layout = report["distributed"]
    assert (layout["world_size"], layout["stages"], layout["replicas"]) == (2, 1, 2)
    # Each rank stepped on its shard of every batch (240 = 3 x 64 + 48: shards 32 + 16 of
    # the last; 224: 32 + 0), of both modules, both epochs.
    n = int(args[len(args) - 1 - args[::-1].index("--train-limit") + 1])
    full, rest = divmod(n, 64)
    assert [r["images"] for r in layout["ranks"]] == [2 * 2 * (full * 32 + min(rest, 32)),
                                                      2 * 2 * (full * 32 + max(rest - 32, 0))]
    if "multipliers" in extra:  # lambda moved at step 50, as in one process (tau = lambda / 2)
        taus = [[(e["module"], e["epoch"], e["tau"]) for e in events(run)
                 if e["event"] == "epoch"] for run in (out, reference)]
        assert [t[:2] for t in taus[0]] == [t[:2] for t in taus[1]]
        assert all(t[2] > 0.5 for t in taus[1] if t[1] == 1)
        assert [t[2] for t in taus[0]] == pytest.approx([t[2] for t in taus[1]], rel=1e-3)
    assert all(r["grad_allreduce_s"] > 0 for r in layout["ranks"])
    assert all(r["checkpointing"] == ("--activation-checkpointing" in extra)
               for r in layout["ranks"])
    has_norms = extra != ("vit-tiny",)
    assert all((r["allreduce_s"] > 0) == has_norms for r in layout["ranks"])
    assert not (out / "cache").exists() and not (out / "checkpoints").exists()
    assert job.text(1) == ""  # rank 0 alone prints the report


def test_sequential_killed_rank_then_resume_equals_the_uninterrupted_job(tmp_path):
    """SIGKILL rank 1 while module 2 trains on rank 0's cache: the job stops naming it; the
    whole job restarted with --resume keeps module 1 (and its cache), continues module 2 from
    its epoch checkpoint, and ends with the uninterrupted job's weights bit for bit."""
    args = [*SEQUENTIAL, "--epochs", "4", "--train-limit", "480", "--distributed",
            "--replicas", "2", "--dist-timeout", "20"]
    whole = tmp_path / "whole"
    run_job(2, [*args, "--out", str(whole)], tmp_path / "logs-whole")

    out = tmp_path / "run"
    job = Job(2, [*args, "--out", str(out)], tmp_path / "logs")
    deadline = time.monotonic() + WAIT_S
    while not any(e["event"] == "epoch" and e.get("module") == 1 for e in events(out)):
        assert all(p.poll() is None for p in job.procs), job.output()
        assert time.monotonic() < deadline, job.output()
        time.sleep(0.02)
    os.kill(job.procs[1].pid, signal.SIGKILL)
    assert job.wait(ranks=[0]) == [3], job.output()
    assert "rank 1" in job.text(0), job.output()
    assert not (out / "report.json").exists()

    run_job(2, [*args, "--out", str(out), "--resume"], tmp_path / "logs-resume")
    assert any(e["event"] == "resume" for e in events(out))
    assert_same_weights(whole, out)


# ---------------------------------------------------------------------------------------------
# 3. A rank dies or hangs: the others stop in time, naming it; --resume finishes the run
# ---------------------------------------------------------------------------------------------

LONG = [*TINY, "--modules", "2", "--epochs", "6", "--train-limit", "480"]
"""Long enough that a rank can be stopped in the middle of training."""


@pytest.mark.parametrize("victim,how", [(1, "kill"), (1, "hang"), (0, "kill"), (0, "hang")],
                         ids=["kill-rank-1", "hang-rank-1", "kill-rank-0", "hang-rank-0"])
def test_dead_or_hung_rank_stops_the_job_then_resume_finishes(tmp_path, single, victim, how):
    out = tmp_path / "run"
    flags = [*LONG, "--distributed", "--dist-timeout", "6", "--out", str(out)]
    job = Job(2, flags, tmp_path / "logs")
    # Stop the victim once the first epoch checkpoint is written, mid-training.
    deadline = time.monotonic() + WAIT_S
    while not any(e["event"] == "epoch" for e in events(out)):
        assert all(p.poll() is None for p in job.procs), job.output()
        assert time.monotonic() < deadline, job.output()
        time.sleep(0.02)
    os.kill(job.procs[victim].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    stopped = time.monotonic()
    other = 1 - victim
    try:
        (code,) = job.wait(ranks=[other])
    finally:
        job.kill()  # the hung one
    # gloo sees a dead peer's connection close at once; a hung one only after the timeout.
    assert time.monotonic() - stopped < 6 + 30, job.output()
    assert code == 3, job.output()
    said = job.text(other)
    assert said.startswith("error: rank"), job.output()
    assert "Traceback" not in said
    assert said.startswith(f"error: rank {other}: ") and f"waiting on rank {victim}" in said, \
        job.output()
    assert "--resume" in said
    if how == "hang":
        assert "no answer within the timeout" in said and "--dist-timeout 6" in said
    assert not (out / "report.json").exists()
    assert any(e["event"] == "epoch" for e in events(out))

    resumed = run_job(2, [*flags, "--resume"], tmp_path / "logs-resume")
    assert "resume" in [e["event"] for e in events(out)], resumed.output()
    assert_same_weights(single("--modules", "2", "--epochs", "6", "--train-limit", "480"), out)


def test_killed_replica_then_resume_equals_the_uninterrupted_job(tmp_path):
    """2 stages x 2 replicas: SIGKILL the second replica of stage 2 mid-training; the job
    stops, and --resume (every stage's state sent from rank 0's checkpoint to both replicas)
    ends with the uninterrupted job's weights bit for bit."""
    args = [*LONG, "--epochs", "3", "--distributed", "--replicas", "2", "--dist-timeout", "20"]
    whole = tmp_path / "whole"
    run_job(4, [*args, "--out", str(whole)], tmp_path / "logs-whole")

    out = tmp_path / "run"
    job = Job(4, [*args, "--out", str(out)], tmp_path / "logs")
    deadline = time.monotonic() + WAIT_S
    while not any(e["event"] == "epoch" for e in events(out)):
        assert all(p.poll() is None for p in job.procs), job.output()
        assert time.monotonic() < deadline, job.output()
        time.sleep(0.02)
    os.kill(job.procs[3].pid, signal.SIGKILL)
    codes = job.wait(ranks=[0, 1, 2])
    assert codes == [3, 3, 3], job.output()
    # Its replica partner names it (alone in the all-reduce, among others in a gather).
    assert re.search(r"waiting on (rank 3\b|one of ranks [0-9, ]*\b3\b)", job.text(1)), \
        job.output()
    assert not (out / "report.json").exists()

    run_job(4, [*args, "--out", str(out), "--resume"], tmp_path / "logs-resume")
    assert_same_weights(whole, out)


# ---------------------------------------------------------------------------------------------
# 4. Launches that make no sense; rank 0 alone writes
# ---------------------------------------------------------------------------------------------

def refused(result, *needles: str) -> str:
    out = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert out.startswith("error:") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in out, f"{needle!r} not in: {result.output}"
    return out


@pytest.mark.parametrize("flags,needles", [
    (["--replicas", "2"], ["--replicas applies to --distributed"]),
    (["--in-flight", "2"], ["--in-flight applies to --distributed"]),
    (["--distributed", "--replicas", "0"], ["--replicas must be at least 1"]),
    (["--distributed", "--in-flight", "0"], ["--in-flight must be at least 1"]),
    (["--distributed", "--dist-timeout", "0"], ["--dist-timeout must be a positive"]),
    (["--distributed", "--replicas", "3"], ["--batch-size 64 must be a multiple of --replicas 3"]),
    (["--distributed", "--method", "e2e"], ["--method trgl or vanilla"]),
    (["--distributed", "--laps", "2", "--mode", "sequential"], ["--laps 1"]),
    (["--distributed", "--mode", "sequential", "--batch-growth", "2"],
     ["--batch-growth applies to single-process"]),
    (["--distributed"], ["not started by a distributed launcher", "torchrun"]),
], ids=["replicas-alone", "in-flight-alone", "replicas-0", "in-flight-0", "timeout-0",
        "batch-not-multiple", "e2e", "laps", "sequential-batch-growth", "no-launcher"])
def test_flags_that_make_no_sense_are_refused(tmp_path, monkeypatch, flags, needles):
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    out = tmp_path / "run"
    refused(invoke(*TINY, "--modules", "2", *flags, "--out", str(out)), *needles)
    assert not out.exists()


def test_world_size_not_modules_times_replicas_is_refused_and_nothing_is_touched(
        tmp_path, single):
    """3 processes for --modules 2 (x 1 replica), on a finished run with --overwrite: every
    rank says what to launch; the run folder is not touched."""
    out = tmp_path / "run"
    (tmp_path / "src").mkdir()
    import shutil

    shutil.copytree(single("--modules", "2"), out)
    before = snapshot(out)
    job = Job(3, [*TINY, "--modules", "2", "--distributed", "--overwrite", "--out", str(out)],
              tmp_path / "logs")
    assert job.wait() == [2, 2, 2], job.output()
    for rank in range(3):
        said = job.text(rank)
        assert said.startswith("error:") and "Traceback" not in said, job.output()
        assert "--modules 2 x --replicas 1 = 2 processes" in said and "started 3" in said
    assert snapshot(out) == before


def test_ranks_with_other_flags_are_refused_naming_them(tmp_path):
    out = tmp_path / "run"
    job = Job(2, [*TINY, "--modules", "2", "--distributed", "--out", str(out)],
              tmp_path / "logs", per_rank={1: ["--lr", "0.2"]})
    assert job.wait() == [2, 2], job.output()
    for rank in range(2):
        assert "rank(s) 1 were started with other flags than rank 0" in job.text(rank)
    assert not out.exists()


def test_rank_0_alone_writes_the_run_folder(tmp_path):
    """Each rank in its own working folder, all with `--out run`: only rank 0's gets one."""
    cwds = [tmp_path / f"host{r}" for r in range(2)]
    for cwd in cwds:
        cwd.mkdir()
    run_job(2, [*TINY, "--modules", "2", "--distributed", "--out", "run"], tmp_path / "logs",
            cwds=cwds)
    assert (cwds[0] / "run" / "report.json").exists()
    assert list(cwds[1].iterdir()) == []
