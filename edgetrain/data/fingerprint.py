"""A dataset's fingerprint: what `--resume` compares to know it continues on the same data.

Flags name a dataset; the fingerprint says what was actually read: a blake2b over the labels
and the image bytes of both splits for the in-memory sets (about 0.1 s for Fashion-MNIST), or
over each file's path (relative to the folder), label and size for a lazily read image
folder (its images are not read twice). A dataset folder that was replaced, extended or
re-generated between a run and its resumption therefore stops the resumption instead of
silently mixing two datasets in one network.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch.utils.data import Dataset, Subset

from edgetrain.data.arrays import ArrayDataset
from edgetrain.data.bundle import DataBundle


def data_fingerprint(data: DataBundle) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for split in (data.train, data.test):
        hasher.update(f"|{len(split)}|".encode())
        _update(hasher, split)
    return f"blake2b:{hasher.hexdigest()}"


def _update(hasher, dataset: Dataset) -> None:
    if isinstance(dataset, ArrayDataset):
        for tensor in (dataset.images, dataset.labels):
            t = tensor.detach().to("cpu").contiguous()
            hasher.update(f"{t.dtype}{tuple(t.shape)}".encode())
            hasher.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(dataset, Subset):
        hasher.update(torch.as_tensor(dataset.indices).numpy().tobytes())
        _update(hasher, dataset.dataset)
    else:  # a lazily read folder: its file list, relative to its root (the folder may move)
        root = getattr(dataset, "root", "")
        for path, label in getattr(dataset, "samples", []):
            info = os.stat(path)
            name = os.path.relpath(path, root) if root else path
            hasher.update(f"{name}|{label}|{info.st_size}\n".encode())
