"""Build the shipped `fashion-mnist-mini` set from Debian's Fashion-MNIST files.

Takes a seeded, class-balanced subset of the official splits (600 per class from train, 200 per
class from test) and writes it as one compressed .npz inside the package:

    python scripts/make_builtin_dataset.py            # needs: apt-get install dataset-fashion-mnist

The output is byte-for-byte reproducible (fixed seed, fixed zip timestamps), so rerunning the
script on the same input leaves git with nothing to commit.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
OUTPUT = Path(__file__).resolve().parents[1] / "edgetrain/data/builtin/fashion_mnist_mini.npz"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# A fixed timestamp: np.savez_compressed stamps each member with the current time, which would
# make every rebuild a new binary blob for git even when the arrays are identical.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (the MNIST format: big-endian header, then uint8 data)."""
    raw = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 is the idx type code for unsigned bytes
        raise ValueError(f"{path}: not a uint8 idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` random indices of every class, returned in the split's original order."""
    picks = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False)
             for c in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(picks))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Same format as np.savez_compressed (np.load reads it), with reproducible bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEBIAN_DIR,
                        help="folder with the four Fashion-MNIST *-ubyte.gz files")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    files = {split: (args.source / f"{prefix}-images-idx3-ubyte.gz",
                     args.source / f"{prefix}-labels-idx1-ubyte.gz")
             for split, prefix in (("train", "train"), ("test", "t10k"))}
    missing = [str(p) for pair in files.values() for p in pair if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}; install them with "
                         "`apt-get install dataset-fashion-mnist` or pass --source")

    rng = np.random.default_rng(args.seed)
    arrays: dict[str, np.ndarray] = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        images, labels = read_idx(files[split][0]), read_idx(files[split][1])
        index = balanced_indices(labels, per_class, rng)
        arrays[f"{split}_images"] = images[index]                       # uint8 [N, 28, 28]
        arrays[f"{split}_labels"] = labels[index]                       # uint8 [N]
        # Where each image came from in the official split, so anyone can check the subset.
        arrays[f"{split}_source_index"] = index.astype(np.int32)
    arrays["class_names"] = np.array(CLASS_NAMES)

    write_npz(args.output, arrays)
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB, sha256 {digest})")
    for split in ("train", "test"):
        counts = np.bincount(arrays[f"{split}_labels"], minlength=len(CLASS_NAMES))
        print(f"  {split}: {len(arrays[f'{split}_labels'])} images, per class {counts.tolist()}")


if __name__ == "__main__":
    main()
