"""Data layer: every loader on small files in each set's real on-disk format, plus batching,
augmentation and the user-facing errors."""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import Dataset

from edgetrain.data import (
    DATASET_NAMES,
    DEFAULT_DATASET,
    ArrayDataset,
    augment_batch,
    iterate_batches,
    load_dataset,
    normalize,
    standard_sets,
)
from edgetrain.errors import UserInputError

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train x, y, test x, y (NCHW)


def random_split(n: int, channels: int, size: int, classes: int, seed: int):
    """Random NCHW uint8 images (every pixel differs, so a transpose cannot go unnoticed)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
    labels = np.arange(n) % classes
    return images, labels


# --- writers: each set's real on-disk format ------------------------------------------------

def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """MNIST's idx format: 0x00 0x00, type 0x08 (uint8), ndim, big-endian dims, then data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)


def write_mnist_like(folder: Path, compress: bool = False) -> Arrays:
    """folder/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"""
    x_train, y_train = random_split(20, 1, 28, 10, seed=1)
    x_test, y_test = random_split(10, 1, 28, 10, seed=2)
    suffix = ".gz" if compress else ""
    for prefix, x, y in (("train", x_train, y_train), ("t10k", x_test, y_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x[:, 0], compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y, compress)
    return x_train, y_train, x_test, y_test


def write_mnist(root: Path) -> Arrays:
    return write_mnist_like(root / "MNIST" / "raw")


def write_fashion_mnist(root: Path) -> Arrays:
    return write_mnist_like(root / "FashionMNIST" / "raw")


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root: Path) -> Arrays:
    """cifar-10-batches-py/data_batch_1..5, test_batch: {"data": N x 3072 (R, G, B planes of
    row-major 32x32), "labels": list}; batches.meta: {"label_names": [...]}."""
    folder = root / "cifar-10-batches-py"
    x_train, y_train = random_split(20, 3, 32, 10, seed=3)
    x_test, y_test = random_split(10, 3, 32, 10, seed=4)
    for i in range(5):
        part = slice(4 * i, 4 * i + 4)
        _pickle(folder / f"data_batch_{i + 1}", {"data": x_train[part].reshape(4, -1),
                                                 "labels": y_train[part].tolist()})
    _pickle(folder / "test_batch", {"data": x_test.reshape(10, -1), "labels": y_test.tolist()})
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return x_train, y_train, x_test, y_test


def write_cifar100(root: Path) -> Arrays:
    """cifar-100-python/{train,test}: {"data", "fine_labels", "coarse_labels"}; meta."""
    folder = root / "cifar-100-python"
    x_train, y_train = random_split(100, 3, 32, 100, seed=5)
    x_test, y_test = random_split(100, 3, 32, 100, seed=6)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        _pickle(folder / name, {"data": x.reshape(len(x), -1), "fine_labels": y.tolist(),
                                "coarse_labels": (y // 5).tolist()})
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                              "coarse_label_names": [f"s{i}" for i in range(20)]})
    return x_train, y_train, x_test, y_test


def write_svhn(root: Path) -> Arrays:
    """{train,test}_32x32.mat: X is H x W x C x N uint8, y is N x 1 with 10 meaning digit 0."""
    x_train, y_train = random_split(20, 3, 32, 10, seed=7)
    x_test, y_test = random_split(10, 3, 32, 10, seed=8)
    root.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        scipy.io.savemat(root / f"{name}_32x32.mat", {
            "X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)),
            "y": np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)})
    return x_train, y_train, x_test, y_test


