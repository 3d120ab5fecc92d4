"""Readers for the on-disk formats of MNIST, Fashion-MNIST, CIFAR-10/100, SVHN and STL-10.

Each reader returns (uint8 images [N, C, H, W], int64 labels [N]) as numpy arrays. They replace
torchvision's dataset classes on the loading path because `import torchvision` costs about 165
MB of resident memory (it imports torch._dynamo, sympy and triton; measured with torch 2.14.1 /
torchvision 0.29.1), more than the whole of Fashion-MNIST, and a training process would carry it
to the end. torchvision still downloads the files (edgetrain/data/download.py), in a child
process. The formats are small and fixed; each reader says what it expected when a file does
not match, and the loader turns that into an error naming --data-dir.
"""

from __future__ import annotations

import math
import os
import pickle
import stat
from pathlib import Path

import numpy as np

Split = tuple[np.ndarray, np.ndarray]


def regular_file(path: Path) -> int:
    """The size of ``path``; ValueError unless it is a regular file. A FIFO or a device under
    a data file's name would otherwise hang the reader or feed it without end."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path.name} is not a regular file")
    return info.st_size


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """MNIST's idx format: 0x00 0x00, type 0x08 (uint8), ndim, ndim big-endian uint32 sizes, then
    the bytes. Read straight into one array (no second copy of the file), and only once the
    header's sizes agree with the file's: a header that promises more is refused unread."""
    size = regular_file(path)
    with open(path, "rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
            raise ValueError(f"{path.name} is not a uint8 idx file with {ndim} dimensions "
                             f"(header {magic.hex() or 'empty'})")
        sizes = f.read(4 * ndim)
        if len(sizes) != 4 * ndim:
            raise ValueError(f"{path.name}: the idx header is cut short")
        dims = np.frombuffer(sizes, dtype=">u4")
        promised = math.prod(int(d) for d in dims)
        if promised != size - 4 - 4 * ndim:
            raise ValueError(f"{path.name}: its header says {tuple(int(d) for d in dims)} "
                             f"({promised} bytes) but the file holds {size - 4 - 4 * ndim} bytes "
                             "of data")
        data = np.fromfile(f, dtype=np.uint8)
    if data.size != math.prod(int(d) for d in dims):
        raise ValueError(f"{path.name}: its header says {tuple(int(d) for d in dims)} but it "
                         f"holds {data.size} bytes of data")
    return data.reshape(tuple(int(d) for d in dims))


def read_mnist(folder: Path, train: bool) -> Split:
    """folder/{train,t10k}-{images-idx3,labels-idx1}-ubyte, as MNIST and Fashion-MNIST ship."""
    prefix = "train" if train else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte", 3)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte", 1)
    _same_count(images, labels, folder / f"{prefix}-labels-idx1-ubyte")
    return images[:, None], labels.astype(np.int64)               # [N, 28, 28] -> [N, 1, 28, 28]


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's batches are pickles; a pickle can run any code when loaded. This unpickler only
    rebuilds the dicts, lists and numpy arrays those files hold, and refuses anything else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # how protocol-2 pickles store bytes

    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle's signature)
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    regular_file(path)
    with open(path, "rb") as f:
        entry = _ArraysOnly(f, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"{path.name} holds a {type(entry).__name__}, not a CIFAR batch dict")
    return entry


def read_cifar(folder: Path, files: list[str], label_key: str) -> Split:
    """CIFAR python batches: {"data": N x 3072 uint8 (R, G, B planes of row-major 32x32),
    label_key: N labels}. Already channel-first: a reshape, no transpose."""
    images, labels = [], []
    for name in files:
        entry = _unpickle(folder / name)
        if "data" not in entry or label_key not in entry:
            raise ValueError(f"{name} lacks the 'data' or '{label_key}' entry of a CIFAR batch")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{name}: 'data' is {data.shape}, not N x 3072")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64).reshape(-1))
        _same_count(images[-1], labels[-1], folder / name)
    return np.concatenate(images), np.concatenate(labels)


def read_svhn(path: Path) -> Split:
    """SVHN's {train,test}_32x32.mat: X is H x W x C x N uint8, y is N x 1 with 10 for digit 0."""
    import scipy.io  # about 12 MB resident; only SVHN needs it

    regular_file(path)
    mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path.name} lacks the X and y arrays of an SVHN file")
    x, y = mat["X"], mat["y"].astype(np.int64).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3:
        raise ValueError(f"{path.name}: X is {x.shape}, not 32 x 32 x 3 x N")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8)   # HWCN -> NCHW
    _same_count(images, y, path)
    return images, np.where(y == 10, 0, y)


def read_stl10(folder: Path, train: bool) -> Split:
    """STL-10's labelled binaries: {split}_X.bin holds, per image and per channel, 96 x 96 pixels
    column by column; {split}_y.bin holds uint8 labels 1..10."""
    split = "train" if train else "test"
    regular_file(folder / f"{split}_X.bin")
    regular_file(folder / f"{split}_y.bin")
    raw = np.fromfile(folder / f"{split}_X.bin", dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise ValueError(f"{split}_X.bin holds {raw.size} bytes, not a whole number of 3 x 96 x "
                         "96 images")
    # Column-major pixels: swap H and W, then one contiguous copy.
    images = np.ascontiguousarray(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))
    labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64)
    _same_count(images, labels, folder / f"{split}_y.bin")
    return images, labels - 1


def _same_count(images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    if len(images) != len(labels):
        raise ValueError(f"{path.name} has {len(labels)} labels for {len(images)} images")
