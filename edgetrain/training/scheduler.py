"""The scheduler: train a network module by module (TRGL), or end to end as the baseline.

Sequential mode, the heart of edgetrain::

    for k in 1..K:
        load module k and its head onto the device      # nothing else of the network
        for epoch in 1..E:
            for x, y in inputs_k(epoch):                   # raw data for k = 1, else cache k-1
                loss = CE(head_k(T_k(x)), y) + 1/(2 tau_k) * sum_b mean(r_b^2)
                backward, step                             # peak memory: module k's activations
        freeze module k                                    # eval mode, BN frozen, no grads
        write T_k(train views), T_k(test) to cache k       # on disk, in chunks
        save module k's weights; free module k, its head, its optimizer, cache k-1
    stitch modules 1..K + head K; evaluate it on the raw test set

With ``--cache none`` module k instead recomputes frozen modules 1..k-1 on every batch (the
authors' way), which keeps fresh augmentation for every module at the price of compute and of
keeping the frozen weights in memory.

Parallel mode: every batch flows through all modules; module k takes its own backward and
optimizer step on the detached output of module k-1, so only one module's activations are
alive at a time, but all weights and optimizer states are.

End to end (``--method e2e``): the same stitched network, the same data, batch size, epochs and
optimiser, trained with backpropagation through everything: the baseline every report compares
with.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from edgetrain.cache import CacheWriter, FeatureCache, cache_is_valid
from edgetrain.config import FitConfig
from edgetrain.data import DataBundle, augment_batch, iterate_batches, normalize
from edgetrain.errors import UserInputError
from edgetrain.memory.meter import MemoryMeter
from edgetrain.memory.planner import MemoryPlan
from edgetrain.models.network import (
    StitchedNetwork,
    build_head,
    build_module,
    build_network,
    load_module_state,
    module_state,
)
from edgetrain.models.resnet import ResNetSpec
from edgetrain.models.split import ModulePlan
from edgetrain.records import Fields
from edgetrain.runs.progress import ProgressBars
from edgetrain.runs.rundir import RunDir, check_module_record
from edgetrain.runs.weights import RUN_ID_KEY, load_weights, save_weights, weights_problem
from edgetrain.training.checkpoints import (
    CheckpointDamagedError,
    NonFiniteWeightsError,
    load_checkpoint,
    save_checkpoint,
)
from edgetrain.training.phase import Optim, Phase
from edgetrain.training.steps import (
    EpochStats,
    NonFiniteLossError,
    accumulate,
    evaluate,
    freeze,
    set_train,
    test_half,
)
from edgetrain.training.transport import Multipliers, tau_schedule

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Context:
    """What every phase of one run needs; built once by :func:`fit`."""

    config: FitConfig
    data: DataBundle
    spec: ResNetSpec
    plans: list[ModulePlan]
    taus: list[float]
    device: torch.device
    run: RunDir
    meter: MemoryMeter
    bars: ProgressBars
    memory_plan: MemoryPlan | None = None
    lap: int = 0
    """The lap of multi-lap sequential training in progress (0 for one lap)."""
    train_module_with: Callable | None = None
    """The backend that trains one module of sequential mode, ``(ctx, k, module, head,
    frozen) -> test accuracy or None``: None is torch autograd (train_module_torch). The
    caller passes ONNX Runtime's (edgetrain/onnx/ort_training.py) for --backend ort, so the
    scheduler never imports a backend."""
    test_cached: set[tuple[int, int]] = field(default_factory=set)
    """``(lap, module)`` steps whose test cache this process wrote during the module's last
    evaluation (:func:`evaluate_module`), so the cache pass skips the test split."""

    @property
    def epochs_per_lap(self) -> int:
        return self.config.epochs // self.config.laps

    def checkpoint_name(self, k: int) -> str:
        """Epoch checkpoint of module ``k`` in the current lap."""
        return str(k) if self.lap == 0 else f"lap{self.lap}_{k}"

    def micro_batch(self, phase: int) -> int | None:
        """The planner's micro-batch for this phase (None: the whole batch at once)."""
        if self.memory_plan is None:
            return None
        return self.memory_plan.phase(phase).micro_batch

    def batch_size(self, phase: int = 0) -> int:
        """The batch this phase trains at: --batch-size, or the larger one the planner gave
        the module (--batch-growth)."""
        if self.memory_plan is None:
            return self.config.batch_size
        return self.memory_plan.phase(phase).batch_size

    def lr(self, phase: int = 0) -> float:
        """--lr, scaled with the phase's batch (linear scaling rule: k times the batch, k times
        the learning rate)."""
        return self.config.lr * self.batch_size(phase) / self.config.batch_size

    def finished_modules(self) -> dict[tuple[int, int], dict]:
        """``(lap, module)`` steps an earlier run of this folder finished: result logged,
        weights saved and intact (checksum). From the first module that fails the check on,
        nothing counts as finished: modules after a damaged one were trained on its outputs,
        so they are trained again with it. A module file of another run (its run id), or one
        that does not hold the module this run's configuration builds, is not finished either.
        With several laps a module file holds its latest lap only, so a damaged one sends
        training back to the start."""
        logged = finished_module_records(self.run, len(self.plans))
        for k in sorted({k for _, k in logged}):
            if problem := weights_problem(self.run.module_path(k), self.run.run_id,
                                          self.module_shapes(k)):
                retrain = [step for step in logged if step[1] >= k] if self.config.laps == 1 \
                    else list(logged)
                self.run.log("module_damaged", module=k, problem=problem,
                             retrain=[list(step) for step in sorted(retrain)])
                return {step: r for step, r in logged.items() if step not in retrain}
        return logged

    def module_shapes(self, k: int) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor of module ``k`` and its head, as saved (built on
        the meta device: nothing is allocated)."""
        with torch.device("meta"):
            return {name: tuple(t.shape) for name, t in module_state(
                build_module(self.spec, self.plans[k]),
                build_head(self.plans[k], self.num_classes)).items()}

    def network_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor of the stitched network (model.safetensors)."""
        with torch.device("meta"):
            network = build_network(self.spec, self.plans, self.num_classes)
            return {name: tuple(t.shape) for name, t in network.state_dict().items()}

    def inference_batch_size(self, phase: int | None = None) -> int:
        """Batch size for evaluation and caching: the planned micro-batch, so inference never
        holds more activations than the training the planner fitted into the budget."""
        if self.memory_plan is None:
            return self.config.batch_size
        phases = self.memory_plan.phases
        if phase is None or len(phases) == 1:
            return min(p.micro_batch for p in phases)
        return phases[phase].micro_batch

    def checkpointing(self, phase: int) -> bool:
        planned = self.memory_plan is not None and self.memory_plan.phase(phase).checkpointing
        return self.config.activation_checkpointing or planned

    @property
    def num_classes(self) -> int:
        return self.data.info.num_classes

    @functools.cached_property
    def test_half(self) -> torch.Tensor:
        """The fixed random half of the test set the authors' metric is computed on."""
        return test_half(len(self.data.test), self.config.seed)

    def generator(self, *salt: int) -> torch.Generator:
        """A CPU generator seeded from the run's seed and ``salt``: reproducible, independent
        streams for data order and augmentation of each module and epoch."""
        g = torch.Generator()
        g.manual_seed(hash((self.config.seed, *salt)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g


def finished_module_records(run: RunDir, num_modules: int | None = None
                            ) -> dict[tuple[int, int], dict]:
    """The "module" records of the run's log, by ``(lap, module)`` (the last one of each
    wins); RecordError if a record is malformed (every field that is reused is checked)."""
    done = {}
    for e in run.read_metrics():
        if e["event"] != "module":
            continue
        f = Fields(e, run.metrics_path, " (a 'module' record)")
        k = check_module_record(f, num_modules)
        lap = f.int("lap", low=0, optional=True) or 0
        done[lap, k] = {key: v for key, v in e.items() if key not in ("event", "time")}
    return done


def finished_module_indices(run: RunDir) -> set[int]:
    return {k for _, k in finished_module_records(run)}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def raw_batches(ctx: Context, train: bool, shuffle: bool, augment_seed: int | None,
                order_seed: int = 0, batch_size: int | None = None) -> Batches:
    """Raw images as normalised float batches on the device, augmented if ``augment_seed``."""
    dataset = ctx.data.train if train else ctx.data.test
    info = ctx.data.info
    order = ctx.generator(1, order_seed) if shuffle else None
    aug = ctx.generator(2, augment_seed) if augment_seed is not None else None
    for images, labels in iterate_batches(dataset, batch_size or ctx.config.batch_size, shuffle,
                                          order):
        images = images.to(ctx.device, non_blocking=True)
        if aug is not None:
            images = augment_batch(images, info.crop_padding, info.hflip, aug)
        x = normalize(images, info)
        # Only the normalised batch lives through the step (this frame would keep the
        # augmented images alive while suspended).
        del images
        yield x, labels.to(ctx.device, non_blocking=True)


def cached_batches(ctx: Context, directory, shuffle: bool, order_seed: int = 0,
                   batch_size: int | None = None, part: tuple[int, int] | None = None
                   ) -> Batches:
    """Batches of a module's cached outputs, read from disk a batch at a time (``part``: only
    those samples of each batch, see :meth:`FeatureCache.batches`)."""
    order = ctx.generator(3, order_seed) if shuffle else None
    with FeatureCache.open(directory, verify=False) as cache:
        for features, labels in cache.batches(batch_size or ctx.config.batch_size, shuffle,
                                              order, part=part):
            # Features are stored in --cache-dtype; compute runs in float32. The stored copy
            # goes before the step (a float16 batch would stay alive in this frame).
            x = features.to(ctx.device, torch.float32, non_blocking=True)
            del features
            yield x, labels.to(ctx.device, non_blocking=True)


def through_frozen(frozen: list[nn.Module], batches: Batches) -> Batches:
    """Apply frozen modules without autograd: their activations are freed layer by layer."""
    for x, y in batches:
        with torch.inference_mode():
            for stage in frozen:
                x, _ = stage(x, need_transport=False)
        # inference tensors cannot enter autograd; a plain clone can (one batch, small).
        yield x.clone(), y


def module_inputs(ctx: Context, k: int, train: bool, epoch: int,
                  frozen: list[nn.Module], part: tuple[int, int] | None = None) -> Batches:
    """The input of module ``k``: raw data (k = 0), cache k-1, or raw data through the frozen
    modules (``--cache none``). Training batches are shuffled, test batches are not.
    ``part=(start, size)``: from the cache only those samples of each batch are read (a
    data-parallel rank's shard); the other sources give whole batches."""
    cfg = ctx.config
    batch_size = ctx.batch_size(k) if train else ctx.inference_batch_size(k)
    if k > 0 and cfg.cache == "disk":
        split = f"train_v{epoch % cfg.cache_views}" if train else "test"
        return cached_batches(ctx, ctx.run.cache_dir(k - 1, split), shuffle=train,
                              order_seed=k * 10_000 + epoch, batch_size=batch_size, part=part)
    raw = raw_batches(ctx, train, shuffle=train,
                      augment_seed=(k * 10_000 + epoch) if train else None,
                      order_seed=k * 10_000 + epoch, batch_size=batch_size)
    return through_frozen(frozen, raw) if frozen else raw


# ---------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------

def writes_cache(ctx: Context, k: int) -> bool:
    """Module ``k``'s outputs are cached for module k+1 (sequential mode, --cache disk)."""
    return (ctx.config.mode == "sequential" and ctx.config.cache == "disk"
            and k < len(ctx.plans) - 1)


def cache_writer(ctx: Context, k: int, split: str) -> CacheWriter:
    plan = ctx.plans[k]
    count = len(ctx.data.test if split == "test" else ctx.data.train)
    return CacheWriter(ctx.run.cache_dir(k, split),
                       (plan.out_channels, plan.out_size, plan.out_size), count,
                       ctx.config.cache_dtype)


def cache_splits(ctx: Context, test: bool = True) -> list[tuple[str, bool, int]]:
    """``(split, is_training_set, view)`` of every cache a module writes."""
    return ([(f"train_v{v}", True, v) for v in range(ctx.config.cache_views)]
            + ([("test", False, 0)] if test else []))


def cache_inputs(ctx: Context, k: int, split: str, train: bool, view: int,
                 upstream: list[nn.Module] | None = None) -> Batches:
    """Module ``k``'s inputs for its cache pass over ``split``, in sample order (see
    :func:`cache_outputs`)."""
    batch_size = ctx.inference_batch_size(k)
    if k == 0 or upstream:
        # From the raw data (through ``upstream`` frozen modules when rebuilding a cache);
        # view v's augmentation is seeded as when module 1 first cached it.
        inputs = raw_batches(ctx, train, shuffle=False,
                             augment_seed=(1_000_000 + view) if view > 0 else None,
                             batch_size=batch_size)
        return through_frozen(upstream, inputs) if upstream else inputs
    return cached_batches(ctx, ctx.run.cache_dir(k - 1, split), shuffle=False,
                          batch_size=batch_size)


@torch.inference_mode()
def cache_outputs(ctx: Context, k: int, module: nn.Module, head: nn.Module,
                  upstream: list[nn.Module] | None = None, test: bool = True) -> float | None:
    """Write module ``k``'s outputs for every cached training view and for the test set;
    return its head's test accuracy, computed on the way. ``upstream``: modules 1..k-1, to
    compute module k's input from raw data (rebuilding a cache) instead of reading cache k-1.
    ``test=False``: the test split was written already (by the module's last evaluation);
    return None.

    View 0 is the un-augmented training set, view v > 0 a fixed random augmentation of it.
    A view of module k is computed from the same view of module k-1, so every module sees
    the same augmented images in one view.
    """
    accuracy = None
    for split, train, view in cache_splits(ctx, test):
        inputs = cache_inputs(ctx, k, split, train, view, upstream)
        count = len(ctx.data.train if train else ctx.data.test)
        correct = 0
        with ctx.bars.task(f"  cache {split:<9}", total=count) as update, \
                cache_writer(ctx, k, split) as writer:
            for x, y in inputs:
                out, _ = module(x, need_transport=False)
                writer.append(out, y)
                if not train:
                    correct += int((head(out).argmax(1) == y).sum())
                update(len(y))
        if not train:
            accuracy = correct / count
    return accuracy


# ---------------------------------------------------------------------------------------------
# Sequential mode
# ---------------------------------------------------------------------------------------------

def train_sequential(ctx: Context) -> list[dict]:
    """Train the modules one after the other; with ``--laps N``, N passes over them, each
    module continuing from its weights of the lap before for E/N epochs (its optimiser and
    schedule start afresh). Retraining a module invalidates the caches after it: they are
    rebuilt in order, as each later module is reached. Returns the last lap's results."""
    cfg = ctx.config
    results: dict[int, dict] = {}
    done = ctx.finished_modules()
    for lap in range(cfg.laps):
        ctx.lap = lap
        frozen: list[nn.Module] = []  # only used with --cache none
        for k, plan in enumerate(ctx.plans):
            if (lap, k) in done:
                # Resuming: module k finished this lap in an earlier run. Keep its logged
                # result; make sure what the next module reads from it is there and intact.
                # (A cache written in an earlier lap never survives into this one: each lap
                # ends by removing every cache, and cache k is rewritten when module k
                # finishes a lap, before the log says so.)
                results[k] = done[lap, k]
                if cfg.cache == "none":
                    frozen.append(freeze(load_module(ctx, k)[0]))
                elif k < len(ctx.plans) - 1 and (lap, k + 1) not in done:
                    ensure_cache(ctx, k)
                continue
            results[k] = train_one_module(ctx, k, plan, frozen)
        if cfg.cache == "disk":
            ctx.run.remove("cache")
    return [results[k] for k in range(len(ctx.plans))]


def train_one_module(ctx: Context, k: int, plan: ModulePlan, frozen: list[nn.Module]) -> dict:
    """Module k's step of the current lap: build (or reload) it, train, freeze, cache, save."""
    cfg = ctx.config
    ctx.meter.reset()
    start = time.perf_counter()
    # Only module k and its head are built: nothing else of the network is allocated.
    phase = Phase.module(ctx.spec, plan, ctx.num_classes, ctx.device, Optim.of(cfg, ctx.lr(k)),
                         ctx.epochs_per_lap * steps_per_epoch(ctx, k), ctx.taus[k],
                         init=cfg.init, gain=cfg.init_gain, seed=cfg.seed * 1000 + k,
                         checkpointing=ctx.checkpointing(k),
                         label_smoothing=cfg.label_smoothing)
    module, head = phase.model, phase.head
    if ctx.lap > 0:
        # A later lap continues from the module's weights of the lap before.
        saved, saved_head = load_module(ctx, k)
        module.load_state_dict(saved.state_dict())
        head.load_state_dict(saved_head.state_dict())
        del saved, saved_head
        set_train(module, head)
        module.requires_grad_(True)
        head.requires_grad_(True)
    train = ctx.train_module_with or train_module_torch
    test_acc = train(ctx, k, phase, frozen)
    # The optimiser's momentum buffers (as large as the weights) go before caching starts.
    del phase
    train_peak = ctx.meter.read().peak_bytes
    train_time = time.perf_counter() - start

    # Frozen from here on: BatchNorm keeps its running statistics, nothing needs grads.
    freeze(module)
    freeze(head)
    cache_time, cache_peak = 0.0, None
    last = ctx.epochs_per_lap - 1
    if writes_cache(ctx, k):
        ctx.meter.reset()
        t = time.perf_counter()
        # The last epoch's evaluation wrote the test split, unless that epoch ran in an
        # earlier process (a resumed run): then it is written here.
        tested = (ctx.lap, k) in ctx.test_cached
        try:
            accuracy = cache_outputs(ctx, k, module, head, test=not tested)
        except BaseException:
            # A cache pass that fails (a full disk) leaves no part of cache k behind, the
            # test split the last evaluation wrote included: its space is the resumed run's.
            ctx.run.remove(f"cache/module_{k}")
            raise
        test_acc = test_acc if tested else accuracy
        cache_time, cache_peak = time.perf_counter() - t, ctx.meter.read().peak_bytes
    elif test_acc is None:
        test_acc, _ = evaluate_module(ctx, k, last, module, head, frozen, force=True)
    # The module's weights, then its "module" log line, mark it finished: a run killed
    # before both exist redoes the module from its last epoch checkpoint. A module whose
    # weights are not finite is never saved as finished.
    _save_module(ctx, k, module, head, last,
                 {"module": k, "lap": ctx.lap, "blocks": f"{plan.start}:{plan.stop}"})
    result = _module_result(ctx, k, test_acc, train_time, train_peak, cache_time, cache_peak)
    ctx.run.log("module", **result)
    ctx.run.checkpoint_path(ctx.checkpoint_name(k)).unlink(missing_ok=True)
    if k > 0:
        # Module k+1 reads only cache k: cache k-1 is dead weight on the disk.
        ctx.run.remove(f"cache/module_{k - 1}")
    if cfg.cache == "none":
        frozen.append(module)  # kept (weights only) to recompute its outputs every batch
    # Free module k before module k+1 is built: its weights, grads and head go now (the
    # caller keeps ``module`` only in ``frozen``, with --cache none).
    del module, head
    gc.collect()
    return result


def load_module(ctx: Context, k: int) -> tuple[nn.Module, nn.Module]:
    """Module ``k`` and its head from the run folder, on the device."""
    plan = ctx.plans[k]
    module, head = build_module(ctx.spec, plan), build_head(plan, ctx.num_classes)
    state = load_weights(ctx.run.module_path(k))
    load_module_state(module, head, state)
    return module.to(ctx.device), head.to(ctx.device)


def ensure_cache(ctx: Context, k: int) -> None:
    """Check module ``k``'s cache against its manifests (sizes and checksums); rebuild it from
    the raw data through the saved modules 1..k if any part is missing or corrupt."""
    splits = [f"train_v{v}" for v in range(ctx.config.cache_views)] + ["test"]
    bad = [s for s in splits if not cache_is_valid(ctx.run.cache_dir(k, s))]
    if not bad:
        return
    ctx.run.log("cache_rebuild", module=k, invalid=bad)
    stages = [freeze(load_module(ctx, i)[0]) for i in range(k + 1)]
    head = freeze(load_module(ctx, k)[1])
    cache_outputs(ctx, k, stages[-1], head, upstream=stages[:-1])
    del stages, head


def train_module_torch(ctx: Context, k: int, phase: Phase, frozen: list[nn.Module]
                       ) -> float | None:
    """Train module ``k`` and its head (``phase``) with torch autograd; return the head's last
    test accuracy (None if not evaluated)."""
    cfg = ctx.config
    module, head, opt, sched = phase.model, phase.head, phase.opt, phase.sched
    epochs = ctx.epochs_per_lap
    # Data order and augmentation are seeded by the epoch counted over all laps, so each lap
    # sees new orders (and one lap draws exactly what it always did).
    offset = ctx.lap * epochs
    steps = epochs * steps_per_epoch(ctx, k)
    test_acc = None
    multipliers = Multipliers() if cfg.tau_schedule == "multipliers" else None
    parts, optimizers = {"module": module, "head": head}, {"opt": (opt, sched)}
    if multipliers is not None:
        parts["multipliers"] = multipliers  # its lambda is part of the checkpoint
    name = ctx.checkpoint_name(k)
    first = _resume_point(ctx, name, parts, optimizers)
    lap = f", lap {ctx.lap + 1}/{cfg.laps}" if cfg.laps > 1 else ""
    with ctx.bars.task(f"module {k + 1}/{len(ctx.plans)}{lap}", total=steps) as update:
        update(advance=first * steps_per_epoch(ctx, k))
        for epoch in range(first, epochs):
            set_train(module, head)
            stats = EpochStats()
            for step, (x, y) in enumerate(module_inputs(ctx, k, True, offset + epoch, frozen)):
                tau = multipliers.tau if multipliers is not None else ctx.taus[k]
                _, numbers = phase.step(x, y, ctx.micro_batch(k), keep_output=False, tau=tau)
                accumulate_or_stop(stats, numbers, len(y), k, epoch, step)
                if multipliers is not None:
                    multipliers.update(float(numbers["ce"]))
                update(status=f"epoch {epoch + 1}/{epochs}")
            test_acc, test_half = evaluate_module(ctx, k, epoch, module, head, frozen)
            # Checkpoint first, then log: a kill in between repeats an epoch line, never
            # loses an epoch.
            _checkpoint(ctx, name, k, epoch, parts, optimizers)
            ctx.run.log("epoch", module=k, epoch=epoch, lr=sched.get_last_lr()[0],
                        test_accuracy=test_acc, test_accuracy_half=test_half,
                        **({"lap": ctx.lap} if cfg.laps > 1 else {}),
                        **({"tau": multipliers.tau} if multipliers is not None else {}),
                        **stats.as_dict())
    return test_acc


def evaluate_module(ctx: Context, k: int, epoch: int, module: nn.Module, head: nn.Module,
                     frozen: list[nn.Module], force: bool = False
                     ) -> tuple[float | None, float | None]:
    """The head's test accuracy, on the whole test set and on its fixed half (or Nones when
    this epoch is not evaluated)."""
    last_epoch = epoch == ctx.epochs_per_lap - 1
    if not (ctx.config.eval_every_epoch or last_epoch or force):
        return None, None
    module.eval()
    head.eval()
    inputs = module_inputs(ctx, k, False, epoch, frozen)
    if not (last_epoch and writes_cache(ctx, k)):
        result = evaluate([module], [head], inputs, ctx.test_half)
        return result.full[0], result.half[0]
    # The last evaluation runs module k, with its final weights and in eval mode, over the
    # test set: exactly the outputs module k+1's test cache holds. They are written on the
    # way, and the cache pass after training skips the test split (one forward pass over the
    # test set per module saved). Memory: one batch's outputs, cast to the cache dtype.
    try:
        with cache_writer(ctx, k, "test") as writer:
            result = evaluate([module], [head], inputs, ctx.test_half, sink=writer.append)
    except UserInputError:
        # A full disk (the writer removed its partial files). The epoch's checkpoint comes
        # after this evaluation and must not be lost to it: evaluate without the cache, and let
        # the cache pass, after the checkpoint, write the test split or say what it needs.
        result = evaluate([module], [head], module_inputs(ctx, k, False, epoch, frozen),
                          ctx.test_half)
        return result.full[0], result.half[0]
    ctx.test_cached.add((ctx.lap, k))
    return result.full[0], result.half[0]


# ---------------------------------------------------------------------------------------------
# Parallel mode
# ---------------------------------------------------------------------------------------------

def train_parallel(ctx: Context) -> list[dict]:
    cfg = ctx.config
    done = ctx.finished_modules()
    if len(done) == len(ctx.plans):
        # Resuming a run whose modules were all saved (only its report was missing).
        return [done[k] for k in range(len(ctx.plans))]
    ctx.meter.reset()
    start = time.perf_counter()
    steps = cfg.epochs * steps_per_epoch(ctx)
    phases = [Phase.module(ctx.spec, plan, ctx.num_classes, ctx.device, Optim.of(cfg), steps,
                           ctx.taus[k], init=cfg.init, gain=cfg.init_gain,
                           seed=cfg.seed * 1000 + k, checkpointing=ctx.checkpointing(0),
                           label_smoothing=cfg.label_smoothing)
              for k, plan in enumerate(ctx.plans)]
    modules, heads = [p.model for p in phases], [p.head for p in phases]
    optimizers = [(p.opt, p.sched) for p in phases]
    accuracies: list[float | None] = [None] * len(modules)
    halves: list[float | None] = [None] * len(modules)
    multipliers = ([Multipliers() for _ in modules] if cfg.tau_schedule == "multipliers"
                   else None)
    parts = {**{f"module{k}": m for k, m in enumerate(modules)},
             **{f"head{k}": h for k, h in enumerate(heads)},
             **{f"multipliers{k}": m for k, m in enumerate(multipliers or [])}}
    opts = {f"opt{k}": o for k, o in enumerate(optimizers)}
    first = _resume_point(ctx, "parallel", parts, opts)
    with ctx.bars.task(f"{len(modules)} modules in parallel", total=steps) as update:
        update(advance=first * steps_per_epoch(ctx))
        for epoch in range(first, cfg.epochs):
            set_train(*modules, *heads)
            stats = [EpochStats() for _ in modules]
            for step, (x, y) in enumerate(raw_batches(ctx, True, True, epoch, epoch)):
                for k, phase in enumerate(phases):
                    # Module k's backward runs (and frees its activations) before module k+1's
                    # forward: one module's activations are alive at a time.
                    tau = multipliers[k].tau if multipliers is not None else ctx.taus[k]
                    x, numbers = phase.step(x, y, ctx.micro_batch(0), tau=tau)
                    accumulate_or_stop(stats[k], numbers, len(y), k, epoch, step)
                    if multipliers is not None:
                        multipliers[k].update(float(numbers["ce"]))
                update(status=f"epoch {epoch + 1}/{cfg.epochs}")
            if cfg.eval_every_epoch or epoch == cfg.epochs - 1:
                for m in (*modules, *heads):
                    m.eval()
                result = evaluate(modules, heads, raw_batches(
                    ctx, False, False, None, batch_size=ctx.inference_batch_size()),
                    ctx.test_half)
                accuracies, halves = result.full, result.half
            _checkpoint(ctx, "parallel", None, epoch, parts, opts)
            for k in range(len(modules)):
                ctx.run.log("epoch", module=k, epoch=epoch,
                            lr=optimizers[k][1].get_last_lr()[0],
                            test_accuracy=accuracies[k], test_accuracy_half=halves[k],
                            **({"tau": multipliers[k].tau} if multipliers else {}),
                            **stats[k].as_dict())
    if accuracies[0] is None:  # resumed after the last epoch: nothing was evaluated yet
        for m in (*modules, *heads):
            m.eval()
        accuracies = evaluate(modules, heads, raw_batches(
            ctx, False, False, None, batch_size=ctx.inference_batch_size())).full
    peak = ctx.meter.read().peak_bytes
    elapsed = time.perf_counter() - start
    results = []
    for k, (module, head) in enumerate(zip(modules, heads)):
        _save_module(ctx, k, module, head, cfg.epochs - 1, {"module": k})
        results.append(_module_result(ctx, k, accuracies[k], elapsed, peak, 0.0, None))
        ctx.run.log("module", **results[-1])
    return results


# ---------------------------------------------------------------------------------------------
# End to end (the baseline)
# ---------------------------------------------------------------------------------------------

def train_end_to_end(ctx: Context) -> StitchedNetwork:
    cfg = ctx.config
    ctx.meter.reset()
    steps = cfg.epochs * steps_per_epoch(ctx)
    phase = Phase.end_to_end(ctx.spec, ctx.plans, ctx.num_classes, ctx.device, Optim.of(cfg),
                             steps, init=cfg.init, gain=cfg.init_gain, seed=cfg.seed * 1000,
                             checkpointing=ctx.checkpointing(0),
                             label_smoothing=cfg.label_smoothing)
    network, opt, sched = phase.model, phase.opt, phase.sched
    first = _resume_point(ctx, "e2e", {"network": network}, {"opt": (opt, sched)})
    with ctx.bars.task("end to end", total=steps) as update:
        update(advance=first * steps_per_epoch(ctx))
        for epoch in range(first, cfg.epochs):
            network.train()
            stats = EpochStats()
            for step, (x, y) in enumerate(raw_batches(ctx, True, True, epoch, epoch)):
                _, numbers = phase.step(x, y, ctx.micro_batch(0))
                accumulate_or_stop(stats, numbers, len(y), None, epoch, step)
                update(status=f"epoch {epoch + 1}/{cfg.epochs}")
            accuracy = half = None
            if cfg.eval_every_epoch or epoch == cfg.epochs - 1:
                network.eval()
                result = evaluate([_Whole(network)], [nn.Identity()], raw_batches(
                    ctx, False, False, None, batch_size=ctx.inference_batch_size()),
                    ctx.test_half)
                accuracy, half = result.full[0], result.half[0]
            _checkpoint(ctx, "e2e", None, epoch, {"network": network}, {"opt": (opt, sched)})
            ctx.run.log("epoch", module=None, epoch=epoch, lr=sched.get_last_lr()[0],
                        test_accuracy=accuracy, test_accuracy_half=half, **stats.as_dict())
    ctx.run.log("phase", name="e2e", peak_memory_bytes=ctx.meter.read().peak_bytes)
    return network


class _Whole(nn.Module):
    """Adapts the stitched network to the (x) -> (output, transport) stage interface."""

    def __init__(self, network: StitchedNetwork):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, need_transport: bool = False):
        return self.network(x), x.new_zeros(())


# ---------------------------------------------------------------------------------------------
# Stitching and helpers
# ---------------------------------------------------------------------------------------------

def stitch(ctx: Context) -> StitchedNetwork:
    """Load every module's saved weights into one network: modules in order + last head."""
    network = build_network(ctx.spec, ctx.plans, ctx.num_classes)
    for k, stage in enumerate(network.stages):
        state = load_weights(ctx.run.module_path(k))
        load_module_state(stage, network.head if k == len(ctx.plans) - 1 else None, state)
    return network.to(ctx.device)


def test_accuracy(ctx: Context, network: StitchedNetwork) -> float:
    """End-to-end accuracy of the stitched network on the raw (normalised) test set."""
    freeze(network)
    return evaluate([_Whole(network)], [nn.Identity()],
                    raw_batches(ctx, False, False, None,
                                batch_size=ctx.inference_batch_size())).full[0]


def tau_for(config: FitConfig, num_modules: int) -> list[float]:
    if config.method == "trgl":
        return tau_schedule(config.tau, num_modules, config.tau_schedule)
    return [float("inf")] * num_modules


def _resume_point(ctx: Context, name: str, parts: dict, optimizers: dict) -> int:
    """The first epoch to run: after the last checkpointed one, or 0 for a fresh start (also
    when the checkpoint is damaged: it is discarded, and the log says why)."""
    path = ctx.run.checkpoint_path(name)
    if not path.exists():
        return 0
    try:
        first = load_checkpoint(path, parts, optimizers, ctx.device, ctx.epochs_per_lap,
                                ctx.run.run_id) + 1
    except CheckpointDamagedError as e:
        ctx.run.log("checkpoint_discarded", phase=name, reason=str(e))
        path.unlink()
        return 0
    ctx.run.log("resume", phase=name, epoch=first)
    return first


def _checkpoint(ctx: Context, name: int | str, module: int | None, epoch: int, parts: dict,
                optimizers: dict) -> None:
    """The epoch checkpoint; a diverged state stops the run instead (the previous
    checkpoint, still finite, stays)."""
    try:
        save_checkpoint(ctx.run.checkpoint_path(name), epoch, parts, optimizers, ctx.run.run_id)
    except NonFiniteWeightsError as e:
        raise NonFiniteLossError(module, epoch, None, "non-finite weights", str(e)) from None


def _save_module(ctx: Context, k: int, module: nn.Module, head: nn.Module, epoch: int,
                 metadata: dict) -> None:
    state = module_state(module, head)
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteLossError(k, epoch, None, "non-finite weights",
                                 str(NonFiniteWeightsError(bad)))
    save_weights(ctx.run.module_path(k), state, {**metadata, RUN_ID_KEY: ctx.run.run_id})


def steps_per_epoch(ctx: Context, phase: int = 0) -> int:
    n, b = len(ctx.data.train), ctx.batch_size(phase)
    return (n + b - 1) // b


def accumulate_or_stop(stats: EpochStats, numbers: dict, batch: int, module: int | None,
                        epoch: int, step: int) -> None:
    try:
        accumulate(stats, numbers, batch)
    except FloatingPointError as e:
        raise NonFiniteLossError(module, epoch, step, e.args[0]) from None


def _module_result(ctx: Context, k: int, accuracy: float | None, train_time: float,
                   train_peak: int, cache_time: float, cache_peak: int | None) -> dict:
    plan = ctx.plans[k]
    phase = ctx.memory_plan.phase(k if ctx.config.mode == "sequential" else 0) \
        if ctx.memory_plan else None
    return {"module": k, "lap": ctx.lap, "blocks": [plan.start, plan.stop], "tau": ctx.taus[k],
            "predicted_peak_memory_bytes": phase.predicted_peak_bytes if phase else None,
            "batch_size": phase.batch_size if phase else ctx.config.batch_size,
            "lr": ctx.lr(k if ctx.config.mode == "sequential" else 0),
            "micro_batch": phase.micro_batch if phase else ctx.config.batch_size,
            "checkpointing": ctx.checkpointing(k if ctx.config.mode == "sequential" else 0),
            "aux_test_accuracy": accuracy, "train_time_s": round(train_time, 3),
            "train_peak_memory_bytes": train_peak, "cache_time_s": round(cache_time, 3),
            "cache_peak_memory_bytes": cache_peak}
