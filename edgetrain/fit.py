"""`fit`: one training run from a config to a run folder with weights and a report."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace

import torch

from edgetrain.config import RESUME_CHANGEABLE, FitConfig
from edgetrain.data import load_dataset
from edgetrain.data.fingerprint import data_fingerprint
from edgetrain.errors import UserInputError
from edgetrain.memory import allocator
from edgetrain.memory.costs import NetworkCosts
from edgetrain.memory.layout import Layout, choose_num_modules, choose_split
from edgetrain.memory.meter import MemoryMeter, current_rss_bytes, long_lived_objects_frozen
from edgetrain.memory.planner import BudgetExceededError, MemoryPlan, make_plan, usable_bytes
from edgetrain.models.catalog import CUSTOM, family
from edgetrain.models.families import CustomSpec, network_spec
from edgetrain.models.split import split_network
from edgetrain.records import Fields, RecordError, read_json_object
from edgetrain.runs.files import write_json_atomic
from edgetrain.runs.progress import ProgressBars
from edgetrain.runs.rundir import RunDir, check_new_run, claim_new_run, open_for_resume
from edgetrain.runs.weights import RUN_ID_KEY, save_weights, weights_problem
from edgetrain.training import scheduler
from edgetrain.units import format_bytes


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError(
            "--device cuda was asked for, but this torch sees no CUDA device "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). "
            "Use --device cpu, or install a CUDA build of torch on a machine with a GPU."
        )
    return torch.device(name)


def fit(config: FitConfig, progress: bool = False,
        on_plan: Callable[[MemoryPlan | None, Layout], None] | None = None,
        blocks: list | None = None) -> dict:
    """Train as ``config`` says; write everything to ``config.out``; return the report.

    ``blocks``: a network given from Python (model ``custom``, edgetrain/models/families.py
    CustomSpec) instead of a named one; edgetrain.api.fit is the documented way in.

    The layout planner cuts the network into modules first (``--split``, ``--head``,
    ``--modules auto``). With a memory budget, the planner then probes every phase and either
    fits it into the budget or raises BudgetError; the guard then compares each phase's
    measured peak with the budget (``report["budget_exceeded"]``). ``on_plan`` sees the memory
    plan (None without a budget) and the layout before training starts.

    The run folder is locked (runs/lock.py) from before the first write (or, with
    ``--resume``, the first read) until this returns: a second process gets a clear error.
    """
    if config.distributed:
        raise UserInputError("--distributed runs through edgetrain.distributed.run."
                             "fit_distributed (the `edgetrain fit` command dispatches there); "
                             "this process trains alone.")
    config = config.validate(None if blocks is None else len(blocks)).resolved()
    if config.backend == "ort":
        # Before anything is read or written: is onnxruntime-training importable here?
        from edgetrain.onnx.runtime import training_api

        training_api("--backend ort")
    device = resolve_device(config.device)
    # How freed tensor memory is kept and given back, before anything is built: the planner's
    # probes below run under the same policy as training (edgetrain/memory/allocator.py).
    alloc = allocator.apply(device.type, None if config.method == "e2e" else config.mode,
                            config.activation_checkpointing,
                            budgeted=config.memory_budget is not None)
    # Framework baseline: what the process holds before any data or model exists (torch,
    # its libraries, Python). Reported apart from training memory.
    framework_bytes = current_rss_bytes()
    if config.threads:
        torch.set_num_threads(config.threads)
    with ExitStack() as held:
        return _fit(config, device, framework_bytes, alloc, progress, on_plan, held, blocks)


def _fit(config: FitConfig, device: torch.device, framework_bytes: int,
         alloc: allocator.AllocatorState, progress: bool, on_plan, held: ExitStack,
         blocks: list | None) -> dict:
    resolved = {"threads": torch.get_num_threads() if device.type == "cpu" else None,
                "device": device.type}
    stored: FitConfig | None = None
    run = RunDir(config.out)  # with the run id once claimed (new) or opened (--resume)
    if config.resume:
        # Locked before anything of the run is read: nobody else writes it from here on.
        run, lock, marker = open_for_resume(config.out)
        held.callback(lock.release)
        stored, stored_resolved = read_stored_config(run)
        # The log, checked before use (against the K the run resolved: --modules auto).
        stored_k = stored.modules if stored.modules is not None else \
            stored_resolved.get("modules")
        scheduler.finished_module_records(run, stored_k if isinstance(stored_k, int) else None)
        changed = {k: (stored_resolved.get(k), v) for k, v in resolved.items()
                   if stored_resolved.get(k) not in (None, v)}
        if problem := config.resume_problem(stored, config.out, changed):
            raise UserInputError(problem)
    else:
        # Refuse an occupied --out before spending time on data and probes; the folder is
        # claimed (locked, checked again, written) after them.
        check_new_run(config.out, config.overwrite)
    data = load_dataset(config.dataset, config.data_dir, config.download, config.image_size,
                        config.train_limit, config.test_limit, config.seed)
    held.enter_context(long_lived_objects_frozen())
    resolved["data_fingerprint"] = data_fingerprint(data)
    if stored is not None and stored_resolved.get("data_fingerprint") != \
            resolved["data_fingerprint"]:
        raise UserInputError(
            f"--resume: the data read now is not the data the run in {config.out} was trained "
            f"on (dataset {config.dataset}, --data-dir {config.data_dir or 'default'}: its "
            "fingerprint differs). Point --data-dir at the run's own data, or start a new run "
            "in another --out.")
    spec = (CustomSpec(blocks, data.info.in_channels, data.info.image_size) if blocks is not None
            else network_spec(config.model, data.info.in_channels, data.info.image_size,
                              config.widths, config.shortcut, config.pretrained))
    if problem := size_problem(config, spec, data.info, device):
        raise UserInputError(problem)
    meter = MemoryMeter(device)
    ctx = scheduler.Context(config, data, spec, [], [], device, run, meter,
                            ProgressBars(progress))
    if config.backend == "ort":
        from edgetrain.onnx.ort_training import train_module_ort

        ctx.train_module_with = train_module_ort  # the scheduler imports no backend
    budget_reference = None
    if config.memory_budget is not None and config.memory_budget.fraction is not None:
        config, budget_reference = _resolve_relative_budget(ctx)
        ctx.config = config
        resolved["memory_budget_bytes"] = config.memory_budget.bytes
    # Probes (--modules auto, then the memory plan) measure each candidate module once.
    lines: dict = {}
    layout = _layout(ctx, stored, lines, framework_bytes)
    ctx.plans = layout.plans(spec, data.info.image_size)
    ctx.taus = scheduler.tau_for(config, len(ctx.plans))
    resolved["modules"] = len(ctx.plans)
    if stored is not None:
        report = finished_report(ctx)
        if report is not None:
            return report  # finished already, outputs intact: nothing to redo
    if config.memory_budget is not None:
        ctx.memory_plan = _memory_plan(ctx, stored, framework_bytes, lines)
        if heap_held(device):
            # From here on every phase starts with tcmalloc's heap held to the budget
            # (MemoryMeter.reset); the limit is lifted when fit returns, however it ends.
            meter.budget_bytes = config.memory_budget.bytes
            held.callback(allocator.hold_heap_to, None, 0)
    if on_plan is not None:
        on_plan(ctx.memory_plan, layout)
    config_json = json.dumps({**config.to_dict(), "resolved": resolved}, indent=2,
                             sort_keys=True)
    if stored is None:
        # Only now is anything written: a budget that cannot be met leaves no run folder.
        run, lock, marker = claim_new_run(config.out, config.overwrite, config_json)
        held.callback(lock.release)
    else:
        record_changes(run, stored, config, config_json)
    ctx.run = run
    write_json_atomic(run.model_info_path, {
        "architecture": family(config.model) if blocks is None else CUSTOM,
        "model": config.model, "widths": list(config.widths),
        "shortcut": config.shortcut,
        "in_channels": data.info.in_channels, "num_classes": data.info.num_classes,
        "image_size": data.info.image_size, "mean": list(data.info.mean),
        "std": list(data.info.std), "dataset": data.info.name,
        "modules": [[p.start, p.stop] for p in ctx.plans],
        "heads": [p.head for p in ctx.plans],
    })
    run.log("resume" if config.resume else "start", device=str(device), run_id=marker.run_id,
            memory_backend=meter.backend, framework_baseline_bytes=framework_bytes,
            allocator=alloc.as_dict())
    plan_record = {**(ctx.memory_plan.as_dict() if ctx.memory_plan else {}),
                   "layout": layout.as_dict()}
    write_json_atomic(run.plan_path, plan_record)
    run.log("plan", **plan_record)

    start = time.perf_counter()
    try:
        network, modules, train_peak, accuracy, eval_peak = _train(ctx)
    except BaseException as e:
        # Say in the log why the run stopped; finished modules and checkpoints stay.
        run.log("stopped", reason=f"{type(e).__name__}: {e}",
                **{k: getattr(e, k) for k in ("module", "epoch", "step") if hasattr(e, k)})
        if meter.heap_limit_bytes is not None and isinstance(e, RuntimeError) and \
                "can't allocate memory" in str(e):
            raise over_budget(config, meter.heap_limit_bytes) from e
        raise
    wall = time.perf_counter() - start
    save_weights(run.model_path, network.state_dict(),
                 {"format": "edgetrain-stitched-v1", RUN_ID_KEY: run.run_id})

    cache_peaks = [m["cache_peak_memory_bytes"] for m in modules
                   if m.get("cache_peak_memory_bytes") is not None]
    phases_report = guard(ctx, modules, train_peak, eval_peak)
    report = {
        "run_id": marker.run_id,
        "test_accuracy": accuracy,
        # The honest headline is test_accuracy (the stitched network after its last epoch, on
        # the whole test set); these two stand beside it to compare with other reports.
        "accuracy_metrics": accuracy_metrics(run, accuracy),
        "modules": modules,
        "wall_time_s": round(wall, 3),
        "peak_memory_bytes": max([train_peak, eval_peak, *cache_peaks]),
        "train_peak_memory_bytes": train_peak,
        # What training added on top of the framework (torch and its libraries, loaded before
        # anything was built): the figure module-wise training exists to shrink.
        # On a discrete GPU the allocator's peak holds no framework: it is all training memory.
        "training_memory_bytes": (max([train_peak, *cache_peaks]) if meter.backend == "cuda"
                                  else max(0, max([train_peak, *cache_peaks]) - framework_bytes)),
        "eval_peak_memory_bytes": eval_peak,
        "framework_baseline_bytes": framework_bytes,
        "memory_backend": meter.backend,
        "memory_measured": meter.description,
        "allocator": alloc.as_dict(),
        "memory_budget_bytes": config.memory_budget.bytes if config.memory_budget else None,
        "memory_budget": str(config.memory_budget) if config.memory_budget else None,
        # Whether tcmalloc's heap was held to the budget (edgetrain/memory/allocator.py), and
        # the heap limit of the last phase (the budget less what was resident outside the heap).
        "heap_held_to_budget": meter.budget_bytes is not None,
        "heap_limit_bytes": meter.heap_limit_bytes,
        # --memory-budget 50%: what end-to-end training was probed to need, and the base.
        "memory_budget_reference": budget_reference,
        "device_profile": config.extra.get("device_profile"),
        "simulated": config.extra.get("simulated"),
        "memory_plan": ctx.memory_plan.as_dict() if ctx.memory_plan else None,
        "phases": phases_report,
        "budget_exceeded": any(p["within_budget"] is False for p in phases_report),
        "method": config.method, "mode": config.mode, "cache": config.cache,
        "activation_checkpointing": config.activation_checkpointing,
        "cache_dtype": config.cache_dtype, "cache_views": config.cache_views,
        "dataset": config.dataset, "model": config.model, "num_modules": len(ctx.plans),
        "split": layout.strategy, "module_sizes": list(layout.sizes),
        "heads": list(layout.heads), "layout_reason": layout.reason,
        "modules_reason": layout.modules_reason, "batch_growth": config.batch_growth,
        "epochs": config.epochs, "laps": config.laps, "batch_size": config.batch_size,
        "seed": config.seed, "lr_schedule": config.lr_schedule,
        "num_parameters": sum(p.numel() for p in network.parameters()),
        "train_samples": len(data.train), "test_samples": len(data.test),
        "device": str(device), "device_name": _device_name(device),
        "torch_version": torch.__version__,
    }
    run.write_report(report)
    # The report marks the run finished (a --resume returns it), so the last epoch
    # checkpoint is dead weight now; only edgetrain's own checkpoint files are removed.
    run.remove("checkpoints")
    run.log("done", test_accuracy=accuracy, wall_time_s=report["wall_time_s"])
    return report


def accuracy_metrics(run: RunDir, final: float) -> dict:
    """The run's accuracy three ways, from its epoch log.

    ``last_epoch``: the stitched network after training, whole test set (the headline).
    ``train_last_epoch``: that head's training accuracy over its last epoch (near 1: it fits
    the training set, where a regulariser can help).
    ``mean_last_3_epochs``: the classifier head (the last module's, or the network's) over its
    last three evaluated epochs, whole test set: less noisy than one epoch.
    ``best_over_epochs_and_modules_half``: the largest accuracy any head reached after any
    epoch, on a fixed random half of the test set: the authors' metric (it selects on the test
    data, so it reads high; shown for comparison with the paper only).
    """
    epochs = [e for e in run.read_metrics() if e["event"] == "epoch"]
    last_module = max((e["module"] for e in epochs if e.get("module") is not None),
                      default=None)
    final_head = [e["test_accuracy"] for e in epochs if e.get("module") == last_module
                  and isinstance(e.get("test_accuracy"), (int, float))]
    halves = [e["test_accuracy_half"] for e in epochs
              if isinstance(e.get("test_accuracy_half"), (int, float))]
    tail = final_head[-3:]
    train = [e.get("train_accuracy") for e in epochs if e.get("module") == last_module]
    return {"last_epoch": final,
            "train_last_epoch": train[-1] if train else None,
            "mean_last_3_epochs": sum(tail) / len(tail) if tail else None,
            "best_over_epochs_and_modules_half": max(halves) if halves else None}


def size_problem(config: FitConfig, spec, info, device: torch.device) -> str | None:
    """Why the network or a batch cannot possibly fit this machine, or None; nothing is
    allocated to find out. Weights, gradients and momentum take three copies of the
    parameters; one input batch is batch x C x H x W floats. (The planner measures the real
    need under --memory-budget; this only stops sizes that would end in the OOM killer.)"""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        import psutil

        total = psutil.virtual_memory().total
    weights = 3 * 4 * spec.parameter_count()
    batch = 4 * config.batch_size * info.in_channels * info.image_size ** 2
    if weights > total:
        return (f"--model {config.model} has "
                f"{spec.parameter_count():,} parameters: with gradients and momentum "
                f"{format_bytes(weights)}, more than this machine's {format_bytes(total)}. "
                "Choose a smaller --model (or, for a CIFAR ResNet, narrower --widths).")
    if batch > total:
        return (f"--batch-size {config.batch_size} at {info.image_size}x{info.image_size} px "
                f"needs {format_bytes(batch)} for one input batch alone, more than this "
                f"machine's {format_bytes(total)}. Choose a smaller --batch-size.")
    return None


def read_stored_config(run: RunDir) -> tuple[FitConfig, dict]:
    """The resumed run's config and what its flags resolved to, both checked."""
    data = read_json_object(run.config_path)
    stored = FitConfig.from_dict(data, str(run.config_path))
    resolved = Fields(data, run.config_path).object("resolved", optional=True)
    if resolved is None:
        return stored, {}
    return stored, {"threads": resolved.int("threads", low=1, optional=True),
                    "device": resolved.str("device", choices=("cpu", "cuda")),
                    "data_fingerprint": resolved.str("data_fingerprint")}


