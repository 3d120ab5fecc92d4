"""In-memory datasets and batch iteration.

Small vision sets (MNIST, CIFAR, SVHN, STL-10) fit in memory as one uint8 tensor: CIFAR-10's
train split is 150 MB as uint8 and would be 600 MB as float32, so images stay uint8 until a batch
is normalised. Batches are cut by one index gather instead of a DataLoader collating 128 Python
tuples, which on 2 CPU cores costs more than the small models' forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from edgetrain.errors import UserInputError


class ArrayDataset(Dataset):
    """A dataset held as uint8 images [N, C, H, W] (contiguous) and int64 labels [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be [N] with N = {len(images)}, "
                             f"got {tuple(labels.shape)}")
        # contiguous() is a no-op for the loaders' tensors; it matters for callers that pass a
        # permuted view, which would make every batch gather strided and slow.
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def subset(self, indices: torch.Tensor) -> ArrayDataset:
        """A copy holding only `indices` (a copy, so the full arrays can be freed)."""
        return ArrayDataset(self.images[indices], self.labels[indices])


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """All labels of a dataset as int64 [N], without loading any image."""
    if isinstance(dataset, ArrayDataset):
        return dataset.labels
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices)]
    targets = getattr(dataset, "targets", None)  # torchvision ImageFolder and friends
    if targets is None:
        raise TypeError(f"cannot read labels of {type(dataset).__name__} without loading images")
    return torch.as_tensor(targets, dtype=torch.int64)


def epoch_order(n: int, shuffle: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The sample order of one epoch; both batching paths use it, so they agree."""
    return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)


def iterate_batches(dataset: Dataset, batch_size: int, shuffle: bool,
                    generator: torch.Generator | None = None, drop_last: bool = False
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images [B, C, H, W], int64 labels [B]) covering each sample once.

    The order is drawn from `generator` (a CPU generator) when the call is made, so the same
    seed gives the same order, and calling again on the same generator gives the next epoch's
    (different) order. An `ArrayDataset` is batched by index gather; any other dataset (e.g. the
    lazy image folder) goes through a single-process DataLoader in the very same order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = epoch_order(len(dataset), shuffle, generator)
    if isinstance(dataset, ArrayDataset):
        return _gather_batches(dataset, order, batch_size, drop_last)
    # num_workers=0: worker processes would each import torch (~600 MB resident here), more
    # than the whole training budget on the small machines this package targets.
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(),
                        drop_last=drop_last, num_workers=0)
    return iter(loader)


def _gather_batches(dataset: ArrayDataset, order: torch.Tensor, batch_size: int,
                    drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # The arrays may have been moved to the GPU (images, labels or both); index where they are.
    image_order = order.to(dataset.images.device)
    label_order = order.to(dataset.labels.device)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        end = start + batch_size
        yield (dataset.images.index_select(0, image_order[start:end]),
               dataset.labels.index_select(0, label_order[start:end]))


def resize_images(images: torch.Tensor, size: int, chunk: int = 512) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] images to [N, C, size, size] (antialiased bilinear).

    Works in chunks: the float32 copy of a chunk is 4x its uint8 size, and converting a whole
    split at once would briefly need 4x the dataset in memory.
    """
    if images.shape[-2:] == (size, size):
        return images
    # The uint8 result, plus the float32 copies of one chunk while it is resized.
    pixels = images.shape[1] * size * size
    needed = images.shape[0] * pixels + 2 * 4 * min(chunk, images.shape[0]) * pixels
    available = psutil.virtual_memory().available
    if needed > available:
        raise UserInputError(
            f"--image-size {size}: the resized split of {images.shape[0]} images needs "
            f"{needed / 1e9:.1f} GB of memory and {available / 1e9:.1f} GB are free. Use a "
            f"smaller --image-size (the native size is {images.shape[-1]}), or --dataset "
            "imagefolder, which reads images lazily.")
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out
