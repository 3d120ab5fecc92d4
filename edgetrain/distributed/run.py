"""`edgetrain fit --distributed`: one process of a torch.distributed job, from flags to report.

Every rank runs this with the same flags (torchrun starts them). Rank 0 owns the run folder:
it alone takes the lock, writes the marker, config, log, plan, checkpoints, module files and
the report; the other ranks send it what it writes (their epoch numbers, their state, their
memory and time) through torch.distributed, so they need no access to ``--out`` at all,
except in sequential mode with ``--cache disk``, where every rank reads its shard of the
cache: there ``--out`` must be a folder every node sees (one machine, or NFS).

    all ranks   read the launch env; join the job (topology.start); same flags? (checked)
    rank 0      --out: new, or --resume of a run (lock, stored config, data fingerprint)
    stage 0     load the dataset (later stages only learn its size and shape from rank 0)
    each rank   plan its own memory (planning.py), if --memory-budget
    rank 0      claim the run folder; write config, model.json, plan.json; log "start"
    all ranks   train: pipeline.py (--mode parallel) or sequential.py (--mode sequential)
    rank 0      gather every rank's peak memory and times; module files, stitched model,
                report.json

A setup step that fails on one rank fails on all (``step_together``): nobody is left waiting.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from contextlib import ExitStack

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from edgetrain.config import FitConfig
from edgetrain.data import DataBundle, load_dataset
from edgetrain.data.fingerprint import data_fingerprint
from edgetrain.distributed import planning, topology
from edgetrain.distributed.errors import LaunchError, PeerError
from edgetrain.distributed.topology import LaunchEnv, Topology, gather_all, talking
from edgetrain.errors import UserInputError
from edgetrain.memory import allocator
from edgetrain.memory.costs import NetworkCosts
from edgetrain.memory.layout import Layout, choose_split
from edgetrain.memory.meter import MemoryMeter, current_rss_bytes
from edgetrain.memory.planner import BudgetError, MemoryPlan
from edgetrain.models.catalog import family
from edgetrain.models.families import network_spec
from edgetrain.runs.files import write_json_atomic
from edgetrain.runs.progress import ProgressBars
from edgetrain.runs.rundir import RunDir, check_new_run, claim_new_run, open_for_resume
from edgetrain.runs.weights import RUN_ID_KEY, save_weights
from edgetrain.training import scheduler
from edgetrain.training.checkpoints import NonFiniteWeightsError
from edgetrain.training.steps import NonFiniteLossError


def fit_distributed(config: FitConfig, progress: bool = False,
                    on_plan: Callable[[MemoryPlan | None, Layout], None] | None = None
                    ) -> dict:
    """Run this rank's share of the job; rank 0 returns the report, the others a short
    summary (``{"secondary_rank": N, ...}``)."""
    config = config.validate().resolved()
    env = LaunchEnv.read()
    if problem := topology.world_problem(env.world_size, config.mode, config.modules,
                                         config.replicas):
        raise LaunchError(problem)
    device = _device(config.device, env)
    alloc = allocator.apply(device.type, config.mode, config.activation_checkpointing)
    framework_bytes = current_rss_bytes()
    if config.threads:
        torch.set_num_threads(config.threads)
    stages = config.modules if config.mode == "parallel" else 1
    topo = topology.start(env, stages, config.replicas, config.dist_timeout, device)
    clean = False
    try:
        topology.check_same_config(topo, config.to_json())
        with ExitStack() as held:
            result = _run(config, topo, framework_bytes, alloc, progress and env.rank == 0,
                          on_plan, held)
        clean = True
        return result
    finally:
        topology.finish(topo, clean)


def _device(name: str, env: LaunchEnv) -> torch.device:
    """Each rank's device: ``cuda:LOCAL_RANK`` on a GPU node (one GPU per process)."""
    from edgetrain.fit import resolve_device

    device = resolve_device(name)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise LaunchError(f"--distributed: LOCAL_RANK {env.local_rank} has no GPU of its own "
                          f"(this node has {count}): start at most {count} processes per node "
                          "(torchrun --nproc-per-node), one per GPU.")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def step_together(topo: Topology, what: str, action: Callable[[], object]):
    """Run ``action`` on this rank; if it fails on any rank, every rank stops with the
    failing rank's message (the failing rank raises its own error, with its exit code)."""
    error: BaseException | None = None
    result = None
    try:
        result = action()
    except Exception as e:  # shared, then re-raised below
        error = e
    note = None if error is None else (type(error).__name__, str(error))
    notes = gather_all(topo, note, what)
    if error is not None:
        raise error
    for rank, found in enumerate(notes):
        if found:
            kind = BudgetError if found[0] == "BudgetError" else LaunchError
            raise kind(f"{topo.describe(rank)} stopped while {what}: {found[1]}")
    return result