def record_changes(run: RunDir, stored: FitConfig, config: FitConfig, config_json: str) -> None:
    """A resumption with --allow-changes: config.json takes the new values and keeps the
    history; the module in progress starts again if an optimisation setting changed."""
    changes = config.resume_differences(stored)
    if not changes:
        return
    history = read_json_object(run.config_path).get("resume_changes", [])
    done = sorted(scheduler.finished_module_indices(run))
    history = [*(history if isinstance(history, list) else []),
               {"time": round(time.time(), 3), "finished_modules": done,
                "changed": {k: list(v) for k, v in changes.items()}}]
    data = json.loads(config_json)
    data["resume_changes"] = history
    write_json_atomic(run.config_path, data)
    restart = [k for k in changes if RESUME_CHANGEABLE.get(k)]
    run.log("resume_changes", changed={k: list(v) for k, v in changes.items()},
            finished_modules=done, restarts_module_in_progress=bool(restart))
    if restart:
        # Its epoch checkpoint was made under the old value (the diverged lr, say): the module
        # in progress trains again from the start; finished modules stay as they are.
        run.remove("checkpoints")


def _resolve_relative_budget(ctx: scheduler.Context) -> tuple[FitConfig, dict]:
    """``--memory-budget 50%``: probe end-to-end training of this network at this batch (the
    planner's own prober, in this process, before anything else is built) and take that share
    of what it adds above the memory the process holds now (framework and data; on a GPU, the
    allocator's count starts at 0). The budget then works as a size would."""
    from edgetrain.memory.planner import fit_line
    from edgetrain.models.split import plan_modules
    from edgetrain.training.probes import end_to_end_prober

    config = ctx.config
    base = 0 if ctx.meter.backend == "cuda" else current_rss_bytes()
    planned = ctx.plans
    ctx.plans = plan_modules(ctx.spec, [len(ctx.spec.blocks)], ctx.data.info.image_size)
    try:
        fixed, per_sample, _ = fit_line(end_to_end_prober(ctx), config.batch_size, False,
                                        ctx.meter)
    finally:
        ctx.plans = planned
    e2e = int(fixed + per_sample * config.batch_size)
    size = base + int(config.memory_budget.fraction * max(0, e2e - base))
    reference = {"e2e_predicted_peak_bytes": e2e, "base_bytes": base,
                 "fraction": config.memory_budget.fraction, "budget_bytes": size}
    return replace(config, memory_budget=config.memory_budget.resolved(size)), reference