def write_stl10(root: Path) -> Arrays:
    """stl10_binary/{train,test}_X.bin: per image, per channel, pixels column by column;
    {train,test}_y.bin: uint8 labels 1..10; class_names.txt."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    x_train, y_train = random_split(10, 3, 96, 10, seed=9)
    x_test, y_test = random_split(10, 3, 96, 10, seed=10)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        (folder / f"{name}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)))
        (folder / f"{name}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)))
    return x_train, y_train, x_test, y_test


# name: (writer, num_classes, in_channels, image_size, hflip, crop_padding)
TORCHVISION_SETS = {
    "mnist": (write_mnist, 10, 1, 28, False, 2),
    "fashion-mnist": (write_fashion_mnist, 10, 1, 28, True, 2),
    "cifar10": (write_cifar10, 10, 3, 32, True, 4),
    "cifar100": (write_cifar100, 100, 3, 32, True, 4),
    "svhn": (write_svhn, 10, 3, 32, False, 4),
    "stl10": (write_stl10, 10, 3, 96, True, 12),
}


@pytest.fixture
def no_debian_fashion_mnist(tmp_path, monkeypatch) -> Path:
    """Point the Debian Fashion-MNIST lookup at an empty folder (returned, to fill if needed)."""
    folder = tmp_path / "debian-fashion-mnist"
    folder.mkdir()
    monkeypatch.setattr(standard_sets, "DEBIAN_FASHION_MNIST_DIR", folder)
    return folder


# --- the built-in default set ---------------------------------------------------------------

def test_names_and_default():
    assert DATASET_NAMES == ("fashion-mnist-mini", "fashion-mnist", "mnist", "cifar10",
                             "cifar100", "svhn", "stl10", "imagefolder")
    assert DEFAULT_DATASET == "fashion-mnist-mini"


def test_builtin_set_loads_offline_balanced():
    bundle = load_dataset(DEFAULT_DATASET)
    info = bundle.info
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    assert (info.hflip, info.crop_padding) == (True, 2)
    for split, n in ((bundle.train, 6000), (bundle.test, 2000)):
        assert isinstance(split, ArrayDataset)
        assert split.images.shape == (n, 1, 28, 28) and split.images.dtype == torch.uint8
        assert split.images.is_contiguous() and split.labels.dtype == torch.int64
        assert torch.bincount(split.labels).tolist() == [n // 10] * 10
    assert 0.2 < bundle.train.images.float().mean().item() / 255 < 0.4  # real images, not noise


# --- torchvision sets, from small files in their real formats -------------------------------

@pytest.mark.parametrize("name", list(TORCHVISION_SETS))
def test_torchvision_set_real_format(name, tmp_path, no_debian_fashion_mnist):
    writer, num_classes, channels, size, hflip, padding = TORCHVISION_SETS[name]
    x_train, y_train, x_test, y_test = writer(tmp_path / "data")
    bundle = load_dataset(name, data_dir=tmp_path / "data")
    info = bundle.info
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == (
        name, num_classes, channels, size)
    assert (info.hflip, info.crop_padding) == (hflip, padding)
    assert len(info.mean) == len(info.std) == channels
    for split, x, y in ((bundle.train, x_train, y_train), (bundle.test, x_test, y_test)):
        assert isinstance(split, ArrayDataset) and split.images.is_contiguous()
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        # Every pixel in its place: random images catch any H/W or channel transpose.
        assert torch.equal(split.images, torch.from_numpy(x))
        assert split.labels.tolist() == y.tolist()
        image, label = split[1]
        assert image.shape == (channels, size, size) and label == int(y[1])


def test_standard_sets_load_without_importing_torchvision(tmp_path):
    """torchvision's import costs about 165 MB of resident memory: a real process loading an
    in-memory set must never import it (only --download does, in a child process)."""
    write_cifar10(tmp_path / "data")
    write_fashion_mnist(tmp_path / "data")
    code = ("import sys; from pathlib import Path; from edgetrain.data import load_dataset; "
            "[load_dataset(n, data_dir=Path(sys.argv[1])) for n in ('cifar10', 'fashion-mnist')]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torchvision', 'sympy', 'torch._dynamo')))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": Payload(), "labels": [0]})
    with pytest.raises(UserInputError, match="refusing to load .*system") as err:
        load_dataset("cifar10", data_dir=tmp_path)
    assert f"--data-dir {tmp_path}" in str(err.value) and not marker.exists()


@pytest.mark.parametrize("cut", [3, 10, 100])
def test_truncated_idx_file_is_named(tmp_path, no_debian_fashion_mnist, cut):
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(UserInputError, match="t10k-images-idx3-ubyte") as err:
        load_dataset("mnist", data_dir=tmp_path)
    assert "cannot be read" in str(err.value) and "--download" in str(err.value)


def test_failed_download_is_a_clean_error(tmp_path):
    # A data dir that is a file: torchvision (in its child process) fails before any network.
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("a file, not a folder")
    with pytest.raises(UserInputError, match=f"--download of MNIST into {not_a_folder} failed"):
        load_dataset("mnist", data_dir=not_a_folder, download=True)
    assert not_a_folder.read_text() == "a file, not a folder"


def test_resize_at_load(tmp_path):
    write_stl10(tmp_path)
    bundle = load_dataset("stl10", data_dir=tmp_path, image_size=32)
    assert bundle.train.images.shape == (10, 3, 32, 32)
    assert (bundle.info.image_size, bundle.info.crop_padding) == (32, 4)


def test_fashion_mnist_found_in_debian_folder(tmp_path, no_debian_fashion_mnist):
    x_train, y_train, x_test, _ = write_mnist_like(no_debian_fashion_mnist, compress=True)
    bundle = load_dataset("fashion-mnist", data_dir=tmp_path / "cache")
    assert torch.equal(bundle.train.images, torch.from_numpy(x_train))
    assert bundle.train.labels.tolist() == y_train.tolist()
    assert len(bundle.test) == len(x_test)
    unpacked = sorted(p.name for p in (tmp_path / "cache" / "FashionMNIST" / "raw").iterdir())
    assert unpacked == sorted(standard_sets._IDX_FILES)  # no temporary files left behind


@pytest.mark.skipif(not standard_sets.DEBIAN_FASHION_MNIST_DIR.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist package")
def test_real_debian_fashion_mnist_and_builtin_subset(tmp_path):
    full = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert (len(full.train), len(full.test)) == (60000, 10000)
    # The shipped set is exactly the images its source indices name in the official splits.
    mini = load_dataset(DEFAULT_DATASET)
    npz = resources.files("edgetrain.data") / "builtin" / "fashion_mnist_mini.npz"
    with resources.as_file(npz) as path, np.load(path) as arrays:
        for split in ("train", "test"):
            small, big = getattr(mini, split), getattr(full, split)
            index = torch.from_numpy(arrays[f"{split}_source_index"].astype(np.int64))
            assert torch.equal(small.images, big.images[index])
            assert torch.equal(small.labels, big.labels[index])


# --- image folder ---------------------------------------------------------------------------

def write_image_folder(root: Path, splits: dict[str, list[str]], per_class: int = 3) -> None:
    rng = np.random.default_rng(11)
    for split, classes in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i == 0:
                    image = image.convert("L")  # a grayscale file must come out as RGB
                image.save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("test_folder", ["test", "val"])
def test_imagefolder_lazy_rgb(tmp_path, test_folder):
    write_image_folder(tmp_path, {"train": ["cat", "dog"], test_folder: ["cat", "dog"]})
    bundle = load_dataset("imagefolder", data_dir=tmp_path, image_size=16)
    info = bundle.info
    assert (info.num_classes, info.in_channels, info.image_size) == (2, 3, 16)
    assert not isinstance(bundle.train, ArrayDataset)  # read lazily, file by file
    image, label = bundle.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label == 0
    # Fewer than 1,000 training images: the statistics cover all of them exactly.
    pixels = torch.stack([x for x, _ in bundle.train]).double().div(255).transpose(0, 1)
    pixels = pixels.reshape(3, -1)
    assert torch.allclose(torch.tensor(info.mean, dtype=torch.float64), pixels.mean(1))
    assert torch.allclose(torch.tensor(info.std, dtype=torch.float64), pixels.std(1, correction=0))
    images, labels = next(iterate_batches(bundle.test, 4, shuffle=False))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1]


def test_imagefolder_limit_is_balanced(tmp_path):
    write_image_folder(tmp_path, {"train": ["a", "b", "c"], "test": ["a", "b", "c"]})
    bundle = load_dataset("imagefolder", data_dir=tmp_path, train_limit=6, image_size=8)
    labels = [label for _, label in bundle.train]
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_imagefolder_class_mismatch(tmp_path):
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "test": ["cat", "emu"]}, per_class=1)
    with pytest.raises(UserInputError, match=r"train/ and test/.*'dog'.*'emu'"):
        load_dataset("imagefolder", data_dir=tmp_path)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserInputError, match="--dataset imagefolder needs --data-dir"):
        load_dataset("imagefolder")
    with pytest.raises(UserInputError, match="--data-dir .* does not exist"):
        load_dataset("imagefolder", data_dir=tmp_path / "nowhere")
    with pytest.raises(UserInputError, match="no train/ folder") as err:
        load_dataset("imagefolder", data_dir=tmp_path, download=True)
    message = str(err.value)
    assert "neither test/ nor val/" in message and "--download does not apply" in message
    (tmp_path / "train" / "cat").mkdir(parents=True)  # a class folder without images
    (tmp_path / "test").mkdir()
    with pytest.raises(UserInputError, match="has no usable images"):
        load_dataset("imagefolder", data_dir=tmp_path)


# --- user errors ----------------------------------------------------------------------------

def test_unknown_dataset_lists_choices():
    with pytest.raises(UserInputError, match="--dataset 'cifar' is not known.*cifar10, cifar100"):
        load_dataset("cifar")


@pytest.mark.parametrize("name", list(TORCHVISION_SETS))
def test_missing_files_name_flag_and_fix(name, tmp_path, no_debian_fashion_mnist):
    with pytest.raises(UserInputError, match=f"--data-dir {tmp_path}") as err:
        load_dataset(name, data_dir=tmp_path)
    message = str(err.value)
    assert "--download" in message
    assert standard_sets._SPECS[name].files[0] in message  # names the files it looked for
    if name == "fashion-mnist":
        assert "apt-get install dataset-fashion-mnist" in message


def test_missing_files_lists_expected_names(tmp_path):
    with pytest.raises(UserInputError, match="cifar-10-batches-py/data_batch_1"):
        load_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(UserInputError, match="train_32x32.mat, test_32x32.mat"):
        load_dataset("svhn", data_dir=tmp_path)


def test_default_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETRAIN_DATA_DIR", str(tmp_path))
    write_cifar10(tmp_path)
    assert len(load_dataset("cifar10").train) == 20
    monkeypatch.setenv("EDGETRAIN_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(UserInputError, match="EDGETRAIN_DATA_DIR"):
        load_dataset("cifar10")


def test_builtin_rejects_data_dir_and_download(tmp_path):
    with pytest.raises(UserInputError) as err:
        load_dataset(DEFAULT_DATASET, data_dir=tmp_path, download=True)
    assert err.value.problems[0].startswith("--data-dir is not used")
    assert err.value.problems[1].startswith("--download is not needed")


def test_image_size_too_small():
    with pytest.raises(UserInputError, match="--image-size 4"):
        load_dataset(DEFAULT_DATASET, image_size=4)


def test_limits_balanced_seeded_and_checked():
    a = load_dataset(DEFAULT_DATASET, train_limit=105, test_limit=20, seed=1)
    b = load_dataset(DEFAULT_DATASET, train_limit=105, test_limit=20, seed=1)
    c = load_dataset(DEFAULT_DATASET, train_limit=105, test_limit=20, seed=2)
    counts = torch.bincount(a.train.labels)
    assert len(a.train) == 105 and counts.max() - counts.min() <= 1
    assert torch.bincount(a.test.labels).tolist() == [2] * 10
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)
    with pytest.raises(UserInputError) as err:
        load_dataset(DEFAULT_DATASET, train_limit=6001, test_limit=9)
    assert len(err.value.problems) == 2  # both problems reported at once
    assert "--train-limit 6001 is larger" in str(err.value)
    assert "--test-limit 9 is smaller than the number of classes (10)" in str(err.value)


# --- batching -------------------------------------------------------------------------------

class LazyView(Dataset):
    """A dataset that is not an ArrayDataset, to exercise the DataLoader path."""

    def __init__(self, inner: ArrayDataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


@pytest.fixture
def small_arrays() -> ArrayDataset:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 3, 3)
    return ArrayDataset(images.clone(), torch.arange(10) % 3)


def _epoch(dataset, seed=None, generator=None, **kwargs):
    generator = generator or torch.Generator().manual_seed(seed)
    return list(iterate_batches(dataset, 3, shuffle=True, generator=generator, **kwargs))


def test_iterate_batches_covers_each_sample_once(small_arrays):
    batches = _epoch(small_arrays, seed=0)
    assert [len(y) for _, y in batches] == [3, 3, 3, 1]
    images = torch.cat([x for x, _ in batches])
    assert images.dtype == torch.uint8 and images.shape == (10, 2, 3, 3)
    assert sorted(images[:, 0, 0, 0].tolist()) == list(range(10))
    labels = torch.cat([y for _, y in batches])
    assert labels.dtype == torch.int64
    assert torch.equal(labels, images[:, 0, 0, 0].long() % 3)  # labels travel with images
    assert [len(y) for _, y in _epoch(small_arrays, seed=0, drop_last=True)] == [3, 3, 3]
    ordered = list(iterate_batches(small_arrays, 4, shuffle=False))
    assert torch.cat([y for _, y in ordered]).tolist() == (torch.arange(10) % 3).tolist()


def test_iterate_batches_seeded_and_new_order_each_epoch(small_arrays):
    def order(batches):
        return torch.cat([x[:, 0, 0, 0] for x, _ in batches]).tolist()
    assert order(_epoch(small_arrays, seed=0)) == order(_epoch(small_arrays, seed=0))
    generator = torch.Generator().manual_seed(0)
    first = order(_epoch(small_arrays, generator=generator))
    second = order(_epoch(small_arrays, generator=generator))
    assert first != second and sorted(first) == sorted(second)


def test_dataloader_path_matches_fast_path(small_arrays):
    fast = _epoch(small_arrays, seed=3)
    lazy = _epoch(LazyView(small_arrays), seed=3)
    assert len(fast) == len(lazy)
    for (x1, y1), (x2, y2) in zip(fast, lazy, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x2.dtype == torch.uint8 and y2.dtype == torch.int64


# --- augmentation and normalisation ---------------------------------------------------------

@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def test_augment_identity_and_dtype(batch):
    assert torch.equal(augment_batch(batch, 0, False), batch)
    for images in (batch, batch.float() / 255):
        out = augment_batch(images, 2, True, torch.Generator().manual_seed(0))
        assert out.shape == images.shape and out.dtype == images.dtype


def test_augment_flip_matches_torch_flip(batch):
    out = augment_batch(batch, 0, True, torch.Generator().manual_seed(1))
    flipped = torch.tensor([not torch.equal(o, x) for o, x in zip(out, batch, strict=True)])
    assert 0 < flipped.sum() < len(batch)
    assert torch.equal(out[flipped], torch.flip(batch[flipped], dims=[3]))
    assert torch.equal(out[~flipped], batch[~flipped])


def test_augment_crop_follows_documented_draws(batch):
    padding = 2
    out = augment_batch(batch, padding, False, torch.Generator().manual_seed(2))
    replay = torch.Generator().manual_seed(2)
    top = torch.randint(0, 2 * padding + 1, (len(batch),), generator=replay)
    left = torch.randint(0, 2 * padding + 1, (len(batch),), generator=replay)
    padded = torch.nn.functional.pad(batch, (padding,) * 4)
    for i in range(len(batch)):
        expected = padded[i, :, top[i]:top[i] + 8, left[i]:left[i] + 8]
        assert torch.equal(out[i], expected)


def test_augment_reproducible(batch):
    def run(seed):
        return augment_batch(batch, 2, True, torch.Generator().manual_seed(seed))
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_normalize(batch):
    info = load_dataset(DEFAULT_DATASET, train_limit=10, test_limit=10).info
    gray = batch[:, :1]
    out = normalize(gray, info)
    assert out.dtype == torch.float32 and out.shape == gray.shape
    expected = (gray.double() / 255 - info.mean[0]) / info.std[0]
    assert torch.allclose(out.double(), expected, atol=1e-5)
    with pytest.raises(TypeError):
        normalize(gray.float(), info)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(batch):
    def augment(images):
        return augment_batch(images, 2, True, torch.Generator().manual_seed(7))
    assert torch.equal(augment(batch.cuda()).cpu(), augment(batch))
    info = load_dataset(DEFAULT_DATASET, train_limit=10, test_limit=10).info
    assert torch.allclose(normalize(batch[:, :1].cuda(), info).cpu(), normalize(batch[:, :1], info))
    on_gpu = ArrayDataset(batch.cuda(), torch.arange(16, device="cuda"))
    images, labels = next(iterate_batches(on_gpu, 4, True, torch.Generator().manual_seed(0)))
    assert images.is_cuda and labels.is_cuda and len(labels) == 4