class _Elsewhere(Dataset):
    """A split this rank never reads (a pipeline stage after the first): its size only."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):  # an internal invariant: only stage 0 reads data
        raise RuntimeError("a pipeline stage after the first reads no data")


def _run(config: FitConfig, topo: Topology, framework_bytes: int,
         alloc: allocator.AllocatorState, progress: bool, on_plan, held: ExitStack) -> dict:
    from edgetrain.fit import read_stored_config, size_problem

    rank0 = topo.rank == 0
    device = topo.device
    resolved = {"threads": torch.get_num_threads() if device.type == "cpu" else None,
                "device": device.type}
    state: dict = {"run": RunDir(config.out), "stored": None, "stored_resolved": {}}

    def check_out() -> None:
        if not rank0:
            return
        if config.resume:
            run, lock, marker = open_for_resume(config.out)
            held.callback(lock.release)
            stored, stored_resolved = read_stored_config(run)
            scheduler.finished_module_records(run, stored.modules)
            changed = {k: (stored_resolved.get(k), v) for k, v in resolved.items()
                       if stored_resolved.get(k) not in (None, v)}
            if problem := config.resume_problem(stored, config.out, changed):
                raise UserInputError(problem)
            state.update(run=run, stored=stored, stored_resolved=stored_resolved,
                         marker=marker)
        else:
            check_new_run(config.out, config.overwrite)

    step_together(topo, "checking --out", check_out)

    # The data: read where it is used (stage 0 of each replica); the other stages learn its
    # size and shape from rank 0 and hold none of it.
    def read_data():
        if topo.stage != 0:
            return None
        data = load_dataset(config.dataset, config.data_dir, config.download,
                            config.image_size, config.train_limit, config.test_limit,
                            config.seed)
        return data

    data = step_together(topo, "reading the dataset", read_data)
    fingerprint = data_fingerprint(data) if data is not None else None
    facts = gather_all(topo, (fingerprint, data.info, len(data.train), len(data.test))
                       if data is not None else None, "sharing the dataset's facts")
    fingerprint0, info, n_train, n_test = facts[0]
    resolved["data_fingerprint"] = fingerprint0

    def check_data() -> None:
        if data is not None and fingerprint != fingerprint0:
            raise LaunchError(f"it reads other data than rank 0 (dataset {config.dataset}, "
                              f"--data-dir {config.data_dir or 'default'}): every rank must "
                              "see the same files.")
        stored_fp = state["stored_resolved"].get("data_fingerprint")
        if rank0 and state["stored"] is not None and stored_fp != fingerprint0:
            raise UserInputError(
                f"--resume: the data read now is not the data the run in {config.out} was "
                f"trained on (dataset {config.dataset}, --data-dir "
                f"{config.data_dir or 'default'}: its fingerprint differs). Point --data-dir "
                "at the run's own data, or start a new run in another --out.")

    step_together(topo, "checking the data", check_data)
    if data is None:
        data = DataBundle(_Elsewhere(n_train), _Elsewhere(n_test), info)
    spec = network_spec(config.model, info.in_channels, info.image_size, config.widths,
                        config.shortcut, config.pretrained)
    # The layout single-process `fit` would train (same split and heads for the same flags;
    # counted from shapes, so every rank computes the same one).
    costs = NetworkCosts.count(spec, info.image_size, info.num_classes,
                               need_transport=config.method == "trgl")
    layout = choose_split(spec, costs, config.modules, info.image_size, config.split,
                          config.head, config.batch_size, config.activation_checkpointing)
    plans = layout.plans(spec, info.image_size)

    def check_size() -> None:
        if problem := size_problem(config, spec, info, device):
            raise UserInputError(problem)

    step_together(topo, "checking the model's size", check_size)
    meter = MemoryMeter(device)
    ctx = scheduler.Context(config, data, spec, plans, scheduler.tau_for(config, len(plans)),
                            device,
                            state["run"], meter, ProgressBars(progress))

    def finished() -> dict | None:
        if not rank0 or state["stored"] is None:
            return None
        from edgetrain.fit import finished_report

        return finished_report(ctx)

    report = step_together(topo, "looking for a finished report", finished)
    if any(gather_all(topo, report is not None, "sharing whether the run is finished")):
        return report if rank0 else {"secondary_rank": topo.rank}

    shard = config.batch_size // config.replicas
    per_rank = 1 if config.mode == "parallel" else len(plans)
    my_plan = _plan(ctx, topo, state["stored"], shard, per_rank, framework_bytes)
    plans_all = gather_all(topo, my_plan, "sharing the memory plans")
    whole_plan = planning.combined(plans_all) if my_plan is not None else None
    if rank0 and whole_plan is not None and on_plan is not None:
        on_plan(whole_plan, layout)
    micros = gather_all(topo, [p.micro_batch for p in my_plan.phases] if my_plan else
                        [shard] * per_rank, "agreeing on micro-batches")

    config_json = json.dumps({**config.to_dict(), "resolved": resolved}, indent=2,
                             sort_keys=True)

    def claim() -> None:
        if not rank0:
            return
        run = state["run"]
        if state["stored"] is None:
            run, lock, marker = claim_new_run(config.out, config.overwrite, config_json)
            held.callback(lock.release)
            state.update(run=run, marker=marker)
        else:
            from edgetrain.fit import record_changes

            record_changes(run, state["stored"], config, config_json)
        ctx.run = run
        write_json_atomic(run.model_info_path, {
            "architecture": family(config.model), "model": config.model,
            "widths": list(config.widths), "shortcut": config.shortcut,
            "in_channels": info.in_channels, "num_classes": info.num_classes,
            "image_size": info.image_size, "mean": list(info.mean), "std": list(info.std),
            "dataset": info.name, "modules": [[p.start, p.stop] for p in plans],
            "heads": [p.head for p in plans]})
        run.log("resume" if config.resume else "start", device=str(device),
                run_id=state["marker"].run_id, memory_backend=meter.backend,
                framework_baseline_bytes=framework_bytes, allocator=alloc.as_dict(),
                distributed=_layout(topo, config))
        # As single-process fit writes it: the memory plan (with a budget) and the layout.
        plan_record = {**(whole_plan.as_dict() if whole_plan is not None else {}),
                       "layout": layout.as_dict()}
        write_json_atomic(run.plan_path, plan_record)
        run.log("plan", **plan_record)

    step_together(topo, "claiming the run folder", claim)
    checkpointing = [config.activation_checkpointing or bool(my_plan and p.checkpointing)
                     for p in (my_plan.phases if my_plan else [None] * per_rank)]

    start = time.perf_counter()
    meter.reset()
    try:
        if config.mode == "parallel":
            outcome = _train_pipeline(ctx, topo, micros, checkpointing, config)
        else:
            from edgetrain.distributed.sequential import train_sequential_replicas

            outcome = train_sequential_replicas(ctx, topo, micros, checkpointing)
    except BaseException as e:
        if rank0:
            ctx.run.log("stopped", reason=f"{type(e).__name__}: {e}",
                        **{k: getattr(e, k) for k in ("module", "epoch", "step", "rank")
                           if hasattr(e, k)})
        raise
    mine = {"rank": topo.rank, "stage": topo.stage, "replica": topo.replica,
            "host": socket.gethostname(), "device": str(device),
            "peak_memory_bytes": meter.read().peak_bytes,
            "framework_baseline_bytes": framework_bytes,
            "predicted_peak_bytes": max((p.predicted_peak_bytes for p in my_plan.phases),
                                        default=None) if my_plan else None,
            "allocator": alloc.as_dict(), **outcome["rank"]}
    ranks = gather_all(topo, mine, "gathering every rank's memory and times")
    if not rank0:
        return {"secondary_rank": topo.rank, "rank_report": mine}
    return _finish(ctx, topo, config, outcome, ranks, whole_plan, framework_bytes, alloc,
                   time.perf_counter() - start)


def _plan(ctx, topo: Topology, stored, shard: int, per_rank: int, framework_bytes: int
          ) -> MemoryPlan | None:
    """This rank's plan: the resumed run's own (rank 0 reads it and hands each rank its
    slice), or probed now on this rank's device."""
    config = ctx.config
    if config.memory_budget is None:
        return None
    old = None
    if topo.rank == 0:
        old = planning.stored_plan(ctx, stored, topo.world_size, per_rank, shard)
    box = [old]
    with talking(topo, "sharing the stored memory plan", 0):
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        return planning.slice_plan(box[0], topo.rank, per_rank)
    return step_together(topo, "planning memory", lambda: planning.plan_rank(
        ctx, topo, config.in_flight, shard, framework_bytes))