def finished_report(ctx: scheduler.Context) -> dict | None:
    """The report of a finished run whose outputs are all there and intact; None if the run
    is not finished, or if an output is missing or damaged (then the report is withdrawn, so
    the resumption rebuilds what is needed)."""
    run = ctx.run
    if not run.report_path.exists():
        return None
    from edgetrain.runs.model import ModelInfo

    problems = [p for p in [weights_problem(run.model_path, run.run_id, ctx.network_shapes())]
                if p]
    if ctx.config.method != "e2e":
        problems += [p for k in range(len(ctx.plans))
                     if (p := weights_problem(run.module_path(k), run.run_id,
                                              ctx.module_shapes(k)))]
    try:
        ModelInfo.read(run.model_info_path)
        report = run.read_report(complete=True)
        if report.get("run_id") != run.run_id:
            problems.append(f"{run.report_path} is the report of another run (run id "
                            f"{report.get('run_id')}; this run's is {run.run_id})")
    except RecordError as e:
        problems.append(str(e))
    if not problems:
        return report
    run.log("outputs_damaged", problems=problems)
    run.report_path.unlink()
    return None


def _memory_plan(ctx: scheduler.Context, stored: FitConfig | None,
                 framework_bytes: int, lines: dict) -> MemoryPlan:
    """The plan of a resumed run as it was made (plan.json), unless the budget changed or the
    file is damaged; otherwise the planner probes every phase now (``lines``: phases probed
    already, by ``--modules auto``)."""
    config = ctx.config
    if stored is not None and stored.memory_budget == config.memory_budget and \
            stored.batch_size == config.batch_size:
        phases = 1 if config.method == "e2e" or config.mode == "parallel" else len(ctx.plans)
        try:
            return MemoryPlan.read(ctx.run.plan_path, phases, config.batch_size,
                                   config.batch_growth)
        except RecordError as e:
            ctx.run.log("plan_remade", reason=str(e))
    from edgetrain.training.probes import phases

    return make_plan(phases(ctx), config.batch_size, config.memory_budget.bytes, ctx.meter,
                     framework_bytes=framework_bytes, held=heap_held(ctx.device),
                     budget_text=str(config.memory_budget), alternatives=E2E_ALTERNATIVES
                     if config.method == "e2e" else None,
                     lines=lines, growth=config.batch_growth, max_batch=len(ctx.data.train))


