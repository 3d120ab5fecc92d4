"""`fit`: one training run from a config to a run folder with weights and a report."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable

import torch

from edgetrain.config import FitConfig
from edgetrain.data import load_dataset
from edgetrain.errors import UserInputError
from edgetrain.memory import allocator
from edgetrain.memory.meter import MemoryMeter, current_rss_bytes
from edgetrain.memory.planner import MemoryPlan, make_plan
from edgetrain.models.resnet import resnet_spec
from edgetrain.models.split import split_network
from edgetrain.runs.files import save_weights, write_json_atomic
from edgetrain.runs.progress import ProgressBars
from edgetrain.runs.rundir import RunDir, check_run_dir, open_for_resume, prepare_run_dir
from edgetrain.training import scheduler


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
        on_plan: Callable[[MemoryPlan], None] | None = None) -> dict:
    """Train as ``config`` says; write everything to ``config.out``; return the report.

    With a memory budget, the planner probes every phase first and either fits it into the
    budget (``on_plan`` sees the plan before training starts) or raises BudgetError; the guard
    then compares each phase's measured peak with the budget (``report["budget_exceeded"]``).
    """
    config = config.validate().resolved()
    device = resolve_device(config.device)
    # How freed tensor memory is kept and given back, before anything is built: the planner's
    # probes below run under the same policy as training (edgetrain/memory/allocator.py).
    alloc = allocator.apply(device.type, None if config.method == "e2e" else config.mode,
                            config.activation_checkpointing)
    # Framework baseline: what the process holds before any data or model exists (torch,
    # its libraries, Python). Reported apart from training memory.
    framework_bytes = current_rss_bytes()
    if config.threads:
        torch.set_num_threads(config.threads)
    data = load_dataset(config.dataset, config.data_dir, config.download, config.image_size,
                        config.train_limit, config.test_limit, config.seed)
    spec = resnet_spec(config.model, data.info.in_channels, config.widths)
    plans = split_network(spec, config.modules, data.info.image_size, config.split)
    if config.resume:
        previous = open_for_resume(config.out)
        stored = FitConfig.from_dict(json.loads(previous.config_path.read_text()))
        conflicts = config.resume_conflicts(stored)
        if conflicts:
            raise UserInputError(
                f"--resume: the run in {config.out} was started with different settings: "
                + "; ".join(conflicts) + ". Resume with the run's own flags, or start a new "
                "run in another --out."
            )
        if previous.report_path.exists():
            return previous.read_report()  # finished already: nothing to redo
    else:
        # Refuse an occupied --out before spending time on probes; the folder is written after.
        check_run_dir(config.out, config.overwrite)
    meter = MemoryMeter(device)
    ctx = scheduler.Context(config, data, spec, plans, scheduler.tau_for(config), device,
                            RunDir(config.out), meter, ProgressBars(progress))
    if config.memory_budget is not None:
        from edgetrain.training.probes import phases

        # Before anything is written: a budget that cannot be met leaves no run folder behind.
        ctx.memory_plan = make_plan(phases(ctx), config.batch_size, config.memory_budget, meter,
                                    framework_bytes=framework_bytes,
                                    budget_text=config.memory_budget_text)
        if on_plan is not None:
            on_plan(ctx.memory_plan)
    run = ctx.run = (RunDir(config.out) if config.resume else
                     prepare_run_dir(config.out, config.to_json(), config.overwrite))
    write_json_atomic(run.model_info_path, {
        "architecture": "cifar-resnet", "model": config.model, "widths": list(config.widths),
        "in_channels": data.info.in_channels, "num_classes": data.info.num_classes,
        "image_size": data.info.image_size, "mean": list(data.info.mean),
        "std": list(data.info.std), "dataset": data.info.name,
        "modules": [[p.start, p.stop] for p in plans],
    })
    run.log("resume" if config.resume else "start", device=str(device),
            memory_backend=meter.backend, framework_baseline_bytes=framework_bytes,
            allocator=alloc.as_dict())
    if ctx.memory_plan is not None:
        write_json_atomic(run.root / "plan.json", ctx.memory_plan.as_dict())
        run.log("plan", **ctx.memory_plan.as_dict())

    start = time.perf_counter()
    try:
        network, modules, train_peak, accuracy, eval_peak = _train(ctx)
    except BaseException as e:
        # Say in the log why the run stopped; finished modules and checkpoints stay.
        run.log("stopped", reason=f"{type(e).__name__}: {e}",
                **{k: getattr(e, k) for k in ("module", "epoch", "step") if hasattr(e, k)})
        raise
    wall = time.perf_counter() - start
    save_weights(run.model_path, network.state_dict(), {"format": "edgetrain-stitched-v1"})

    cache_peaks = [m["cache_peak_memory_bytes"] for m in modules
                   if m.get("cache_peak_memory_bytes") is not None]
    phases_report = guard(ctx, modules, train_peak, eval_peak)
    report = {
        "test_accuracy": accuracy,
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
        "memory_budget_bytes": config.memory_budget,
        "device_profile": config.extra.get("device_profile"),
        "simulated": config.extra.get("simulated"),
        "memory_plan": ctx.memory_plan.as_dict() if ctx.memory_plan else None,
        "phases": phases_report,
        "budget_exceeded": any(p["within_budget"] is False for p in phases_report),
        "method": config.method, "mode": config.mode, "cache": config.cache,
        "activation_checkpointing": config.activation_checkpointing,
        "cache_dtype": config.cache_dtype, "cache_views": config.cache_views,
        "dataset": config.dataset, "model": config.model, "num_modules": config.modules,
        "epochs": config.epochs, "batch_size": config.batch_size, "seed": config.seed,
        "num_parameters": sum(p.numel() for p in network.parameters()),
        "train_samples": len(data.train), "test_samples": len(data.test),
        "device": str(device), "device_name": _device_name(device),
        "torch_version": torch.__version__,
    }
    run.write_report(report)
    run.log("done", test_accuracy=accuracy, wall_time_s=report["wall_time_s"])
    return report


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


def guard(ctx: scheduler.Context, modules: list[dict], train_peak: int, eval_peak: int
          ) -> list[dict]:
    """Each phase's predicted and measured peak, and whether it stayed within the budget."""
    budget = ctx.config.memory_budget
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
