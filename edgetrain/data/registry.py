"""Which datasets exist, and `load_dataset`, the one entry point that loads any of them.

Loader modules are imported on first use, so a run pays only for its own set's readers. Only
`imagefolder` imports torchvision (about 165 MB of resident memory, for its image decoding and
transforms); the in-memory sets are read without it (edgetrain/data/formats.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgetrain.config import image_size_problem
from edgetrain.data.bundle import DataBundle
from edgetrain.data.subsets import limit_problem, take_subset
from edgetrain.errors import UserInputError

DEFAULT_DATASET = "fashion-mnist-mini"
DATASET_HELP: dict[str, str] = {
    "fashion-mnist-mini": "6,000/2,000 real Fashion-MNIST images shipped in the package (default)",
    "fashion-mnist": "Fashion-MNIST 60,000/10,000 (Debian's dataset-fashion-mnist or --download)",
    "mnist": "MNIST digits 60,000/10,000 (--download or files in --data-dir)",
    "cifar10": "CIFAR-10 50,000/10,000 32x32 RGB",
    "cifar100": "CIFAR-100 50,000/10,000 32x32 RGB, 100 fine labels",
    "svhn": "SVHN house numbers 73,257/26,032 32x32 RGB (no 'extra' split)",
    "stl10": "STL-10 labelled splits 5,000/8,000 96x96 RGB (no unlabelled split)",
    "imagefolder": "your images: --data-dir DIR with DIR/train/<class>/* and DIR/test/<class>/*",
}
DATASET_NAMES: tuple[str, ...] = tuple(DATASET_HELP)
def load_dataset(name: str, data_dir: Path | None = None, download: bool = False,
                 image_size: int | None = None, train_limit: int | None = None,
                 test_limit: int | None = None, seed: int = 0) -> DataBundle:
    """Load dataset `name` (one of `DATASET_NAMES`).

    data_dir: where the files are (the standard sets default to `$EDGETRAIN_DATA_DIR` or
        ~/.cache/edgetrain/data; the built-in set takes none; `imagefolder` requires it).
    download: fetch missing files (needs internet; torchvision, in a child process).
    image_size: in-memory sets whose native size differs are resized once, here, at load;
        `imagefolder` resizes each image as it is read (default 32).
    train_limit, test_limit: keep a class-balanced subset of that many samples, chosen by
        `seed` (for smoke runs and tests).
    """
    if name not in DATASET_NAMES:
        raise UserInputError(f"--dataset {name!r} is not known; choose one of "
                             f"{', '.join(DATASET_NAMES)}")
    if image_size is not None and (problem := image_size_problem(image_size)):
        raise UserInputError(problem)

    if name == DEFAULT_DATASET:
        from edgetrain.data.builtin import load_builtin
        bundle = load_builtin(data_dir, download, image_size)
    elif name == "imagefolder":
        from edgetrain.data.imagefolder import load_imagefolder
        bundle = load_imagefolder(data_dir, download, image_size, seed)
    else:
        from edgetrain.data.standard_sets import load_standard_set
        bundle = load_standard_set(name, data_dir, download, image_size)

    problems = []
    for split, limit, flag in (("train", train_limit, "--train-limit"),
                               ("test", test_limit, "--test-limit")):
        if limit is not None:
            problem = limit_problem(getattr(bundle, split), limit, flag, f"{name} {split}")
            problems += [problem] if problem else []
    if problems:
        raise UserInputError(problems)
    # Different seeds for the two splits would add nothing: they hold different samples.
    train = bundle.train if train_limit is None else take_subset(bundle.train, train_limit, seed)
    test = bundle.test if test_limit is None else take_subset(bundle.test, test_limit, seed)
    return replace(bundle, train=train, test=test)
