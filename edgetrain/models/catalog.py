"""What can be built, by name, without importing torch: model names and their block counts,
and the choices of shortcut, initialisation, split and auxiliary head.

`FitConfig.validate` checks a run against this catalogue before any data is read or any
framework is loaded, so a mistyped --model or an impossible --modules costs an instant (and the
bench driver, which validates every run of a preset first, never loads torch).
"""

from __future__ import annotations

# depth = 6n + 2 for three stages of n basic blocks (stem conv + 2 convs per block + classifier).
RESNET_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44,
                 "resnet56": 56, "resnet110": 110}
DEFAULT_WIDTHS = (16, 32, 64)
MAX_WIDTH = 4096
"""Widest stage --widths accepts: one 3x3 conv at 4096 channels already holds 600 MB."""
MAX_STAGES = 8
SHORTCUTS = ("conv", "zero-pad")
INITS = ("default", "orthogonal")
SPLIT_STRATEGIES = ("even", "balanced", "memory")
HEADS = ("dgl", "light")
"""Auxiliary head kinds (edgetrain/models/heads.py)."""
HEAD_CHOICES = (*HEADS, "auto")
"""What --head accepts: a kind for every module, or auto (edgetrain/memory/layout.py)."""


def block_count(model: str, widths: tuple[int, ...]) -> int:
    """Residual blocks of ``model`` with ``len(widths)`` stages: what K is cut from.

    >>> block_count("resnet20", (16, 32, 64)), block_count("resnet110", (16, 32, 64))
    (9, 54)
    """
    return len(widths) * ((RESNET_DEPTHS[model] - 2) // 6)


def model_problems(model: str, widths: tuple[int, ...], modules: int | None = None
                   ) -> list[str]:
    """Why ``model`` at ``widths`` cut into ``modules`` cannot be built (empty if it can).

    >>> model_problems("resnet20", (16, 32, 64), 10)[0][:40]
    '--modules 10 is out of range: resnet20 h'
    """
    if model not in RESNET_DEPTHS:
        return [f"--model {model!r} is not a known model; choose one of "
                f"{', '.join(RESNET_DEPTHS)}."]
    if not widths or any(w < 1 for w in widths):
        return [f"--widths {widths} must be positive integers, e.g. 16,32,64."]
    if any(w > MAX_WIDTH for w in widths) or len(widths) > MAX_STAGES:
        return [f"--widths {','.join(map(str, widths))[:60]}: at most {MAX_STAGES} stages of "
                f"at most {MAX_WIDTH} channels, e.g. 16,32,64."]
    n = block_count(model, widths)
    if modules is not None and modules >= 1 and modules > n:
        return [f"--modules {modules} is out of range: {model} has {n} residual blocks, so K "
                f"must be between 1 and {n}."]
    return []
