"""The configuration of one `edgetrain fit` run: a frozen dataclass, one docstring per field.

The CLI builds a :class:`FitConfig` from its flags and calls :func:`FitConfig.validate`, which
collects every problem at once and names the flag to fix.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from edgetrain.errors import UserInputError
from edgetrain.units import MemorySize

METHODS = ("trgl", "vanilla", "e2e")
MODES = ("sequential", "parallel")
CACHE_MODES = ("disk", "none")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
"""Storage types of the feature cache (edgetrain/cache/manifest.py maps them to torch dtypes).
Here, in a module without torch, so that reading a config or a device profile stays instant."""
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("torch", "ort")
LR_SCHEDULES = ("cosine", "constant", "step")
TAU_SCHEDULES = ("halved", "constant", "multipliers")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
"""--image-size bounds. Below 8 px the stages' stride-2 convolutions leave nothing; above 1024
px a CIFAR ResNet is the wrong network (STL-10, the largest set here, is 96 px), and the
in-memory sets would need gigabytes per thousand images."""
MAX_SEED = 2**63 - 1
"""Largest --seed: torch generators take 64-bit seeds."""
MAX_THREADS_PER_CPU = 4
"""--threads above this many per CPU is refused (see validate)."""


@dataclass(frozen=True)
class FitConfig:
    dataset: str = "fashion-mnist-mini"
    """Dataset name from the registry (`edgetrain.data.DATASET_NAMES`)."""
    data_dir: Path | None = None
    """Where dataset files live (default: $EDGETRAIN_DATA_DIR or ~/.cache/edgetrain/data)."""
    download: bool = False
    """Fetch the dataset into data_dir if it is missing (torchvision, in a child process)."""
    image_size: int | None = None
    """Resize images to this square side (default: native size; 32 for imagefolder)."""
    train_limit: int | None = None
    """Train on a class-balanced subset of this many training images (smoke runs)."""
    test_limit: int | None = None
    """Evaluate on a class-balanced subset of this many test images."""

    model: str = "resnet20"
    """The network, by family (parameters of the modules, 1-channel input): CIFAR ResNets
    resnet8/14/20/32/44/56/110 (resnet20 0.27 M, resnet56 0.85 M; --widths sets their
    channels); VGG with BatchNorm vgg11/16/19 (9.2/14.7/20.0 M, about 30x resnet20's compute);
    vision transformers vit-tiny/vit-small (0.21/1.07 M, patch 4) and the Swin-style
    swin-tiny (0.16 M, patch 2, shifted windows, 2 stages); torchvision's own
    tv-resnet18/34/50 and tv-mobilenet_v2 (11.2/21.3/23.5/2.2 M)."""
    pretrained: Path | None = None
    """A torchvision state dict (.pth/.pt, e.g. torchvision's ResNet18_Weights file) to start a
    tv-* model from; its classifier is not used (each module trains its own head)."""
    widths: tuple[int, ...] = (16, 32, 64)
    """Channels of each stage (CIFAR ResNets only)."""
    modules: int | None = 4
    """K, the number of modules the network is split into (1 <= K <= number of blocks), or
    auto (stored as None): the smallest K whose every module fits --memory-budget at the
    requested batch without micro-batches (edgetrain/memory/layout.py)."""
    split: str = "memory"
    """How blocks are shared among modules: memory (the smallest counted peak of the largest
    module, its head included), even (same count) or balanced (same activation elements)."""
    head: str = "dgl"
    """Auxiliary heads: dgl (the paper's, a 3x3 conv at the module's resolution), light (pools
    to 8x8 first), or auto (light only on the modules whose DGL head would decide the peak).
    Transformers always take their token head."""
    shortcut: str = "conv"
    """Downsampling shortcut: conv (1x1 conv + BN) or zero-pad (subsample + zero channels,
    parameter-free: the authors')."""
    init: str = "default"
    """Weight init: default (Kaiming convs) or orthogonal (scaled by init_gain: the authors')."""
    init_gain: float = 0.1
    """Gain of --init orthogonal (the authors use 0.1)."""

    method: str = "trgl"
    """trgl (transport-regularised greedy), vanilla (greedy, tau = inf) or e2e (baseline)."""
    mode: str = "sequential"
    """sequential: one module at a time, frozen outputs cached; parallel: all modules per batch,
    each on the detached output of the one before."""
    epochs: int = 5
    """Epochs per module (sequential), or for the whole network (parallel, e2e)."""
    laps: int = 1
    """Multi-lap sequential training: N passes over the modules, each module training
    epochs/N epochs per pass and continuing from its weights of the pass before."""
    batch_size: int = 128
    """Mini-batch size."""
    batch_growth: int = 1
    """Sequential mode under --memory-budget: a module may train at up to this many times
    --batch-size (a power of 2) when the plan shows it fits, with its lr scaled by the same
    factor (linear scaling rule); 1 keeps every module at --batch-size."""
    lr: float = 0.05
    """Peak learning rate of SGD (momentum 0.9), scheduled over each module's epochs."""
    lr_schedule: str = "cosine"
    """cosine: from lr to 0; constant: lr throughout (the authors' module-wise runs); step: lr,
    divided by 5 after 60% and 80% of the steps (the authors' end-to-end baseline)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""
    # 2, not the authors' 1: in fit's default setting (ResNet-20, the built-in data, 3 seeds)
    # tau 2 beat tau 1 in every seed at K = 4 (+0.92 points) and matched it at K = 8; README,
    # *Which tau for edgetrain fit's own default setting?* (benchmarks/presets/tau.toml).
    tau: float = 2.0
    """Transport step size: the penalty weight is 1/(2 tau). Ignored unless method is trgl.
    The authors use 1; 2 measured better here (README, *Which tau ...*)."""
    tau_schedule: str = "halved"
    """halved: tau/2 for the first half of the modules, tau after (the authors'); constant;
    multipliers: the method of multipliers (weight 1/lambda, lambda += CE every 50 steps,
    lambda0 = 1; --tau unused)."""

    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (torch.utils.
    checkpoint, use_reentrant=False): less memory for about one more forward pass."""

    cache: str = "disk"
    """disk: cache frozen outputs on disk (sequential mode); none: recompute frozen modules on
    every batch, as the authors' code does, which keeps fresh augmentation for every module."""
    cache_dtype: str = "float32"
    """Storage type of cached features: float32, float16 or bfloat16."""
    cache_views: int = 1
    """Views of the training set cached per module: view 0 is un-augmented, views 1.. are
    random augmentations; epoch e reads view e mod cache_views."""

    backend: str = "torch"
    """torch: train with torch autograd; ort: train each module through ONNX Runtime's
    training API (sequential mode only)."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda if available)."""
    seed: int = 0
    """Seed for weights, data order and augmentation."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    out: Path = Path("runs/latest")
    """Run directory: config, metrics log, weights, cache, report."""
    overwrite: bool = False
    """Replace an existing run in `out`."""
    resume: bool = False
    """Continue the run in `out` from its last finished module or epoch checkpoint."""
    memory_budget: MemorySize | None = None
    """Memory the run may use, e.g. 2GB (10^9 bytes), 1.5GiB (2^30 bytes), 512MB or plain
    bytes, or 50%: that share of what end-to-end training of this network at this batch needs
    (probed first). The planner fits the run into it or refuses; on the CPU under tcmalloc
    the heap is then held to it (a run that needs more stops, exit 4; see README, Memory)."""
    eval_every_epoch: bool = True
    """Evaluate each module's auxiliary test accuracy after every epoch (else only at the end)."""
    allow_changes: tuple[str, ...] = ()
    """With --resume: settings that may differ from the run's own for the modules not finished
    yet (e.g. lr after a diverged module, cache_dtype after a full disk); see RESUME_CHANGEABLE."""
    # --- issue 15: torch.distributed (edgetrain/distributed/; README, Distributed) ---
    distributed: bool = False
    """Run as one process of a torch.distributed job started by torchrun: with --mode
    parallel each module on its own process (a pipeline), with --mode sequential each module
    in turn data-parallel on every process (README, Distributed)."""
    replicas: int = 1
    """With --distributed: data-parallel replicas of each module, each training on
    batch-size/replicas samples of every batch (--mode parallel: the job has modules x
    replicas processes; --mode sequential: replicas processes)."""
    in_flight: int = 1
    """With --distributed --mode parallel: batches a stage may have sent that the next stage
    has not taken yet (1 is the single-process schedule; more overlaps more and holds one
    more output batch per rank). Results are the same for any value."""
    dist_timeout: float = 300.0
    """With --distributed: seconds a rank waits for another (a batch, a gradient, a barrier)
    before it stops the job with an error naming that rank. Must exceed the longest time one
    rank works alone (rank 0 writing a checkpoint or the final files; in --mode sequential,
    rank 0 writing a module's feature cache: one forward pass over the data)."""
    # --- end issue 15 ---
    extra: dict = field(default_factory=dict)
    """Free-form fields tools may record (not used by training)."""

    def validate(self, custom_blocks: int | None = None) -> FitConfig:
        """Check every field a user sets; raise one UserInputError listing all problems.
        ``custom_blocks``: the number of blocks of a network given from Python (model
        ``custom``, edgetrain.api.fit)."""
        problems = []
        from edgetrain.models.catalog import (
            HEAD_CHOICES,
            INITS,
            MODELS,
            SHORTCUTS,
            SPLIT_STRATEGIES,
            family,
            model_problems,
        )

        for flag, value, choices in (
                ("--method", self.method, METHODS), ("--mode", self.mode, MODES),
                ("--cache", self.cache, CACHE_MODES), ("--cache-dtype", self.cache_dtype,
                                                       CACHE_DTYPES),
                ("--device", self.device, DEVICES), ("--split", self.split, SPLIT_STRATEGIES),
                ("--shortcut", self.shortcut, SHORTCUTS), ("--init", self.init, INITS),
                ("--head", self.head, HEAD_CHOICES),
                ("--lr-schedule", self.lr_schedule, LR_SCHEDULES),
                ("--tau-schedule", self.tau_schedule, TAU_SCHEDULES)):
            if value not in choices:
                problems.append(f"{flag} {value!r} is not known; choose one of "
                                f"{', '.join(choices)}.")
        problems += model_problems(self.model, self.widths, self.modules, custom_blocks)
        resnet = self.model in MODELS and family(self.model) == "resnet"
        if not resnet and self.widths != FitConfig.widths:
            problems.append(f"--widths sets the channels of the CIFAR ResNets only; --model "
                            f"{self.model} has its own. Leave --widths out.")
        if self.model in MODELS and family(self.model) == "vit" and self.head != "dgl":
            problems.append(f"--head {self.head} applies to convolutional networks; --model "
                            f"{self.model} trains with its token head. Leave --head out.")
        if self.pretrained is not None and not (self.model in MODELS
                                                and family(self.model) == "torchvision"):
            problems.append(f"--pretrained loads torchvision weights into the tv-* models "
                            f"only, not --model {self.model}.")
        elif self.pretrained is not None and not Path(self.pretrained).is_file():
            problems.append(f"--pretrained {self.pretrained}: no such file. Give the path of a "
                            "torchvision state dict (.pth).")
        if not resnet and self.shortcut != FitConfig.shortcut:
            problems.append(f"--shortcut applies to the CIFAR ResNets only, not to --model "
                            f"{self.model}. Leave --shortcut out.")
        if self.model not in MODELS and self.init != FitConfig.init:
            problems.append("--init does not apply to a network given from Python: its blocks "
                            "keep the weights they come with. Initialise them yourself.")
        if not 0 < self.init_gain <= 10:
            problems.append(f"--init-gain must be in (0, 10], e.g. 0.1 (got {self.init_gain}).")
        if self.tau_schedule == "multipliers" and self.backend == "ort":
            problems.append("--tau-schedule multipliers is not available with --backend ort "
                            "(its weight changes during training); use --backend torch.")
        if self.backend not in BACKENDS:
            problems.append(f"--backend {self.backend!r} is not known; choose one of "
                            f"{', '.join(BACKENDS)}.")
        elif self.backend == "ort" and (self.mode != "sequential" or self.method == "e2e"):
            problems.append("--backend ort trains modules one at a time: use it with "
                            "--mode sequential and --method trgl or vanilla.")
        elif self.backend == "ort" and self.model not in MODELS:
            problems.append("--backend ort is not available for a network given from Python "
                            "yet; use --backend torch.")
        elif self.backend == "ort" and family(self.model) == "vit":
            # Measured: onnxruntime-training's gradient builder stops on the transformer
            # block's graph (LayerNorm / attention) with an internal error.
            problems.append(f"--backend ort cannot train --model {self.model} yet (onnxruntime-"
                            "training builds no gradient graph for the transformer blocks); "
                            "use --backend torch, or a CIFAR ResNet, VGG or torchvision model.")
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size),
                            ("--modules", self.modules), ("--cache-views", self.cache_views)):
            if value is not None and value < 1:
                problems.append(f"{flag} must be at least 1 (got {value}).")
        if self.memory_budget is not None and self.memory_budget.fraction is not None and \
                self.distributed:
            problems.append(f"--memory-budget {self.memory_budget} (a share of end-to-end "
                            "training's need) is resolved by one process; with --distributed "
                            "give each rank's budget as a size, e.g. 2GB.")
        if self.modules is None and self.memory_budget is None:
            problems.append("--modules auto picks the smallest K that fits the memory budget: "
                            "add --memory-budget (e.g. 2GB), or give K as a number.")
        if self.modules is None and self.method == "e2e":
            problems.append("--modules auto applies to module-wise training (--method trgl or "
                            "vanilla); end-to-end training has no modules to count.")
        elif self.modules is None and self.mode == "parallel":
            problems.append("--modules auto probes one module at a time, as --mode sequential "
                            "trains them; parallel mode holds every module at once: give K as a "
                            "number, or use --mode sequential.")
        if self.batch_growth < 1 or self.batch_growth & (self.batch_growth - 1):
            problems.append(f"--batch-growth must be a power of 2 (1, 2, 4, ...), got "
                            f"{self.batch_growth}.")
        elif self.batch_growth > 1:
            if self.memory_budget is None:
                problems.append("--batch-growth lets the memory planner give a module a larger "
                                "batch where it fits the budget: add --memory-budget.")
            if self.mode != "sequential" or self.method == "e2e" or self.backend != "torch":
                problems.append("--batch-growth applies to sequential module-wise training with "
                                "the torch backend (each module alone in memory): use it with "
                                "--mode sequential, --method trgl or vanilla, --backend torch.")
        if self.laps < 1:
            problems.append(f"--laps must be at least 1 (got {self.laps}).")
        elif self.laps > 1:
            if self.mode != "sequential" or self.method == "e2e" or self.backend != "torch":
                problems.append("--laps applies to sequential module-wise training with the "
                                "torch backend: use it with --mode sequential, --method trgl or "
                                "vanilla, --backend torch.")
            if self.epochs >= 1 and self.epochs % self.laps:
                problems.append(f"--epochs {self.epochs} must be a multiple of --laps "
                                f"{self.laps}: each lap trains every module epochs/laps epochs.")
        if self.cache_views > max(self.epochs, 1) and self.epochs >= 1:
            problems.append(f"--cache-views {self.cache_views} is more than --epochs "
                            f"{self.epochs}: epoch e reads view e mod N, so only {self.epochs} "
                            "would ever be read. Use at most --epochs views.")
        # Written as `not (low <= x < high)` so that NaN, which fails every comparison, is
        # refused too.
        if not 0 < self.lr < math.inf:
            problems.append(f"--lr must be a positive, finite number, e.g. 0.05 (got {self.lr}).")
        if not self.tau > 0:
            problems.append(f"--tau must be a positive number, e.g. 1.0 (got {self.tau}).")
        elif math.isinf(self.tau) and self.method == "trgl":
            problems.append("--tau inf switches the transport penalty off: use --method vanilla "
                            "for that, or give a finite --tau such as 1.0.")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"--label-smoothing must be in [0, 1) (got {self.label_smoothing}).")
        if not 0 <= self.momentum < 1:
            problems.append(f"--momentum must be in [0, 1), e.g. 0.9 (got {self.momentum}).")
        if not 0 <= self.weight_decay < math.inf:
            problems.append("--weight-decay must be zero or a positive, finite number, e.g. 5e-4 "
                            f"(got {self.weight_decay}).")
        unknown = [c for c in self.allow_changes if c not in RESUME_CHANGEABLE]
        if unknown:
            problems.append(
                f"--allow-changes {','.join(unknown)}: not a setting --resume may change; "
                f"choose among {', '.join(_flag(c)[2:] for c in RESUME_CHANGEABLE)}.")
        if self.allow_changes and not self.resume:
            problems.append("--allow-changes only applies with --resume (it lets a resumed run "
                            "continue with some new settings); add --resume or drop it.")
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite contradict each other: --resume continues "
                            "the run in --out, --overwrite replaces it. Choose one.")
        if self.threads is not None:
            cpus = os.cpu_count() or 1
            if self.threads < 1:
                problems.append(f"--threads must be at least 1 (got {self.threads}).")
            elif self.threads > MAX_THREADS_PER_CPU * cpus:
                # Past a few thousand, creating the threads crashes the process (SIGSEGV).
                problems.append(f"--threads {self.threads} is far more than the {cpus} CPUs here "
                                "(more threads than cores only slows torch down); use "
                                f"--threads {cpus}, or leave it out.")
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(f"--seed must be between 0 and {MAX_SEED} (got {self.seed}).")
        for flag, limit in (("--train-limit", self.train_limit),
                            ("--test-limit", self.test_limit)):
            if limit is not None and limit < 1:
                problems.append(f"{flag} must be at least 1 (got {limit}); leave it out to use "
                                "the whole split.")
        from edgetrain.paths import folder_problem, path_problem

        if self.image_size is not None and (problem := image_size_problem(self.image_size)):
            problems.append(problem)
        for problem in (folder_problem("--out", self.out),
                        path_problem("--data-dir", self.data_dir)):
            if problem:
                problems.append(problem)
        problems += self._distributed_problems()  # issue 15
        if problems:
            raise UserInputError(problems)
        return self

    def _distributed_problems(self) -> list[str]:
        """The --distributed flags' checks (issue 15); the launch itself (world size, the
        torchrun environment) is checked when the job starts (edgetrain/distributed/)."""
        problems = []
        for flag, value in (("--replicas", self.replicas), ("--in-flight", self.in_flight)):
            if value < 1:
                problems.append(f"{flag} must be at least 1 (got {value}).")
        if not 0 < self.dist_timeout < math.inf:
            problems.append("--dist-timeout must be a positive number of seconds, e.g. 300 "
                            f"(got {self.dist_timeout}).")
        if not self.distributed:
            for flag, value in (("--replicas", self.replicas), ("--in-flight", self.in_flight)):
                if value != 1:
                    problems.append(f"{flag} applies to --distributed runs (launched with "
                                    "torchrun); add --distributed or drop it.")
            return problems
        if self.method == "e2e":
            problems.append("--distributed trains module-wise (a pipeline of modules, or each "
                            "module data-parallel): use --method trgl or vanilla; end-to-end "
                            "training is not distributed.")
        if self.backend != "torch" or self.laps > 1:
            problems.append("--distributed runs with --backend torch and one lap (--laps 1).")
        if self.batch_growth != 1:
            problems.append("--batch-growth applies to single-process sequential runs: every "
                            "rank of a --distributed run trains at --batch-size / --replicas; "
                            "drop it.")
        if self.in_flight != 1 and self.mode != "parallel":
            problems.append("--in-flight bounds the batches between pipeline stages: it "
                            "applies to --mode parallel only; drop it.")
        if self.replicas >= 1 and self.batch_size >= 1 and self.batch_size % self.replicas:
            problems.append(f"--batch-size {self.batch_size} must be a multiple of --replicas "
                            f"{self.replicas}: each replica trains on batch-size/replicas "
                            "samples of every batch.")
        return problems

    def resolved(self) -> FitConfig:
        """The config as the run will use it: the cache only applies to sequential greedy
        training, and tau only to TRGL. (``modules`` None, auto, is resolved by the layout
        planner: edgetrain/fit.py.)"""
        changes: dict = {}
        if self.method == "e2e" or self.mode == "parallel":
            changes["cache"] = "none"
        if self.method == "vanilla":
            changes["tau"] = math.inf
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, float) and math.isinf(value):
                data[key] = "inf"
            elif isinstance(value, tuple):
                data[key] = list(value)
        if self.memory_budget is not None:
            data["memory_budget"] = str(self.memory_budget)  # as written: "2GB"
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> FitConfig:
        """The config stored in a run folder, every field type-checked; keys this version does
        not know are ignored. RecordError names the file and the field."""
        from edgetrain.records import Fields, RecordError

        f = Fields(data, source)
        hints = typing.get_type_hints(cls)
        values: dict = {}
        for fld in dataclasses.fields(cls):
            if fld.name not in data:
                continue  # a field added after the run was written: its default
            hint, value = hints[fld.name], data[fld.name]
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            optional = union and type(None) in typing.get_args(hint)
            base = (next(a for a in typing.get_args(hint) if a is not type(None)) if union
                    else hint)
            if value is None and optional:
                values[fld.name] = None
            elif base is MemorySize:
                # Text ("2GB"); plain bytes in runs written before the budget was one value.
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    values[fld.name] = MemorySize(value)
                else:
                    try:
                        values[fld.name] = MemorySize.parse(f.str(fld.name))
                    except UserInputError as e:
                        raise RecordError(f"{source}: field {fld.name!r}: {e}") from None
            elif base is bool:
                values[fld.name] = f.bool(fld.name)
            elif base is int:
                values[fld.name] = f.int(fld.name)
            elif base is float:
                values[fld.name] = f.float(fld.name, allow_inf=True)
            elif base is str:
                values[fld.name] = f.str(fld.name)
            elif base is Path:
                values[fld.name] = Path(f.str(fld.name))
            elif base is dict:
                values[fld.name] = f.object(fld.name).data
            elif typing.get_origin(base) is tuple:
                item = typing.get_args(base)[0]
                items = f.list(fld.name)
                if not all(isinstance(v, item) and not isinstance(v, bool) for v in items):
                    raise RecordError(f"{source}: field {fld.name!r} must be a list of "
                                      f"{item.__name__} values (found {items!r:.60}).")
                values[fld.name] = tuple(items)
            else:  # an internal invariant: every field type above is handled
                raise TypeError(f"FitConfig.{fld.name}: no reader for {hint}")
        return cls(**values)

    def resume_differences(self, stored: FitConfig) -> dict[str, tuple]:
        """``{field: (stored value, value now)}`` for every result-changing field that differs
        from the run being resumed (RESUME_FREE fields may differ freely)."""
        mine, theirs = self.to_dict(), stored.to_dict()
        differences = {k: (theirs.get(k), v) for k, v in mine.items()
                       if k not in RESUME_FREE and theirs.get(k) != v}
        if self.memory_budget == stored.memory_budget:  # equal in bytes: 2GB == 2000MB
            differences.pop("memory_budget", None)
        return differences

    def resume_problem(self, stored: FitConfig, out: Path,
                       resolved: dict[str, tuple] | None = None) -> str | None:
        """Why this config cannot resume the run ``stored``, or None.

        ``resolved`` adds differences of what the flags resolved to (``threads`` and
        ``device``: ``--device auto`` on a machine without a GPU is ``cpu``; the thread count
        changes the order of floating-point sums on the CPU). A difference in a
        RESUME_CHANGEABLE field is accepted only if ``allow_changes`` names it: the finished
        modules are kept and the rest trains with the new value.
        """
        differences = {**self.resume_differences(stored), **(resolved or {})}
        refused = {k: d for k, d in differences.items() if k not in self.allow_changes}
        if not refused:
            return None
        listed = "; ".join(f"{_flag(k)} {old!r} (now {new!r})"
                           for k, (old, new) in refused.items())
        fixed = [k for k in refused if k not in RESUME_CHANGEABLE]
        text = (f"--resume: the run in {out} was started with different settings: {listed}. ")
        if fixed:
            return text + ("Resume with the run's own flags, or start a new run in another "
                           "--out.")
        names = ",".join(_flag(k)[2:] for k in refused)
        return text + (f"Resume with the run's own flags, or, to keep its finished modules and "
                       f"train the rest with the new values, add --allow-changes {names}.")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _flag(name: str) -> str:
    """The CLI flag of a config field.

    >>> _flag("cache_dtype")
    '--cache-dtype'
    """
    return "--" + name.replace("_", "-")


