"""Read a feature cache back as shuffled mini-batches, never holding the whole file in memory.

Why positioned reads and not ``np.load`` or ``np.memmap``: loading is O(dataset) memory by
definition, and the pages of a memory-mapped file that an epoch touches count toward the
process's resident set (RSS, VmHWM), which is exactly what edgetrain's memory meter measures and
budgets against; one mapped epoch over a large cache would read as a huge "peak". ``os.preadv``
copies rows into a buffer we own instead. The kernel's page cache still holds recently read
pages, but that is reclaimable kernel memory, not part of this process's RSS.

Memory while reading is O(batch): the batch being yielded (a fresh tensor each time, so callers
may keep it), read straight into its place (``preadv`` scatters each run of consecutive rows
into the batch's rows): no read buffer beside it, which would double what a training step's
input costs. Besides that the reader holds the int64 labels and, during a pass, one int64 index
permutation: 16 bytes per sample, against ``prod(sample_shape) * itemsize`` per sample for the
features.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from numpy.lib import format as npy_format

from edgetrain.cache.manifest import (
    CACHE_DTYPES,
    FORMAT_VERSION,
    LABEL_DTYPE,
    MANIFEST_FILE,
    STORAGE_DTYPES,
    CacheCorruptError,
    CacheManifest,
    format_checksum,
    new_hasher,
)

# Checksums stream the file through one buffer of this size, so verifying is O(1) memory.
_VERIFY_CHUNK_BYTES = 4 * 1024 * 1024


_IOV_MAX = 1024
"""Most buffers one preadv call takes (Linux's IOV_MAX)."""


def _pread_into(fd: int, view: memoryview, offset: int, name: str) -> None:
    """Fill ``view`` with the file's bytes starting at ``offset``, looping over short reads."""
    while len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view], offset)  # straight into our buffer, no temporary bytes
        else:
            data = os.pread(fd, len(view), offset)
            n = len(data)
            view[:n] = data
        if n == 0:
            raise CacheCorruptError(f"{name} ends early: no data at byte {offset}")
        view = view[n:]
        offset += n


def _pread_scatter(fd: int, views: list[memoryview], offset: int, name: str) -> None:
    """Fill ``views`` in turn with the file's consecutive bytes from ``offset`` (one
    ``preadv`` where the OS has it, looping over short reads)."""
    if not hasattr(os, "preadv"):
        for view in views:
            _pread_into(fd, view, offset, name)
            offset += len(view)
        return
    while views:
        n = os.preadv(fd, views[:_IOV_MAX], offset)
        if n == 0:
            raise CacheCorruptError(f"{name} ends early: no data at byte {offset}")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if n:
            views = [views[0][n:], *views[1:]]


def _checksum(fd: int, offset: int, nbytes: int, name: str) -> str:
    hasher = new_hasher()
    buffer = memoryview(bytearray(min(_VERIFY_CHUNK_BYTES, nbytes)))
    while nbytes:
        chunk = buffer[: min(len(buffer), nbytes)]
        _pread_into(fd, chunk, offset, name)
        hasher.update(chunk)
        offset += len(chunk)
        nbytes -= len(chunk)
    return format_checksum(hasher)


