"""Atomic, verified file writes: write to a temporary name in the same folder, then rename.

A run killed mid-write leaves either the old file or the new one, never half of one; the
temporary file it leaves (``.NAME.<random>.tmp``) is removed by the next run in that folder
(ownership.py). Weights are stored as safetensors, a format that cannot run code when loaded,
with a blake2b checksum of every tensor in the file's metadata, checked when the file is read
back: a damaged module or checkpoint is found before training relies on it, not at stitching
time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgetrain.paths import shown

CHECKSUM_KEY = "edgetrain.checksum"
OUT_OF_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
# mkstemp creates files readable by their owner only; a finished file gets the permissions any
# other new file would (0o666 less the umask, read once here where no thread can race it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


class WeightsCorruptError(Exception):
    """A weights file is unreadable or does not match its checksum."""


def is_out_of_space(error: BaseException) -> bool:
    """Whether ``error`` means the disk (or the quota) is full."""
    return isinstance(error, OSError) and error.errno in OUT_OF_SPACE


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), _FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """blake2b over every tensor's name, dtype, shape and bytes, in name order."""
    hasher = hashlib.blake2b()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        hasher.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            # A byte view, no copy (bfloat16 has no numpy dtype; its bytes do).
            hasher.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return f"blake2b:{hasher.hexdigest()}"


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save a state dict as safetensors with its checksum, atomically. Tensors are written as
    contiguous CPU copies. A full disk raises OSError(ENOSPC) naming the file (safetensors
    raises its own error type for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta[CHECKSUM_KEY] = tensors_checksum(tensors)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            save_file(tensors, tmp, metadata=meta)
        except SafetensorError as e:
            if "No space left" in str(e) or "quota" in str(e).lower():
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
            raise
        with open(tmp, "rb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of ``path``; WeightsCorruptError if the file is unreadable."""
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsCorruptError(f"{shown(path)} cannot be read ({e})") from None


def load_weights(path: Path, device: str | torch.device = "cpu",
                 require_checksum: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, checked against the checksum in its metadata.

    A file without a checksum (written by an older edgetrain) is accepted unless
    ``require_checksum``. Raises WeightsCorruptError for an unreadable, truncated or altered
    file.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsCorruptError(f"{shown(path)} cannot be read ({e})") from None
    expected = meta.get(CHECKSUM_KEY)
    if expected is None:
        if require_checksum:
            raise WeightsCorruptError(f"{shown(path)} carries no checksum")
    elif tensors_checksum(tensors) != expected:
        raise WeightsCorruptError(f"{shown(path)} does not match its checksum: the file is "
                                  "damaged")
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def weights_problem(path: Path) -> str | None:
    """Why ``path`` is not an intact weights file edgetrain wrote, or None."""
    if path.is_symlink() or not path.is_file():
        return f"{shown(path)} is missing"
    try:
        load_weights(path, require_checksum=True)
    except WeightsCorruptError as e:
        return str(e)
    return None