def _layout(topo: Topology, config: FitConfig) -> dict:
    return {"world_size": topo.world_size, "stages": topo.stages, "replicas": topo.replicas,
            "in_flight": config.in_flight if config.mode == "parallel" else None,
            "backend": topo.data_backend, "control_backend": "gloo",
            "timeout_s": topo.timeout_s, "rank_order": "replica-major: rank = replica x "
            "stages + stage"}


def _train_pipeline(ctx, topo: Topology, micros: list[list[int]], checkpointing: list[bool],
                    config: FitConfig) -> dict:
    from edgetrain.distributed.pipeline import train_pipeline

    stage_micro = min(micros[topo.rank_of(topo.stage, r)][0] for r in range(topo.replicas))
    eval_shard = min(m[0] for m in micros)
    stage, result = train_pipeline(ctx, topo, stage_micro, eval_shard, config.in_flight,
                                   checkpointing[0])
    # DDP (and its reducer's threads) go now, while the process groups still exist: left to
    # the interpreter's exit, after destroy_process_group, a rank was seen to abort there.
    stage.close()
    timers = stage.timers
    return {"kind": "pipeline", "result": result, "micro": stage_micro,
            "rank": {"train_time_s": round(result.train_time_s, 3),
                     "images_per_s": round(timers.images / max(result.train_time_s, 1e-9), 1),
                     "micro_batch": stage_micro, "checkpointing": checkpointing[0],
                     **timers.as_dict(),
                     "communication_wait_s": round(timers.recv_wait_s + timers.send_wait_s
                                                   + timers.allreduce_s + timers.sync_s, 3)}}


