"""What a feature cache is on disk: file names, dtypes, and the manifest that marks it complete.

A cache directory holds three files:

- ``features.npy``: a real .npy file, shape ``(count, *sample_shape)``, C order, so
  ``np.load(path, mmap_mode="r")`` works for anyone who wants to look at it;
- ``labels.npy``: int64 ``(count,)``;
- ``manifest.json``: written last, so its presence means the two files above are complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from edgetrain import config

FORMAT_VERSION = 1
FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
MANIFEST_FILE = "manifest.json"

# The names live in config.CACHE_DTYPES (no torch there); their torch types, in that order:
CACHE_DTYPES: dict[str, torch.dtype] = dict(zip(config.CACHE_DTYPES,
                                                (torch.float32, torch.float16, torch.bfloat16),
                                                strict=True))

# How each cache dtype is stored in the .npy. numpy has no bfloat16, so its raw 16-bit patterns
# are stored as unsigned 16-bit ints and reinterpreted with `tensor.view(torch.bfloat16)` on read.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
LABEL_DTYPE = np.dtype("<i8")

CHECKSUM_ALGORITHM = "blake2b"
_INT_FIELDS = ("format_version", "count", "features_bytes")


class CacheCorruptError(Exception):
    """A cache directory is incomplete or does not match its manifest; rebuild the cache."""


def new_hasher() -> hashlib.blake2b:
    """The incremental hash that checksums a file's data bytes (everything after the header)."""
    return hashlib.blake2b()


def format_checksum(hasher: hashlib.blake2b) -> str:
    return f"{CHECKSUM_ALGORITHM}:{hasher.hexdigest()}"


@dataclass(frozen=True)
class CacheManifest:
    """Describes a complete cache; written last, read first.

    >>> m = CacheManifest(1, (2, 3), "float16", 2, "features.npy", "labels.npy", 140,
    ...                   "blake2b:00", "blake2b:11")
    >>> CacheManifest.from_json(m.to_json()) == m
    True
    """

    format_version: int
    """Version of this on-disk layout; readers refuse versions they do not know."""
    shape: tuple[int, ...]
    """Shape of the features array: ``(count, *sample_shape)``."""
    dtype: str
    """Cache dtype, a key of ``CACHE_DTYPES``."""
    count: int
    """Number of samples; equals ``shape[0]``."""
    features_file: str
    """Name of the features .npy file inside the cache directory."""
    labels_file: str
    """Name of the labels .npy file inside the cache directory."""
    features_bytes: int
    """Size of the features file on disk, header included."""
    checksum: str
    """``"blake2b:<hex>"`` of the features data bytes (after the .npy header)."""
    labels_checksum: str
    """``"blake2b:<hex>"`` of the labels data bytes (after the .npy header)."""

    def __post_init__(self) -> None:
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"unknown cache dtype {self.dtype!r}; known: {list(CACHE_DTYPES)}")
        if not self.shape or self.shape[0] != self.count:
            raise ValueError(f"shape {self.shape} does not start with count {self.count}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CacheManifest:
        """Parse a manifest; anything malformed raises CacheCorruptError."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CacheCorruptError(f"{MANIFEST_FILE} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise CacheCorruptError(f"{MANIFEST_FILE} does not hold a JSON object")
        expected = {f.name for f in fields(cls)}
        missing, extra = expected - data.keys(), data.keys() - expected
        if missing or extra:
            raise CacheCorruptError(
                f"{MANIFEST_FILE} fields do not match: missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}"
            )
        wrong_type = [
            name
            for name, value in data.items()
            if name != "shape" and not isinstance(value, int if name in _INT_FIELDS else str)
        ]
        if wrong_type or not isinstance(data["shape"], list):
            raise CacheCorruptError(
                f"{MANIFEST_FILE} has fields of the wrong type: {wrong_type or ['shape']}"
            )
        try:
            data["shape"] = tuple(int(s) for s in data["shape"])
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise CacheCorruptError(f"{MANIFEST_FILE} is malformed: {err}") from err
