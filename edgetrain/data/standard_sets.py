"""MNIST, Fashion-MNIST, CIFAR-10/100, SVHN and STL-10 from their files on disk.

This module finds each set's files, reads them with edgetrain/data/formats.py (not torchvision:
see there), turns them into one contiguous uint8 NCHW tensor (an `ArrayDataset`, batched by index
gather) and fills in the `DatasetInfo`. `--download` fetches missing files through torchvision in
a child process (edgetrain/data/download.py). All of these sets fit in memory: the largest,
STL-10's labelled splits, is 360 MB as uint8.

Fashion-MNIST is also found, offline, in Debian's `dataset-fashion-mnist` package.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgetrain.data import formats
from edgetrain.data.arrays import ArrayDataset, resize_images
from edgetrain.data.bundle import DataBundle, DatasetInfo, scaled_padding
from edgetrain.data.download import download as fetch
from edgetrain.errors import UserInputError

DATA_DIR_ENV = "EDGETRAIN_DATA_DIR"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def default_data_dir() -> Path:
    """`$EDGETRAIN_DATA_DIR`, else ~/.cache/edgetrain/data."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgetrain" / "data"


# (data dir, train?) -> (uint8 images [N, C, H, W], int64 labels [N]). The folder layout is
# torchvision's, so files it downloaded (or a user copied from a torchvision setup) are found.
Reader = Callable[[Path, bool], formats.Split]
_CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _mnist_reader(folder: str) -> Reader:
    return lambda root, train: formats.read_mnist(root / folder / "raw", train)


def _read_cifar10(root: Path, train: bool) -> formats.Split:
    return formats.read_cifar(root / "cifar-10-batches-py",
                              _CIFAR10_TRAIN if train else ["test_batch"], "labels")


def _read_cifar100(root: Path, train: bool) -> formats.Split:
    return formats.read_cifar(root / "cifar-100-python", ["train" if train else "test"],
                              "fine_labels")


def _read_svhn(root: Path, train: bool) -> formats.Split:
    return formats.read_svhn(root / f"{'train' if train else 'test'}_32x32.mat")


def _read_stl10(root: Path, train: bool) -> formats.Split:
    return formats.read_stl10(root / "stl10_binary", train)


@dataclass(frozen=True)
class _Spec:
    title: str
    read: Reader
    files: tuple[str, ...]        # relative to the data dir, checked before reading
    num_classes: int
    in_channels: int
    native_size: int
    mean: tuple[float, ...]       # statistics of each full training split, as published
    std: tuple[float, ...]
    hflip: bool
    crop_padding: int


