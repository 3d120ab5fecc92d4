"""Rebuild trained networks from a finished run folder (see rundir.py for the layout).

    network, info = load_stitched(Path("runs/latest"))    # model.safetensors + model.json
    module, head, plan = load_module(Path("runs/latest"), 0)   # modules/module_0.safetensors

Only the files are read: nothing of the run's training state (optimiser, cache) is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetrain.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, FitConfig
from edgetrain.errors import UserInputError
from edgetrain.models.catalog import CUSTOM, HEADS, MAX_WIDTH, MODELS, SHORTCUTS
from edgetrain.models.chain import BlockChain
from edgetrain.models.families import CustomSpec, network_spec
from edgetrain.models.network import (
    StitchedNetwork,
    build_head,
    build_module,
    build_network,
    load_module_state,
    module_state,
)
from edgetrain.models.resnet import ResNetSpec
from edgetrain.models.split import ModulePlan, plan_modules
from edgetrain.records import Fields, RecordError, read_json_object
from edgetrain.runs.lock import RunLock
from edgetrain.runs.ownership import RUN_KIND, read_marker
from edgetrain.runs.rundir import RunDir
from edgetrain.runs.weights import WeightsCorruptError, load_weights, shapes_problem


@dataclass(frozen=True)
class ModelInfo:
    """model.json: what is needed to rebuild the network and to feed it."""

    model: str
    widths: tuple[int, ...]
    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    modules: tuple[tuple[int, int], ...]
    shortcut: str = "conv"
    heads: tuple[str, ...] = ()
    """Each module's auxiliary head (dgl, light, or token for a transformer); runs before heads
    were recorded: all dgl."""

    @classmethod
    def read(cls, path: Path) -> ModelInfo:
        """model.json, every field checked (names, ranges, a split that covers the network's
        blocks in order) before anything is built from it. RecordError names file and field."""
        f = Fields(read_json_object(path), path)
        model = f.str("model", choices=(*MODELS, CUSTOM))
        widths = tuple(f.ints("widths", low=1, high=MAX_WIDTH))
        in_channels = f.int("in_channels", low=1, high=4)
        num_classes = f.int("num_classes", low=2, high=100_000)
        image_size = f.int("image_size", low=MIN_IMAGE_SIZE, high=MAX_IMAGE_SIZE)
        mean = tuple(f.floats("mean", length=in_channels))
        std = tuple(f.floats("std", low=1e-12, length=in_channels))
        shortcut = f.str("shortcut", choices=SHORTCUTS, optional=True) or "conv"
        blocks = (None if model == CUSTOM  # its blocks live in the caller's code
                  else len(network_spec(model, in_channels, image_size, widths, shortcut).blocks))
        modules = tuple(tuple(m) for m in f.list("modules"))
        expected_start = 0
        for m in modules:
            if len(m) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in m) \
                    or m[0] != expected_start or m[1] <= m[0]:
                raise RecordError(f"{path}: field 'modules' must be contiguous [start, stop] "
                                  f"block ranges from 0 (found "
                                  f"{list(modules)!r:.80}).")
            expected_start = m[1]
        if blocks is not None and expected_start != blocks:
            raise RecordError(f"{path}: field 'modules' must cover the {blocks} blocks "
                              f"of {model} (found {list(modules)!r:.80}).")
        heads = tuple(f.list("heads", optional=True) or ["dgl"] * len(modules))
        if len(heads) != len(modules) or any(h not in (*HEADS, "token") for h in heads):
            raise RecordError(f"{path}: field 'heads' must name one head ({', '.join(HEADS)}, "
                              "token) "
                              f"per module (found {list(heads)!r:.80}).")
        return cls(model=model, widths=widths, in_channels=in_channels,
                   num_classes=num_classes, image_size=image_size, mean=mean, std=std,
                   dataset=f.str("dataset"), modules=modules, shortcut=shortcut, heads=heads)

    def spec(self, blocks: list | None = None) -> ResNetSpec:
        """The network's spec, any family (edgetrain/models/families.py); a network given from
        Python needs its ``blocks`` again."""
        if self.model != CUSTOM:
            return network_spec(self.model, self.in_channels, self.image_size, self.widths,
                                self.shortcut)
        if blocks is None:
            raise UserInputError(
                "this run trained a network given from Python (model 'custom'): the command "
                "line cannot rebuild it. Load it in Python with edgetrain.api.load(run_dir, "
                "blocks), passing the same blocks.")
        spec = CustomSpec(blocks, self.in_channels, self.image_size)
        if len(spec.blocks) != self.modules[-1][1]:
            raise UserInputError(f"the run's network has {self.modules[-1][1]} blocks; "
                                 f"{len(spec.blocks)} were given.")
        return spec

    def plans(self, blocks: list | None = None, spec=None) -> list[ModulePlan]:
        """The recorded split (whatever --split made it), not a recomputed one; ``spec``: the
        one :meth:`spec` gave already (a network from Python is laid out once, not twice)."""
        return plan_modules(spec or self.spec(blocks), [b - a for a, b in self.modules],
                            self.image_size, list(self.heads) or None)


def open_run(run_dir: Path, need: tuple[str, ...] = ()) -> tuple[RunDir, ModelInfo, FitConfig]:
    """Check that ``run_dir`` is a finished edgetrain run holding the files in ``need``."""
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise UserInputError(f"RUN_DIR {run.root} is not a folder. Pass the --out folder of an "
                             "`edgetrain fit` run.")
    missing = [name for name in ("model.json", "config.json", *need)
               if not (run.root / name).is_file()]
    if missing:
        raise UserInputError(
            f"RUN_DIR {run.root} lacks {', '.join(missing)}: it is not a finished edgetrain run. "
            "Pass the --out folder of an `edgetrain fit` run that ran to the end."
        )
    info = ModelInfo.read(run.model_info_path)
    config = FitConfig.from_dict(read_json_object(run.config_path), str(run.config_path))
    return run, info, config


@contextmanager
def reading_run(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock shared while a run is read (export): a `fit --overwrite` or
    `--resume` of it waits its turn instead of replacing files under the reader. Runs written
    before run folders were marked have no lock to share; they are read as they are."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or read_marker(run_dir, RUN_KIND) is None:
        yield
        return
    with RunLock(run_dir, "RUN_DIR", shared=True):
        yield


def load_stitched(run_dir: Path, blocks: list | None = None
                  ) -> tuple[StitchedNetwork, ModelInfo]:
    """The deployable network of a run (modules in order + last head), in eval mode, on CPU.
    ``blocks``: a network given from Python, the same blocks again."""
    run, info, _ = open_run(run_dir, need=("model.safetensors",))
    spec = info.spec(blocks)
    plans = info.plans(spec=spec)
    # model.json's sizes are checked against the weights' header before anything is built.
    with torch.device("meta"):
        expected = build_network(spec, plans, info.num_classes).state_dict()
    if problem := shapes_problem(run.model_path, {k: tuple(v.shape)
                                                  for k, v in expected.items()}):
        raise UserInputError(f"{problem}: model.json and model.safetensors do not agree.")
    network = build_network(spec, plans, info.num_classes)
    try:
        state = load_weights(run.model_path)
    except WeightsCorruptError as e:
        raise UserInputError(f"{e}. Rebuild it with `edgetrain fit --resume` in that run "
                             "folder.") from None
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise UserInputError(f"{run.model_path} does not hold the network model.json "
                             f"describes ({str(e).splitlines()[0]}).") from None
    return network.eval(), info


def load_module(run_dir: Path, k: int) -> tuple[BlockChain, torch.nn.Module, ModulePlan]:
    """Module ``k`` (0-based, as in modules/module_K.safetensors) and its auxiliary head, with
    the trained weights and BatchNorm statistics, in eval mode, on CPU."""
    run, info, _ = open_run(run_dir)
    plans = info.plans()
    if not 0 <= k < len(plans):
        raise UserInputError(f"--module {k} is out of range: the run has {len(plans)} modules, "
                             f"numbered 0 to {len(plans) - 1}.")
    path = run.module_path(k)
    if not path.is_file():
        raise UserInputError(f"{path} is missing: module {k} of this run was not trained "
                             "(or the run used --method e2e, which has no per-module weights).")
    try:
        state = load_weights(path)
    except WeightsCorruptError as e:
        raise UserInputError(f"{e}. Retrain it with `edgetrain fit --resume` in that run "
                             "folder.") from None
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in module_state(
            build_module(info.spec(), plans[k]), build_head(plans[k], info.num_classes)).items()}
    if problem := shapes_problem(path, expected):
        raise UserInputError(f"{problem}: model.json and {path.name} do not agree.")
    module = build_module(info.spec(), plans[k])
    head = build_head(plans[k], info.num_classes)
    try:
        load_module_state(module, head, state)
    except RuntimeError as e:
        raise UserInputError(f"{path} does not hold module {k} as model.json describes it "
                             f"({str(e).splitlines()[0]}).") from None
    return module.eval(), head.eval(), plans[k]

