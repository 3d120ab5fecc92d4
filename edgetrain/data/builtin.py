"""The default dataset: a class-balanced slice of real Fashion-MNIST shipped inside the package.

6,000 training (600 per class) and 2,000 test images (200 per class), so every command works
offline with no data folder. Built by scripts/make_builtin_dataset.py; see builtin/LICENSE.md.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from edgetrain.data.arrays import ArrayDataset, resize_images
from edgetrain.data.bundle import DataBundle, DatasetInfo, scaled_padding
from edgetrain.errors import UserInputError

NAME = "fashion-mnist-mini"
FILE = "fashion_mnist_mini.npz"
NATIVE_SIZE = 28
# Statistics of the full Fashion-MNIST training split (the subset's differ by < 0.002), so a
# model trained here sees the same input scale as one trained on the full set.
MEAN, STD = (0.2860,), (0.3530,)


def load_builtin(data_dir: Path | None, download: bool, image_size: int | None) -> DataBundle:
    """Load the shipped set; `image_size` other than 28 resizes it once, here."""
    problems = []
    if data_dir is not None:
        problems.append(f"--data-dir is not used by --dataset {NAME} (it ships inside the "
                        "package); drop --data-dir, or choose the dataset stored there, e.g. "
                        "--dataset imagefolder")
    if download:
        problems.append(f"--download is not needed for --dataset {NAME}; drop it")
    if problems:
        raise UserInputError(problems)

    with resources.as_file(resources.files("edgetrain.data") / "builtin" / FILE) as path:
        with np.load(path, allow_pickle=False) as arrays:
            splits = {split: _to_dataset(arrays, split, image_size or NATIVE_SIZE)
                      for split in ("train", "test")}
    size = image_size or NATIVE_SIZE
    info = DatasetInfo(name=NAME, num_classes=10, in_channels=1, image_size=size, mean=MEAN,
                       std=STD, hflip=True, crop_padding=scaled_padding(2, NATIVE_SIZE, size))
    return DataBundle(train=splits["train"], test=splits["test"], info=info)


def _to_dataset(arrays: np.lib.npyio.NpzFile, split: str, size: int) -> ArrayDataset:
    images = torch.from_numpy(arrays[f"{split}_images"]).unsqueeze(1)  # [N, 28, 28] -> NCHW
    labels = torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64))
    return ArrayDataset(resize_images(images, size), labels)