_SPECS = {
    "fashion-mnist": _Spec("Fashion-MNIST", _mnist_reader("FashionMNIST"),
                           tuple(f"FashionMNIST/raw/{f}" for f in _IDX_FILES), 10, 1, 28,
                           (0.2860,), (0.3530,), True, 2),
    "mnist": _Spec("MNIST", _mnist_reader("MNIST"),
                   tuple(f"MNIST/raw/{f}" for f in _IDX_FILES), 10, 1, 28,
                   (0.1307,), (0.3081,), False, 2),
    "cifar10": _Spec("CIFAR-10", _read_cifar10,
                     tuple(f"cifar-10-batches-py/{f}" for f in (
                         *(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")),
                     10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True, 4),
    "cifar100": _Spec("CIFAR-100", _read_cifar100,
                      ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
                      100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True, 4),
    "svhn": _Spec("SVHN", _read_svhn, ("train_32x32.mat", "test_32x32.mat"), 10, 3, 32,
                  (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False, 4),
    "stl10": _Spec("STL-10", _read_stl10,
                   tuple(f"stl10_binary/{f}" for f in ("train_X.bin", "train_y.bin",
                                                       "test_X.bin", "test_y.bin")),
                   10, 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), True, 12),
}
NAMES = tuple(_SPECS)


def load_standard_set(name: str, data_dir: Path | None, download: bool,
                         image_size: int | None) -> DataBundle:
    """Load one of `NAMES` from `data_dir` (default: `default_data_dir()`).

    `download=True` fetches missing files (needs internet; torchvision, in a child process). An
    `image_size`
    other than the set's native size resizes every image once, here, at load.
    """
    spec = _SPECS[name]
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name == "fashion-mnist" and _missing(root, spec):
        _unpack_debian_fashion_mnist(root)
    missing = _missing(root, spec)
    if missing and not download:
        raise UserInputError(_missing_message(name, spec, root, data_dir is None, missing))

    if missing:
        fetch(name, root, spec.title)
        if missing := _missing(root, spec):
            raise UserInputError(f"--download of {spec.title} into {root} finished without "
                                 f"{', '.join(missing)}; put the files into --data-dir yourself")

    size = image_size or spec.native_size
    splits = {}
    for split in ("train", "test"):
        try:
            images, labels = spec.read(root, split == "train")
        except MemoryError:
            raise
        except Exception as err:
            # The files are there (checked above) but cannot be parsed: a damaged or half-copied
            # file, or another set's file under the same name (ValueError from formats.py,
            # UnpicklingError, OSError, scipy's errors, ...).
            raise _unreadable(spec, root, err) from err
        splits[split] = _to_dataset(images, labels, spec, root, size)
    info = DatasetInfo(name=name, num_classes=spec.num_classes, in_channels=spec.in_channels,
                       image_size=size, mean=spec.mean, std=spec.std, hflip=spec.hflip,
                       crop_padding=scaled_padding(spec.crop_padding, spec.native_size, size))
    return DataBundle(train=splits["train"], test=splits["test"], info=info)


def _to_dataset(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                spec: _Spec, root: Path, size: int) -> ArrayDataset:
    # The readers return contiguous arrays: as_tensor shares their memory (no second copy).
    images = torch.as_tensor(np.ascontiguousarray(images))
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1)
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise UserInputError(f"{spec.title} files in --data-dir {root} have labels outside "
                             f"0..{spec.num_classes - 1}; they are not {spec.title} files")
    return ArrayDataset(resize_images(images, size), labels)


def _unreadable(spec: _Spec, root: Path, err: Exception) -> UserInputError:
    reason = str(err) or type(err).__name__
    return UserInputError(
        f"--data-dir {root}: the {spec.title} files there cannot be read ({reason}); they are "
        f"damaged or are not {spec.title} files. Replace them (delete "
        f"{root / spec.files[0].split('/')[0]} and pass --download to fetch them again), or "
        "point --data-dir at an intact copy")


def _missing(root: Path, spec: _Spec) -> list[str]:
    return [f for f in spec.files if not (root / f).is_file()]


def _missing_message(name: str, spec: _Spec, root: Path, default_root: bool,
                     missing: list[str]) -> str:
    where = f"--data-dir {root}" + (f" (the default; set --data-dir or ${DATA_DIR_ENV})"
                                    if default_root else "")
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    message = (f"--dataset {name}: {where} lacks the {spec.title} files {shown}. Pass --download "
               f"to fetch them (needs internet), or point --data-dir at the folder holding "
               f"{spec.files[0].split('/')[0]}")
    if name == "fashion-mnist":
        message += (f", or install Debian's copy (found automatically in "
                    f"{DEBIAN_FASHION_MNIST_DIR}): apt-get install dataset-fashion-mnist")
    return message


def _unpack_debian_fashion_mnist(root: Path) -> None:
    """Gunzip Debian's Fashion-MNIST into `root`/FashionMNIST/raw/, torchvision's layout."""
    sources = [DEBIAN_FASHION_MNIST_DIR / f"{f}.gz" for f in _IDX_FILES]
    if not all(s.is_file() for s in sources):
        return
    raw = root / "FashionMNIST" / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for source in sources:
            target = raw / source.stem
            if not target.is_file():
                _gunzip(source, target)
    except OSError as err:
        raise UserInputError(f"--data-dir {root}: cannot unpack Debian's Fashion-MNIST into "
                             f"{raw} ({err}); choose a writable --data-dir") from err


def _gunzip(source: Path, target: Path) -> None:
    # Unpack to a temporary name, then rename: the loader only checks that the files exist, so
    # an interrupted unpack must never leave a truncated file under the real name.
    tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False)
    try:
        with tmp, gzip.open(source) as src:
            shutil.copyfileobj(src, tmp, length=1 << 20)
        os.replace(tmp.name, target)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise
