"""Rebuild trained networks from a finished run folder (see rundir.py for the layout).

    network, info = load_stitched(Path("runs/latest"))    # model.safetensors + model.json
    module, head, plan = load_module(Path("runs/latest"), 0)   # modules/module_0.safetensors

Only the files are read: nothing of the run's training state (optimiser, cache) is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgetrain.config import FitConfig
from edgetrain.errors import UserInputError
from edgetrain.models.heads import AuxHead
from edgetrain.models.network import StitchedNetwork, build_head, build_module, build_network
from edgetrain.models.resnet import ResNetModule, ResNetSpec, resnet_spec
from edgetrain.models.split import ModulePlan, plan_modules
from edgetrain.runs.files import load_weights
from edgetrain.runs.rundir import RunDir


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

    @classmethod
    def read(cls, path: Path) -> ModelInfo:
        data = json.loads(path.read_text())
        return cls(model=data["model"], widths=tuple(data["widths"]),
                   in_channels=data["in_channels"], num_classes=data["num_classes"],
                   image_size=data["image_size"], mean=tuple(data["mean"]),
                   std=tuple(data["std"]), dataset=data["dataset"],
                   modules=tuple((a, b) for a, b in data["modules"]))

    def spec(self) -> ResNetSpec:
        return resnet_spec(self.model, self.in_channels, self.widths)

    def plans(self) -> list[ModulePlan]:
        """The recorded split (whatever --split made it), not a recomputed one."""
        return plan_modules(self.spec(), [b - a for a, b in self.modules], self.image_size)


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
    config = FitConfig.from_dict(json.loads(run.config_path.read_text()))
    return run, info, config


def load_stitched(run_dir: Path) -> tuple[StitchedNetwork, ModelInfo]:
    """The deployable network of a run (modules in order + last head), in eval mode, on CPU."""
    run, info, _ = open_run(run_dir, need=("model.safetensors",))
    network = build_network(info.spec(), info.plans(), info.num_classes)
    network.load_state_dict(load_weights(run.model_path))
    return network.eval(), info


def load_module(run_dir: Path, k: int) -> tuple[ResNetModule, AuxHead, ModulePlan]:
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
    state = load_weights(path)
    module = build_module(info.spec(), plans[k])
    head = build_head(plans[k], info.num_classes)
    module.load_state_dict(_strip(state, "module."))
    head.load_state_dict(_strip(state, "head."))
    return module.eval(), head.eval(), plans[k]


def _strip(state: dict, prefix: str) -> dict:
    return {n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)}