def _finish(ctx, topo: Topology, config: FitConfig, outcome: dict, ranks: list[dict],
            plan: MemoryPlan | None, framework_bytes: int, alloc, wall: float) -> dict:
    """Rank 0: module files, the stitched model, the module records, the report."""
    from edgetrain.fit import accuracy_metrics

    run = ctx.run
    if outcome["kind"] == "pipeline":
        result = outcome["result"]
        modules = []
        for k, payload in enumerate(result.payloads):
            stage_ranks = [i for i in ranks if i["stage"] == k]
            state = {**{f"module.{n}": t for n, t in payload["module"].items()},
                     **{f"head.{n}": t for n, t in payload["head"].items()}}
            _save_module(run, k, state, config.epochs - 1)
            modules.append(_module_record(ctx, k, result.accuracies[k], stage_ranks))
            run.log("module", **modules[-1])
        last = result.payloads[-1]
        network = {f"stages.{k}.{n}": t for k, p in enumerate(result.payloads)
                   for n, t in p["module"].items()}
        network.update({f"head.{n}": t for n, t in last["head"].items()})
        accuracy = result.accuracies[-1]
        epochs_trained = config.epochs - result.first_epoch
    else:
        modules, network, accuracy = outcome["modules"], outcome["network"], outcome["accuracy"]
        epochs_trained = None
    save_weights(run.model_path, network,
                 {"format": "edgetrain-stitched-v1", RUN_ID_KEY: run.run_id})
    train_peak = max(r["peak_memory_bytes"] for r in ranks)
    slowest = max(r["train_time_s"] for r in ranks)
    images = (len(ctx.data.train) * epochs_trained if epochs_trained is not None
              else outcome.get("images"))
    phases = [{"phase": topo.describe(r["rank"]),
               "predicted_peak_bytes": r["predicted_peak_bytes"],
               "measured_peak_bytes": r["peak_memory_bytes"],
               "within_budget": None if config.memory_budget is None
               else r["peak_memory_bytes"] <= config.memory_budget.bytes} for r in ranks]
    meter = ctx.meter
    report = {
        "run_id": run.run_id,
        "test_accuracy": accuracy,
        "accuracy_metrics": accuracy_metrics(run, accuracy),
        "modules": modules,
        "wall_time_s": round(wall, 3),
        "peak_memory_bytes": train_peak,
        "train_peak_memory_bytes": train_peak,
        "training_memory_bytes": max((r["peak_memory_bytes"] if meter.backend == "cuda" else
                                      r["peak_memory_bytes"] - r["framework_baseline_bytes"])
                                     for r in ranks),
        "eval_peak_memory_bytes": None,
        "framework_baseline_bytes": framework_bytes,
        "memory_backend": meter.backend,
        "memory_measured": f"per rank: {meter.description}; peak_memory_bytes is the "
                           "largest rank's",
        "allocator": alloc.as_dict(),
        "memory_budget_bytes": config.memory_budget.bytes if config.memory_budget else None,
        "memory_budget": str(config.memory_budget) if config.memory_budget else None,
        "device_profile": config.extra.get("device_profile"),
        "simulated": config.extra.get("simulated"),
        "memory_plan": plan.as_dict() if plan else None,
        "phases": phases,
        "budget_exceeded": any(p["within_budget"] is False for p in phases),
        "method": config.method, "mode": config.mode, "cache": config.cache,
        "activation_checkpointing": config.activation_checkpointing,
        "cache_dtype": config.cache_dtype, "cache_views": config.cache_views,
        "dataset": config.dataset, "model": config.model, "num_modules": config.modules,
        "epochs": config.epochs, "laps": config.laps, "batch_size": config.batch_size,
        "seed": config.seed, "lr_schedule": config.lr_schedule,
        "num_parameters": sum(t.numel() for n, t in network.items()
                              if "running_" not in n and "num_batches" not in n),
        "train_samples": len(ctx.data.train), "test_samples": len(ctx.data.test),
        "device": str(ctx.device), "device_name": _device_name(ctx.device),
        "torch_version": torch.__version__,
        "distributed": {**_layout(topo, config),
                        "images_per_s": round(images / max(slowest, 1e-9), 1)
                        if images else None,
                        "train_time_s": round(slowest, 3),
                        "ranks": ranks},
    }
    run.write_report(report)
    run.remove("checkpoints")
    run.log("done", test_accuracy=accuracy, wall_time_s=report["wall_time_s"])
    return report