def _check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Check the .npy header against the manifest and the file size; returns the data offset."""
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                found_shape, fortran_order, found_dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                found_shape, fortran_order, found_dtype = npy_format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
    except FileNotFoundError as err:
        raise CacheCorruptError(f"{path} is missing") from err
    except ValueError as err:
        raise CacheCorruptError(f"{path} has no valid .npy header: {err}") from err
    if tuple(found_shape) != shape or found_dtype != dtype or fortran_order:
        raise CacheCorruptError(
            f"{path} header mismatch: holds shape {tuple(found_shape)} {found_dtype} "
            f"(fortran_order={fortran_order}), manifest says shape {shape} {dtype}"
        )
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    size = os.path.getsize(path)
    if size != expected:
        raise CacheCorruptError(
            f"{path} size mismatch: {size} bytes on disk, header and manifest need {expected}"
        )
    return offset


class FeatureCache:
    """A finished cache on disk, read as mini-batches through one file descriptor.

    Use ``FeatureCache.open(directory)``; close it (or use it as a context manager) to release
    the descriptor.
    """

    def __init__(
        self,
        directory: Path,
        manifest: CacheManifest,
        labels: torch.Tensor,
        fd: int,
        data_offset: int,
    ):
        self.directory = directory
        self.manifest = manifest
        self.labels = labels
        self._fd: int | None = fd
        self._data_offset = data_offset
        self._storage = STORAGE_DTYPES[manifest.dtype]
        self._row_bytes = int(np.prod(manifest.sample_shape)) * self._storage.itemsize
        self._features_path = directory / manifest.features_file

    @classmethod
    def open(cls, directory: Path, verify: bool = True) -> FeatureCache:
        """Open a cache; any mismatch with its manifest raises CacheCorruptError.

        The manifest, the .npy headers and the file sizes are always checked (cheap);
        ``verify=True`` also streams both files through their checksums (reads the whole file,
        in O(1) memory).
        """
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        try:
            manifest = CacheManifest.from_json(manifest_path.read_text())
        except FileNotFoundError as err:
            raise CacheCorruptError(
                f"{manifest_path} is missing: the cache was never written or writing it stopped "
                "before the end"
            ) from err
        if manifest.format_version != FORMAT_VERSION:
            raise CacheCorruptError(
                f"{manifest_path}: format version {manifest.format_version}, "
                f"this edgetrain reads version {FORMAT_VERSION}"
            )
        for name in (manifest.features_file, manifest.labels_file):
            if Path(name).name != name:
                raise CacheCorruptError(f"{manifest_path}: file name {name!r} is not a plain name")

        features_path = directory / manifest.features_file
        labels_path = directory / manifest.labels_file
        storage = STORAGE_DTYPES[manifest.dtype]
        data_offset = _check_npy(features_path, manifest.shape, storage)
        labels_offset = _check_npy(labels_path, (manifest.count,), LABEL_DTYPE)
        features_size = os.path.getsize(features_path)
        if features_size != manifest.features_bytes:
            raise CacheCorruptError(
                f"{features_path} size mismatch: {features_size} bytes on "
                f"disk, manifest says {manifest.features_bytes}"
            )

        # Labels are 8 bytes per sample: small enough to keep in memory for the whole run.
        labels = np.empty(manifest.count, dtype=LABEL_DTYPE)
        labels_fd = os.open(labels_path, os.O_RDONLY)
        try:
            _pread_into(
                labels_fd, memoryview(labels.view(np.uint8)), labels_offset, str(labels_path)
            )
        finally:
            os.close(labels_fd)

        fd = os.open(features_path, os.O_RDONLY)
        try:
            if verify:
                labels_hash = new_hasher()
                labels_hash.update(labels.view(np.uint8).data)  # already in memory: hash it there
                found = format_checksum(labels_hash)
                if found != manifest.labels_checksum:
                    raise CacheCorruptError(
                        f"{labels_path} checksum mismatch: data hashes to "
                        f"{found}, manifest says {manifest.labels_checksum}"
                    )
                found = _checksum(fd, data_offset, features_size - data_offset, str(features_path))
                if found != manifest.checksum:
                    raise CacheCorruptError(
                        f"{features_path} checksum mismatch: data hashes to "
                        f"{found}, manifest says {manifest.checksum}"
                    )
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, manifest, torch.from_numpy(labels), fd, data_offset)

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.manifest.sample_shape

    @property
    def dtype(self) -> torch.dtype:
        return CACHE_DTYPES[self.manifest.dtype]

    def batches(
        self,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        part: tuple[int, int] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the cache: ``(features [B, *sample_shape] in the cache dtype,
        labels int64 [B])``. With ``shuffle`` every sample appears exactly once, in the order
        of ``torch.randperm(n, generator=generator)``, drawn when this is called.

        ``part=(start, size)``: of every batch only its samples ``start .. start + size - 1``
        are read (a data-parallel rank's shard of the batch the whole job draws: the same
        order on every rank, each reading its own rows only); a batch too short to reach
        ``start`` gives empty tensors."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if self._fd is None:
            raise ValueError(f"{self._features_path} is closed")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        return self._iter_batches(order, batch_size, drop_last, part)

    def _iter_batches(
        self, order: torch.Tensor, batch_size: int, drop_last: bool,
        part: tuple[int, int] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(order)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            indices = order[start : start + batch_size]
            if part is not None:
                indices = indices[part[0] : part[0] + part[1]]
            yield self._read_rows(indices.numpy()), self.labels[indices]

    def _read_rows(self, indices: np.ndarray) -> torch.Tensor:
        """The rows ``indices``, in that order, as one fresh array: the only buffer of the
        batch (what the training step holds as its input; no read buffer beside it)."""
        if self._fd is None:
            raise ValueError(f"{self._features_path} was closed during a pass")
        count = len(indices)
        rows = np.empty((count, *self.sample_shape), dtype=self._storage)
        if count == 0:  # a rank's empty shard of a short last batch: nothing to read
            return torch.from_numpy(rows) if self.manifest.dtype != "bfloat16" else \
                torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
        flat = memoryview(rows.reshape(-1).view(np.uint8))
        # Read the batch's rows in file order: sorted offsets walk the file forwards (kernel
        # readahead and disks like that) and neighbouring rows merge into one read, which
        # scatters them (preadv) straight into their places in the batch, so shuffling is not
        # undone and nothing is copied twice.
        sort = np.argsort(indices, kind="stable")
        sorted_indices = indices[sort]
        # Runs of consecutive row numbers: each run is one contiguous read.
        breaks = np.flatnonzero(np.diff(sorted_indices) != 1) + 1
        starts = [0, *breaks.tolist()]
        ends = [*breaks.tolist(), count]
        rb = self._row_bytes
        for first, end in zip(starts, ends, strict=True):
            offset = self._data_offset + int(sorted_indices[first]) * rb
            targets = [flat[int(row) * rb : (int(row) + 1) * rb] for row in sort[first:end]]
            _pread_scatter(self._fd, targets, offset, str(self._features_path))
        if self.manifest.dtype == "bfloat16":
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(rows)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten close() should not leak the descriptor for the rest of a long run.
        if getattr(self, "_fd", None) is not None:
            self.close()


def cache_is_valid(directory: Path) -> bool:
    """True if ``directory`` holds a complete cache whose sizes and checksums match."""
    try:
        with FeatureCache.open(directory, verify=True):
            return True
    except CacheCorruptError:
        return False
