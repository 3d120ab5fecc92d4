"""`--download`: torchvision fetches a dataset's files (and checks their md5 sums), in a child
process.

torchvision knows each set's mirrors and checksums, so it does the fetching; but importing it
costs about 165 MB of resident memory (see formats.py), which the training process would then
hold until it ends. The child process pays that and exits; the files it leaves are read by
edgetrain/data/formats.py.

    python -m edgetrain.data.download cifar10 ~/.cache/edgetrain/data
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgetrain.errors import UserInputError

# edgetrain name -> (torchvision class, how it names the two splits)
TORCHVISION_CLASSES = {
    "mnist": ("MNIST", "train"),
    "fashion-mnist": ("FashionMNIST", "train"),
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "svhn": ("SVHN", "split"),
    "stl10": ("STL10", "split"),
}


def download(name: str, root: Path, title: str) -> None:
    """Fetch `name` into `root` in a child process; a UserInputError if that fails."""
    cmd = [sys.executable, "-m", "edgetrain.data.download", name, str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise UserInputError(f"--download of {title} into {root} failed ({reason}); check the "
                             "internet connection, or put the files into --data-dir yourself")


def _fetch(name: str, root: Path) -> None:
    from torchvision import datasets

    cls_name, split_arg = TORCHVISION_CLASSES[name]
    cls = getattr(datasets, cls_name)
    for train in (True, False):
        split = {"train": train} if split_arg == "train" else {
            "split": "train" if train else "test"}
        cls(str(root), download=True, **split)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in TORCHVISION_CLASSES:
        sys.exit(f"usage: python -m edgetrain.data.download {{{','.join(TORCHVISION_CLASSES)}}} "
                 "ROOT")
    _fetch(sys.argv[1], Path(sys.argv[2]).expanduser())
