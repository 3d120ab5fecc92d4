"""Datasets as uint8 tensors, fast batching, and batch-wise augmentation.

    bundle = load_dataset("fashion-mnist-mini")
    for images, labels in iterate_batches(bundle.train, 128, shuffle=True, generator=g):
        x = normalize(augment_batch(images, bundle.info.crop_padding, bundle.info.hflip, g),
                      bundle.info)
"""

from edgetrain.data.arrays import ArrayDataset, iterate_batches
from edgetrain.data.augment import augment_batch, normalize
from edgetrain.data.bundle import DataBundle, DatasetInfo
from edgetrain.data.registry import DATASET_HELP, DATASET_NAMES, DEFAULT_DATASET, load_dataset

__all__ = [
    "DATASET_HELP",
    "DATASET_NAMES",
    "DEFAULT_DATASET",
    "ArrayDataset",
    "DataBundle",
    "DatasetInfo",
    "augment_batch",
    "iterate_batches",
    "load_dataset",
    "normalize",
]