def _layout(ctx: scheduler.Context, stored: FitConfig | None, lines: dict,
            framework_bytes: int) -> Layout:
    """How the network is cut (edgetrain/memory/layout.py). A resumed run's layout is the one
    it started with: plan.json's, or model.json's where plan.json cannot be read (runs from
    before layouts were recorded: their config's split, which those versions computed the
    same way)."""
    config, spec, info = ctx.config, ctx.spec, ctx.data.info
    if stored is not None:
        try:
            record = read_json_object(ctx.run.plan_path)
            if "layout" in record:
                return Layout.from_dict(record["layout"], ctx.run.plan_path, len(spec.blocks))
        except RecordError as e:
            ctx.run.log("plan_remade", reason=str(e))
        from edgetrain.runs.model import ModelInfo

        try:
            model = ModelInfo.read(ctx.run.model_info_path)
            sizes = tuple(b - a for a, b in model.modules)
            return Layout(config.split, sizes, model.heads, config.head, config.batch_size,
                          (0,) * len(sizes), "read from model.json (plan.json had no layout)")
        except (RecordError, OSError):
            pass  # nothing was trained from a layout yet: plan one
    if config.method == "e2e":
        sizes = tuple(p.num_blocks for p in split_network(spec, config.modules, info.image_size,
                                                          "even"))
        return Layout("even", sizes, ("dgl" if config.head == "auto" else config.head,)
                      * len(sizes), config.head, config.batch_size, (0,) * len(sizes),
                      "end to end: the split only groups the blocks, the last head classifies")
    costs = NetworkCosts.count(spec, info.image_size, info.num_classes,
                               need_transport=config.method == "trgl")
    if config.modules is not None:
        return choose_split(spec, costs, config.modules, info.image_size, config.split,
                            config.head, config.batch_size, config.activation_checkpointing)
    from edgetrain.training.probes import layout_verdict

    usable = usable_bytes(config.memory_budget.bytes, framework_bytes, heap_held(ctx.device))
    verdict = layout_verdict(ctx, lambda k: scheduler.tau_for(config, k), usable, lines)
    return choose_num_modules(spec, costs, info.image_size, config.split, config.head,
                              config.batch_size, verdict)


