"""Measure peak memory per phase, and say what was measured.

Backends:

* ``cuda``: the caching allocator's peak (``torch.cuda.max_memory_allocated``, reset per
  phase) and its reserved memory. Kernels' workspaces outside the allocator (cuDNN, cuBLAS
  handles) are not in it.
* ``linux-vmhwm``: the process's peak resident set (VmHWM in /proc/self/status), reset per
  phase by writing ``5`` to /proc/self/clear_refs. Exact, no sampling. Used on the CPU and on
  unified-memory devices (Jetson), where the GPU allocates from the same RAM.
* ``psutil-sampling``: elsewhere, a thread samples the resident set every ``interval_s``; a
  spike shorter than the interval can be missed.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from edgetrain.memory import allocator

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _read_status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def _vmhwm_resettable() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _read_status_kib("VmHWM") is not None


def release_free_memory(device: torch.device | None = None) -> None:
    """Give freed memory back before a phase starts, so its peak is its own.

    Python objects are collected, CUDA's cache is emptied, and the C allocator is asked to
    return its free pages to the OS (glibc's ``malloc_trim``, or the preloaded allocator's
    purge: see edgetrain/memory/allocator.py): without it, memory a previous phase freed stays
    in the process's resident set and hides the next phase's real growth.
    """
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    allocator.release_to_os()


@contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """For the block's duration, what exists now (imported modules, the loaded data) is out
    of the cyclic garbage collector's sight (``gc.freeze``), so the ``gc.collect()`` before
    every phase walks only what was made since: measured on this project's 2-core x86, 0.29 s
    a call over the ~190,000 objects torch and edgetrain import, against microseconds, and a
    sequential run makes two calls per module. Nothing garbage is frozen (collected first);
    frozen objects are still freed by their reference counts; on exit they are handed back to
    the collector (``gc.unfreeze``), so a program calling the library keeps its own
    collection."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass(frozen=True)
class PeakReading:
    """Peak of the phase. On CUDA also the allocator's reserved bytes and what the whole device
    has in use (``mem_get_info``: the CUDA context and other processes, which the allocator
    does not see)."""

    peak_bytes: int
    backend: str
    reserved_bytes: int | None = None
    device_used_bytes: int | None = None


class MemoryMeter:
    """Peak memory of the phase since the last :meth:`reset`.

    >>> meter = MemoryMeter(torch.device("cpu"))
    >>> meter.reset()
    >>> meter.read().peak_bytes > 0
    True
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_peak = 0
        self.budget_bytes: int | None = None
        """Set once the run is planned (``--memory-budget``): every phase then starts with the
        CPU allocator held to it (:func:`allocator.hold_heap_to`)."""
        self.heap_limit_bytes: int | None = None
        if device.type == "cuda" and not torch.cuda.get_device_properties(device).is_integrated:
            self.backend = "cuda"
        elif _vmhwm_resettable():
            self.backend = "linux-vmhwm"
        else:
            self.backend = "psutil-sampling"

    @property
    def description(self) -> str:
        return {
            "cuda": "CUDA caching allocator peak (torch.cuda.max_memory_allocated), per phase",
            "linux-vmhwm": "process peak resident set (VmHWM), reset per phase via clear_refs",
            "psutil-sampling": f"process resident set sampled every {self.interval_s * 1e3:g} ms",
        }[self.backend]

    def reset(self, release: bool = True) -> None:
        """Start a new phase; by default first release memory earlier phases freed."""
        if release:
            release_free_memory(self.device)
        if self.budget_bytes is not None and self.device.type == "cpu":
            # What is resident outside the heap changes from phase to phase (Python's arenas,
            # torch's kernel caches): the heap's share of the budget is set anew.
            self.heap_limit_bytes = allocator.hold_heap_to(self.budget_bytes,
                                                           current_rss_bytes())
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.backend == "linux-vmhwm":
            _CLEAR_REFS.write_text("5")
        else:
            self._stop_sampler()
            self._sampled_peak = current_rss_bytes()
            self._stop.clear()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def read(self) -> PeakReading:
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            return PeakReading(torch.cuda.max_memory_allocated(self.device), self.backend,
                               torch.cuda.max_memory_reserved(self.device), total - free)
        if self.backend == "linux-vmhwm":
            return PeakReading(_read_status_kib("VmHWM") or current_rss_bytes(), self.backend)
        return PeakReading(max(self._sampled_peak, current_rss_bytes()), self.backend)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sampled_peak = max(self._sampled_peak, current_rss_bytes())

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