def _module_record(ctx, k: int, accuracy: float | None, stage_ranks: list[dict]) -> dict:
    plan = ctx.plans[k]
    predicted = [r["predicted_peak_bytes"] for r in stage_ranks
                 if r["predicted_peak_bytes"] is not None]
    return {"module": k, "lap": 0, "blocks": [plan.start, plan.stop], "tau": ctx.taus[k],
            "predicted_peak_memory_bytes": max(predicted) if predicted else None,
            "micro_batch": stage_ranks[0]["micro_batch"],
            "checkpointing": any(r["checkpointing"] for r in stage_ranks),
            "aux_test_accuracy": accuracy,
            "train_time_s": max(r["train_time_s"] for r in stage_ranks),
            "train_peak_memory_bytes": max(r["peak_memory_bytes"] for r in stage_ranks),
            "cache_time_s": 0.0, "cache_peak_memory_bytes": None,
            "ranks": [r["rank"] for r in stage_ranks]}


def _save_module(run: RunDir, k: int, state: dict, epoch: int) -> None:
    """modules/module_K.safetensors, as single-process training writes it; never a diverged
    module."""
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteLossError(k, epoch, None, "non-finite weights",
                                 str(NonFiniteWeightsError(bad)))
    save_weights(run.module_path(k), state, {"module": k, RUN_ID_KEY: run.run_id})


def _device_name(device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


__all__ = ["PeerError", "fit_distributed"]
