"""Seeded, class-balanced subsets, for smoke runs and tests on a slice of a dataset."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from edgetrain.data.arrays import ArrayDataset, dataset_labels


def stratified_indices(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` sorted indices whose class counts differ by at most one (where classes allow).

    Samples are shuffled within each class and then dealt out round-robin over the classes (in
    a random class order), so a class with too few samples simply drops out of later rounds.

    >>> labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    >>> picked = stratified_indices(labels, 9, torch.Generator().manual_seed(0))
    >>> sorted(torch.bincount(labels[picked]).tolist())  # class 1 has only 2 to give
    [2, 3, 4]
    """
    classes, inverse = torch.unique(labels, return_inverse=True)
    k = len(classes)
    perm = torch.randperm(len(labels), generator=generator)
    shuffled = inverse[perm]
    # Rank of each shuffled sample within its class: position after a stable sort by class,
    # minus where that class starts.
    by_class = torch.argsort(shuffled, stable=True)
    counts = torch.bincount(shuffled, minlength=k)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(shuffled)
    rank[by_class] = torch.arange(len(shuffled)) - starts[shuffled[by_class]]
    class_slot = torch.randperm(k, generator=generator)
    key = rank * k + class_slot[shuffled]
    chosen = perm[torch.argsort(key)[:n]]
    # Sorted, so a lazy dataset still reads its files in folder order.
    return torch.sort(chosen).values


def limit_problem(dataset: Dataset, limit: int, flag: str, split: str) -> str | None:
    """Why `limit` cannot be applied to `dataset`, phrased for the user, or None if it can."""
    size = len(dataset)
    num_classes = len(torch.unique(dataset_labels(dataset)))
    if limit > size:
        return (f"{flag} {limit} is larger than the {split} split ({size} samples); "
                f"use at most {size}")
    if limit < num_classes:
        return (f"{flag} {limit} is smaller than the number of classes ({num_classes}); use at "
                f"least {num_classes} so every class appears")
    return None


def take_subset(dataset: Dataset, limit: int, seed: int) -> Dataset:
    """A class-balanced subset of `limit` samples (call `limit_problem` first)."""
    index = stratified_indices(dataset_labels(dataset), limit, torch.Generator().manual_seed(seed))
    if isinstance(dataset, ArrayDataset):
        return dataset.subset(index)
    return Subset(dataset, index.tolist())
