"""The user's own images: DIR/train/<class>/*.png and DIR/test/<class>/* (or DIR/val/).

Read lazily, one file per sample, because a user's folder may not fit in memory. Each image is
converted to RGB, resized (shorter side) and center-cropped to `image_size`, and returned as a
uint8 tensor, so batches look exactly like the in-memory sets'.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from edgetrain.data.bundle import DataBundle, DatasetInfo
from edgetrain.errors import UserInputError

NAME = "imagefolder"
DEFAULT_IMAGE_SIZE = 32
STATS_SAMPLES = 1000
LAYOUT = "DIR/train/<class>/*.png (or .jpg, ...) and DIR/test/<class>/* (or DIR/val/<class>/*)"


def load_imagefolder(data_dir: Path | None, download: bool, image_size: int | None,
                     seed: int = 0) -> DataBundle:
    """Load both splits lazily; mean/std come from up to 1,000 training images (seeded)."""
    root = Path(data_dir).expanduser() if data_dir is not None else None
    problems = []
    if download:
        problems.append(f"--download does not apply to --dataset {NAME}; drop it")
    if root is None:
        problems.append(f"--dataset {NAME} needs --data-dir DIR laid out as {LAYOUT}")
    elif not root.is_dir():
        problems.append(f"--data-dir {root} does not exist; pass a folder laid out as {LAYOUT}")
    else:
        if not (root / "train").is_dir():
            problems.append(f"--data-dir {root} has no train/ folder; expected {LAYOUT}")
        if not any((root / s).is_dir() for s in ("test", "val")):
            problems.append(f"--data-dir {root} has neither test/ nor val/; expected {LAYOUT}")
    if problems or root is None:  # root is None always comes with a problem
        raise UserInputError(problems)

    size = image_size or DEFAULT_IMAGE_SIZE
    transform = transforms.Compose([
        transforms.Resize(size),          # shorter side to `size`, keeping the aspect ratio
        transforms.CenterCrop(size),
        transforms.PILToTensor(),         # uint8 [C, H, W]; scaling happens per batch, later
    ])
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    train = ImageFolderDataset(root / "train", root, transform)
    test = ImageFolderDataset(test_dir, root, transform)
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise UserInputError(
            f"--data-dir {root}: the class folders of train/ and {test_dir.name}/ must match; "
            f"only in train/: {only_train or 'none'}, only in {test_dir.name}/: "
            f"{only_test or 'none'}. Add or remove class folders so both have the same set")
    if len(train.classes) < 2:
        raise UserInputError(
            f"--data-dir {root}: train/ holds a single class ({train.classes[0]!r}); a "
            "classifier needs at least two class folders, e.g. train/cat and train/dog")

    mean, std = _channel_stats(train, seed)
    info = DatasetInfo(name=NAME, num_classes=len(train.classes), in_channels=3,
                       image_size=size, mean=mean, std=std, hflip=True,
                       crop_padding=max(1, size // 8))
    return DataBundle(train=train, test=test, info=info)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderDataset(Dataset):
    """``folder/<class>/**/<image>``, read lazily: items are ``(transform(image), label)``.

    The folder is walked once, here, and safely: a symbolic link to a directory is followed
    only if it stays inside the data root (a link out of it is refused, naming it, rather than
    its images silently left out; each real directory is entered once, so a link loop cannot
    hang the walk); two class folders that are one directory are refused (its images would
    get two labels); anything that is not a regular file (a FIFO would block
    the first read forever, a device can be endless) and any name starting with "." (.DS_Store,
    .ipynb_checkpoints) is skipped. ``samples``, ``targets`` and ``classes`` are named as in
    torchvision's ImageFolder.
    """

    def __init__(self, folder: Path, data_root: Path, transform: transforms.Compose):
        self.root = str(folder)
        self.transform = transform
        self._data_root = os.path.realpath(data_root)
        classes = sorted(e.name for e in os.scandir(folder)
                         if not e.name.startswith(".") and self._enterable(e))
        reals: dict[str, str] = {}
        for c in classes:
            other = reals.setdefault(os.path.realpath(folder / c), c)
            if other != c:
                raise UserInputError(
                    f"--data-dir: {folder / c} and {folder / other} are the same folder (a "
                    "symbolic link), so its images would get two labels. Remove the link, or "
                    "give each class its own images")
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples: list[tuple[str, int]] = []
        empty = []
        # Directories entered once in all: the split folder and the class folders themselves
        # count as entered, so a link back up (a loop) or across to another class is skipped
        # instead of giving that class's images a second, wrong label.
        seen = {os.path.realpath(folder), *(os.path.realpath(folder / c) for c in classes)}
        for c in classes:
            found = sorted(self._images(folder / c, seen, top=True))
            if not found:
                empty.append(c)
            self.samples += [(path, self.class_to_idx[c]) for path in found]
        if not classes or empty:
            what = (f"its class folders {empty} hold no images" if empty
                    else "it has no class folders")
            raise UserInputError(f"--data-dir: {folder} has no usable images ({what}; image "
                                 f"files end in {', '.join(IMAGE_EXTENSIONS)}); expected "
                                 f"{LAYOUT}")
        self.targets = [label for _, label in self.samples]

    def _enterable(self, entry: os.DirEntry) -> bool:
        """A directory, or a link to one inside the data root; a link to a directory outside
        it is refused (UserInputError naming it), not silently skipped."""
        if not entry.is_dir(follow_symlinks=True):
            return False
        if not entry.is_symlink():
            return True
        real = os.path.realpath(entry.path)
        if real == self._data_root or real.startswith(self._data_root + os.sep):
            return True
        raise UserInputError(
            f"--data-dir: {entry.path} is a symbolic link to {real}, outside --data-dir "
            f"{self._data_root}; edgetrain follows links only inside it, and would otherwise "
            "leave those images out without a word. Copy or move them into --data-dir, or "
            "point --data-dir at a folder that holds them")

    def _images(self, folder: Path, seen: set[str], top: bool = False):
        real = os.path.realpath(folder)
        if not top:
            if real in seen:
                return  # a link loop, or a directory reached twice
            seen.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if self._enterable(entry):
                yield from self._images(Path(entry.path), seen)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                try:
                    regular = stat.S_ISREG(os.stat(entry.path).st_mode)
                except OSError:  # a dangling link
                    regular = False
                if regular:
                    yield entry.path

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(_load_image(path)), label


def _load_image(path: str) -> Image.Image:
    # Images are read lazily, so a damaged file can turn up in the middle of training: it
    # stops the run with its name (finished modules are kept) instead of a PIL traceback.
    # Grayscale and palette images come out with 3 channels.
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserInputError(f"--data-dir: {path} is not a readable image ({err}). Remove or "
                             "replace it, then run again") from err


def _channel_stats(dataset: ImageFolderDataset, seed: int
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to STATS_SAMPLES random images, scaled to [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=generator)[:STATS_SAMPLES]
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for i in picks.tolist():
        image = dataset[i][0].to(torch.float64).div_(255.0).flatten(1)   # [3, H*W]
        total += image.sum(1)
        squares += image.square().sum(1)
        pixels += image.shape[1]
    mean = total / pixels
    # Floor the std: a folder of flat images would otherwise divide by zero in normalize().
    std = (squares / pixels - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())
