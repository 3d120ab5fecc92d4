"""What a loaded dataset is: its two splits plus the facts a model and an augmenter need."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, enough to build a model and its input pipeline."""

    name: str
    """Registry name, as given to `--dataset`."""
    num_classes: int
    """Number of labels; labels are 0 .. num_classes - 1."""
    in_channels: int
    """1 for grayscale sets, 3 for RGB."""
    image_size: int
    """Images are square: H == W == image_size."""
    mean: tuple[float, ...]
    """Per-channel mean of the training images scaled to [0, 1]."""
    std: tuple[float, ...]
    """Per-channel standard deviation of the training images scaled to [0, 1]."""
    hflip: bool
    """Whether a horizontal flip keeps the label (false for digits)."""
    crop_padding: int
    """Zero padding for random-crop augmentation (4 at 32 px, 2 at 28 px, 12 at 96 px)."""

    def __post_init__(self) -> None:
        # Internal invariant (loaders build these, users do not), hence ValueError, not
        # UserInputError.
        if not len(self.mean) == len(self.std) == self.in_channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel "
                             f"({self.in_channels}), got {len(self.mean)}/{len(self.std)}")


@dataclass(frozen=True)
class DataBundle:
    """Both splits of a dataset. Items are (uint8 tensor [C, H, W], int label)."""

    train: Dataset
    test: Dataset
    info: DatasetInfo


def scaled_padding(native_padding: int, native_size: int, image_size: int) -> int:
    """Crop padding kept in proportion when a set is resized (STL-10 at 32 px pads by 4).

    >>> scaled_padding(12, 96, 32)
    4
    >>> scaled_padding(2, 28, 28)
    2
    """
    return max(1, round(native_padding * image_size / native_size))
