"""What can be built, by name, without importing torch: model names, their families and block
counts, and the choices of shortcut, initialisation, split and auxiliary head.

`FitConfig.validate` checks a run against this catalogue before any data is read or any
framework is loaded, so a mistyped --model or an impossible --modules costs an instant (and the
bench driver, which validates every run of a preset first, never loads torch).
"""

from __future__ import annotations

# depth = 6n + 2 for three stages of n basic blocks (stem conv + 2 convs per block + classifier).
RESNET_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44,
                 "resnet56": 56, "resnet110": 110}
DEFAULT_WIDTHS = (16, 32, 64)
# Blocks (what K is cut from) of the other families: VGG conv layers, transformer blocks,
# torchvision's residual blocks (MobileNetV2: 17 inverted residuals and the last 1x1 conv).
VGG_LAYERS = {"vgg11": 8, "vgg16": 13, "vgg19": 16}
VIT_DEPTHS = {"vit-tiny": 6, "vit-small": 8, "swin-tiny": 7}
"""Vision transformers: ViTs' blocks; Swin's blocks and patch mergings (2 + 1 + 4)."""
TORCHVISION_BLOCKS = {"tv-resnet18": 8, "tv-resnet34": 16, "tv-resnet50": 16,
                      "tv-mobilenet_v2": 18}
MODELS = {**{n: "resnet" for n in RESNET_DEPTHS}, **{n: "vgg" for n in VGG_LAYERS},
          **{n: "vit" for n in VIT_DEPTHS}, **{n: "torchvision" for n in TORCHVISION_BLOCKS}}
"""Every --model name and its family."""
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


def family(model: str) -> str:
    """``resnet``, ``vgg``, ``vit`` (the vision transformers, Swin included) or
    ``torchvision``.

    >>> family("vgg16"), family("tv-resnet18")
    ('vgg', 'torchvision')
    """
    return MODELS[model]


def block_count(model: str, widths: tuple[int, ...]) -> int:
    """Blocks of ``model`` (for a CIFAR ResNet, with ``len(widths)`` stages): what K is cut
    from.

    >>> block_count("resnet20", (16, 32, 64)), block_count("resnet110", (16, 32, 64))
    (9, 54)
    >>> block_count("vgg19", (16, 32, 64)), block_count("vit-tiny", ())
    (16, 6)
    """
    kind = MODELS[model]
    if kind == "resnet":
        return len(widths) * ((RESNET_DEPTHS[model] - 2) // 6)
    return {"vgg": VGG_LAYERS, "vit": VIT_DEPTHS, "torchvision": TORCHVISION_BLOCKS}[kind][model]


CUSTOM = "custom"
"""The model name of a network given from Python as a list of blocks (edgetrain.api.fit)."""


def model_problems(model: str, widths: tuple[int, ...], modules: int | None = None,
                   custom_blocks: int | None = None) -> list[str]:
    """Why ``model`` at ``widths`` cut into ``modules`` cannot be built (empty if it can).

    >>> model_problems("resnet20", (16, 32, 64), 10)[0][:40]
    '--modules 10 is out of range: resnet20 h'
    """
    if model == CUSTOM:
        if custom_blocks is None:
            return [f"--model {CUSTOM} is a network given from Python: call "
                    "edgetrain.api.fit(blocks, ...) with its blocks (see the README)."]
        if modules is not None and not 1 <= modules <= custom_blocks:
            return [f"--modules {modules} is out of range: the network given has "
                    f"{custom_blocks} blocks, so K must be between 1 and {custom_blocks}."]
        return []
    if model not in MODELS:
        return [f"--model {model!r} is not a known model; choose one of "
                f"{', '.join(MODELS)}."]
    if not widths or any(w < 1 for w in widths):
        return [f"--widths {widths} must be positive integers, e.g. 16,32,64."]
    if any(w > MAX_WIDTH for w in widths) or len(widths) > MAX_STAGES:
        return [f"--widths {','.join(map(str, widths))[:60]}: at most {MAX_STAGES} stages of "
                f"at most {MAX_WIDTH} channels, e.g. 16,32,64."]
    n = block_count(model, widths)
    if modules is not None and modules >= 1 and modules > n:
        return [f"--modules {modules} is out of range: {model} has {n} blocks, so K "
                f"must be between 1 and {n}."]
    return []
