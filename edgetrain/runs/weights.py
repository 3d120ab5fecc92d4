"""Weights on disk: safetensors files with a checksum, written atomically, verified on read.

safetensors cannot run code when loaded. Every file edgetrain writes carries a blake2b of every
tensor (name, dtype, shape, bytes) in its metadata, checked when the file is read back: a
damaged module or checkpoint is found before training relies on it, not at stitching time.
Files written in a run folder also carry the run's id (its marker's), so that a module or a
checkpoint copied in from another run, intact as it is, is never taken for this run's.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgetrain.paths import shown
from edgetrain.runs.files import FILE_MODE

CHECKSUM_KEY = "edgetrain.checksum"
RUN_ID_KEY = "edgetrain.run_id"


class WeightsCorruptError(Exception):
    """A weights file is unreadable or does not match its checksum."""


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
            os.fchmod(f.fileno(), FILE_MODE)
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


def shapes_problem(path: Path, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why the tensors in ``path`` are not exactly ``expected`` (name: shape), or None. Only
    the file's header is read: this is checked before a network of that size is built, so a
    description that lies about the sizes cannot make edgetrain allocate without bound."""
    try:
        with safe_open(str(path), "pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        return f"{shown(path)} cannot be read ({e})"
    wrong = sorted(k for k in expected.keys() | got.keys() if got.get(k) != expected.get(k))
    if wrong:
        return (f"{shown(path)} does not hold the network its run describes ({wrong[0]}: "
                f"{got.get(wrong[0], 'missing')} in the file, {expected.get(wrong[0], 'none')} "
                "expected)")
    return None


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


def weights_problem(path: Path, run_id: str | None = None,
                    shapes: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """Why ``path`` is not an intact weights file edgetrain wrote, or None. With ``run_id``,
    it must have been written by that run; with ``shapes``, it must hold exactly those
    tensors (name: shape), as the run's configuration builds them."""
    if path.is_symlink() or not path.is_file():
        return f"{shown(path)} is missing"
    try:
        load_weights(path, require_checksum=True)
        found = read_metadata(path).get(RUN_ID_KEY)
    except WeightsCorruptError as e:
        return str(e)
    if run_id is not None and found != run_id:
        return (f"{shown(path)} was written by another run (run id {found or 'none'}; this "
                f"run's is {run_id})")
    if shapes is not None:
        return shapes_problem(path, shapes)
    return None