def _train(ctx: scheduler.Context):
    """Train as the config says, stitch, evaluate: ``(network, modules, train_peak, accuracy,
    eval_peak)``."""
    config, meter = ctx.config, ctx.meter
    with ctx.bars:
        if config.method == "e2e":
            modules: list[dict] = []
            network = scheduler.train_end_to_end(ctx)
            train_peak = meter.read().peak_bytes
        else:
            train = (scheduler.train_parallel if config.mode == "parallel"
                     else scheduler.train_sequential)
            modules = train(ctx)
            train_peak = max(m["train_peak_memory_bytes"] for m in modules)
            network = scheduler.stitch(ctx)
        meter.reset()
        accuracy = scheduler.test_accuracy(ctx, network)
        eval_peak = meter.read().peak_bytes
    return network, modules, train_peak, accuracy, eval_peak


E2E_ALTERNATIVES = ("train module-wise (--method trgl or vanilla with --modules K or --modules "
                    "auto: one module's activations at a time, not the network's), or use a "
                    "smaller --model or --widths.")


def heap_held(device: torch.device) -> bool:
    """Whether a budgeted run on this device holds the CPU allocator to its budget."""
    return device.type == "cpu" and allocator.can_hold_heap()


def over_budget(config: FitConfig, heap_limit: int) -> BudgetExceededError:
    """The error of a run whose allocator, held to --memory-budget, could not serve it."""
    return BudgetExceededError(
        f"--memory-budget {config.memory_budget}: training needed more memory than the budget "
        f"holds, and stopped (tcmalloc's heap is held to the budget: {format_bytes(heap_limit)} "
        f"of it besides what is resident outside the heap). Finished modules and the last "
        f"epoch checkpoint are kept in {config.out}. Continue with a larger budget: the same "
        f"command with --resume --allow-changes memory-budget and a larger --memory-budget "
        f"(what is left is planned anew); or with {allocator.HOLD_ENV}=0 in the environment, "
        "where the allocator is not held and the run may go over the budget (report.json then "
        "says by how much).")


def guard(ctx: scheduler.Context, modules: list[dict], train_peak: int, eval_peak: int
          ) -> list[dict]:
    """Each phase's predicted and measured peak, and whether it stayed within the budget."""
    budget = ctx.config.memory_budget.bytes if ctx.config.memory_budget else None
    plan = ctx.memory_plan
    rows = []
    if ctx.config.method != "e2e" and ctx.config.mode == "sequential":
        for m in modules:
            measured = max(m["train_peak_memory_bytes"], m["cache_peak_memory_bytes"] or 0)
            rows.append((f"module {m['module'] + 1}", m["predicted_peak_memory_bytes"],
                         measured))
    else:
        rows.append((plan.phases[0].phase if plan else "training",
                     plan.phases[0].predicted_peak_bytes if plan else None, train_peak))
    rows.append(("final evaluation", None, eval_peak))
    return [{"phase": name, "predicted_peak_bytes": predicted, "measured_peak_bytes": measured,
             "within_budget": None if budget is None else measured <= budget}
            for name, predicted, measured in rows]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