RESUME_FREE = frozenset({"resume", "overwrite", "out", "download", "extra", "eval_every_epoch",
                         "allow_changes", "threads", "device",
                         # issue 15: how the work is spread over processes, not what it
                         # computes (a pipeline gives single-process parallel mode's weights
                         # bit for bit, whatever --in-flight); --replicas must match.
                         "distributed", "in_flight", "dist_timeout"})
"""Fields that may differ between a run and its resumption: they do not change what the run
computes (``threads`` and ``device`` are compared as resolved, see resume_problem)."""
RESUME_CHANGEABLE: dict[str, bool] = {
    # field: whether the module in progress starts again (its epoch checkpoint was made under
    # the old value of an optimisation setting); False: it continues from its checkpoint.
    "lr": True, "lr_schedule": True, "momentum": True, "weight_decay": True,
    "label_smoothing": True, "epochs": True, "batch_size": True, "tau": True,
    "tau_schedule": True, "cache_views": True, "backend": True,
    "cache": False, "cache_dtype": False, "activation_checkpointing": False,
    "memory_budget": False, "threads": False, "device": False, "data_dir": False,
}
"""Fields that --resume --allow-changes may change for the modules not finished yet: what a
user changes to get past a failure (a diverged module: --lr; a full disk: --cache-dtype or
--cache none; a smaller device: --memory-budget) without losing the finished modules."""


def image_size_problem(image_size: int) -> str | None:
    """Why ``--image-size`` cannot be used, or None.

    >>> image_size_problem(32) is None
    True
    >>> image_size_problem(0)
    '--image-size 0 is too small; use 8 or more (e.g. 32)'
    """
    if image_size < MIN_IMAGE_SIZE:
        return f"--image-size {image_size} is too small; use {MIN_IMAGE_SIZE} or more (e.g. 32)"
    if image_size > MAX_IMAGE_SIZE:
        return (f"--image-size {image_size} is too large; use at most {MAX_IMAGE_SIZE} (CIFAR "
                "ResNets are built for 28-96 px images)")
    return None


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls``, one line each: the CLI's help.

    >>> field_docs(FitConfig)["epochs"]
    'Epochs per module (sequential), or for the whole network (parallel, e2e).'
    """
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs
