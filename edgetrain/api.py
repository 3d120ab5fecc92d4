"""edgetrain from Python: train your own network module by module.

    import torch.nn as nn
    import edgetrain.api as et

    def conv(c_in, c_out, stride=1):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                             nn.BatchNorm2d(c_out), nn.ReLU())

    blocks = [conv(1, 32), conv(32, 32), conv(32, 64, 2), conv(64, 64)]
    trained = et.fit(blocks, modules=2, epochs=1, out="runs/my-cnn")
    trained.network        # the stitched network (modules + last head), eval mode, CPU
    trained.report         # what `edgetrain fit` prints, as a dict (report.json)

A block is an ``nn.Module`` (or a function returning one, so that only one module's blocks
exist at a time) mapping images ``[N, C, H, W]`` to images. It may return ``(output, energy)``
to give its own transport energy, e.g. ``mean(r ** 2)`` of its residual branch; otherwise a
block that keeps its input's shape is penalised as ``T = id + (T - id)`` and one that changes
it is not (edgetrain/models/families.py, CustomSpec). Every other setting is a FitConfig field,
as on the command line (``modules=2`` is ``--modules 2``); the named networks (``model=
"vgg11"``) train with ``blocks=None``. The blocks given are copied, never trained in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from edgetrain.config import FitConfig
from edgetrain.errors import UserInputError
from edgetrain.models.catalog import CUSTOM
from edgetrain.units import MemorySize


@dataclass
class Trained:
    network: nn.Module
    """The stitched network: the trained modules in order, then the last module's head."""
    report: dict
    """report.json of the run."""
    run_dir: Path


def fit(blocks: list | None = None, config: FitConfig | None = None, progress: bool = False,
        **fields) -> Trained:
    """Train ``blocks`` (or ``config.model`` if None) as ``config`` and ``fields`` say; the
    run folder is ``out`` as for `edgetrain fit` (resume with ``resume=True``)."""
    from edgetrain import fit as fitting
    from edgetrain.models.families import check_blocks
    from edgetrain.runs.model import load_stitched

    names = {f.name for f in dataclasses.fields(FitConfig)}
    if unknown := sorted(set(fields) - names):
        raise UserInputError(f"unknown setting(s) {', '.join(unknown)}; FitConfig has "
                             f"{', '.join(sorted(names))}.")
    if isinstance(fields.get("memory_budget"), str):
        fields["memory_budget"] = MemorySize.parse(fields["memory_budget"])
    if "out" in fields:
        fields["out"] = Path(fields["out"])
    config = dataclasses.replace(config or FitConfig(), **fields)
    if blocks is not None:
        blocks = check_blocks(blocks)
        config = dataclasses.replace(config, model=CUSTOM)
    report = fitting.fit(config, progress=progress, blocks=blocks)
    network, _ = load_stitched(config.out, blocks)
    return Trained(network, report, Path(config.out))


def load(run_dir: str | Path, blocks: list | None = None) -> nn.Module:
    """The stitched network of a finished run; a network given from Python needs its blocks."""
    from edgetrain.runs.model import load_stitched

    return load_stitched(Path(run_dir), blocks)[0]
