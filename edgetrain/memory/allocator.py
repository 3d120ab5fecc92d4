"""The CPU allocation policy: where freed tensor memory goes, set in one place.

DRAFT: the chosen policy and its numbers are filled in once measured.

Every large CPU tensor is one ``posix_memalign`` call (torch's ``c10::alloc_cpu``), served by
the C library's malloc. How that malloc keeps freed blocks decides two things this project
measures: the peak resident memory (what a memory-short device must hold) and the kernel time
(fresh mappings and page faults that zero pages, each step).

A policy is applied once per process, before anything is built (:func:`apply`), by ``edgetrain
fit`` (so the planner's probes, which run inside ``fit``, see it too) and by the worker of
``edgetrain profile``. At the points where a phase's buffers die (each module, each probe, the
final evaluation: :meth:`MemoryMeter.reset`), :func:`release_to_os` hands free memory back.

``EDGETRAIN_ALLOC_POLICY=<name>`` picks another policy for a process and the subprocesses it
starts (``benchmarks/alloc_policies.py`` measures them side by side). Policies that replace
malloc itself (jemalloc, mimalloc, tcmalloc) must be loaded before the process starts:
:func:`launch_env` gives the environment for that, and the benchmark starts its runs with it.

On CUDA nothing changes: activations live in torch's CUDA caching allocator, which reuses
blocks already; the host side keeps the policy it always had (:data:`CUDA_POLICY`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

POLICY_ENV = "EDGETRAIN_ALLOC_POLICY"

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Policy:
    """One way to serve and give back CPU memory."""

    name: str
    summary: str
    mallopt: dict[int, int] = field(default_factory=dict)
    """glibc ``mallopt`` settings applied in-process (parameter number -> value)."""
    malloc: str = "glibc"
    """The malloc the policy runs on."""
    preload: str | None = None
    """Shared library (e.g. ``libjemalloc.so.2``) to ``LD_PRELOAD`` for that malloc."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment the process must start with (read once, at start, by malloc or torch)."""


POLICIES: dict[str, Policy] = {p.name: p for p in [
    Policy("mmap-128k", "glibc, every block above 128 KiB its own mmap, unmapped when freed",
           {_M_MMAP_THRESHOLD: 128 * KiB}),
    Policy("glibc-default", "glibc as it comes: dynamic mmap threshold (up to 32 MiB)"),
    Policy("mmap-4m", "glibc, fixed mmap threshold 4 MiB (smaller blocks from the heap)",
           {_M_MMAP_THRESHOLD: 4 * MiB}),
    Policy("mmap-32m", "glibc, fixed mmap threshold 32 MiB (its maximum), default trimming",
           {_M_MMAP_THRESHOLD: 32 * MiB}),
    Policy("heap-trim", "glibc heap up to 32 MiB blocks, never trimmed on free; "
           "malloc_trim where a phase's buffers die",
           {_M_MMAP_THRESHOLD: 32 * MiB, _M_TRIM_THRESHOLD: 2**31 - 1}),
    Policy("mmap-128k-thp", "mmap-128k, and torch asks for transparent huge pages on blocks "
           ">= 2 MiB (THP_MEM_ALLOC_ENABLE=1)", {_M_MMAP_THRESHOLD: 128 * KiB},
           env={"THP_MEM_ALLOC_ENABLE": "1"}),
    Policy("jemalloc", "jemalloc (Debian libjemalloc2) preloaded, default decay (10 s)",
           malloc="jemalloc", preload="libjemalloc.so.2"),
    Policy("jemalloc-decay1s", "jemalloc preloaded, dirty pages purged after 1 s",
           malloc="jemalloc", preload="libjemalloc.so.2",
           env={"MALLOC_CONF": "dirty_decay_ms:1000,muzzy_decay_ms:0"}),
    Policy("mimalloc", "mimalloc (Debian libmimalloc2.0) preloaded, defaults",
           malloc="mimalloc", preload="libmimalloc.so.2"),
    Policy("mimalloc-pypi", "mimalloc 3 from PyPI (cmeel-mimalloc) preloaded, defaults",
           malloc="mimalloc", preload="cmeel.prefix/lib/libmimalloc.so.3"),
    Policy("tcmalloc", "tcmalloc-minimal (Debian libtcmalloc-minimal4) preloaded, defaults",
           malloc="tcmalloc", preload="libtcmalloc_minimal.so.4"),
]}

DEFAULT_POLICY = "mmap-128k"
CUDA_POLICY = "mmap-128k"


@dataclass(frozen=True)
class AllocatorState:
    """What :func:`apply` did, for the run's report."""

    policy: str
    malloc: str
    """The malloc serving this process: glibc, jemalloc, mimalloc, tcmalloc or unknown."""
    in_effect: bool
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _load_libc()
_PROCESS = ctypes.CDLL(None)
_state: AllocatorState | None = None


def active_malloc() -> str:
    """Which malloc serves this process, found by the symbols only that malloc exports."""
    if hasattr(_PROCESS, "mallctl"):
        return "jemalloc"
    if hasattr(_PROCESS, "mi_collect"):
        return "mimalloc"
    if hasattr(_PROCESS, "MallocExtension_ReleaseFreeMemory"):
        return "tcmalloc"
    if _LIBC is not None and hasattr(_LIBC, "mallopt") and hasattr(_LIBC, "malloc_trim"):
        return "glibc"
    return "unknown"


def policy_name(device_type: str = "cpu") -> str:
    if device_type == "cuda":
        return CUDA_POLICY
    return os.environ.get(POLICY_ENV) or DEFAULT_POLICY


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        from edgetrain.errors import UserInputError

        raise UserInputError(f"{POLICY_ENV}={name!r} is not an allocation policy; choose one of "
                             f"{', '.join(POLICIES)}.") from None


def apply(device_type: str = "cpu") -> AllocatorState:
    """Put this process's allocation policy in place; call before anything large is built."""
    global _state
    policy = get_policy(policy_name(device_type))
    malloc = active_malloc()
    missing = [k for k, v in policy.env.items() if os.environ.get(k) != v]
    if policy.malloc != "glibc":
        ok = malloc == policy.malloc
        note = "" if ok else f"{policy.preload} is not loaded (start the process with launch_env)"
    elif malloc != "glibc":
        ok, note = False, f"malloc is {malloc}, not glibc: mallopt settings do nothing"
    else:
        ok = all(_LIBC.mallopt(param, value) for param, value in policy.mallopt.items())
        note = "" if ok else "mallopt refused a setting"
    if ok and missing:
        ok, note = False, f"{', '.join(missing)} must be set before the process starts"
    _state = AllocatorState(policy.name, malloc, ok, note)
    return _state


def state() -> AllocatorState | None:
    """What the last :func:`apply` did (None: not applied in this process)."""
    return _state


def release_to_os() -> None:
    """Hand free memory back to the OS: where a phase's buffers have died, before the next
    phase's peak is measured."""
    malloc = active_malloc()
    if malloc == "glibc":
        _LIBC.malloc_trim(0)
    elif malloc == "jemalloc":
        # arena.<MALLCTL_ARENAS_ALL>.purge: every arena's unused dirty pages back to the OS
        _PROCESS.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
    elif malloc == "mimalloc":
        _PROCESS.mi_collect(ctypes.c_bool(True))
    elif malloc == "tcmalloc":
        _PROCESS.MallocExtension_ReleaseFreeMemory()


def find_library(name: str) -> str | None:
    """Path of a shared library, or None: a ``cmeel.prefix/...`` name in the Python path (where
    pip puts a cmeel wheel's files), any other in the usual system folders."""
    folders = (sys.path if name.startswith("cmeel.prefix/") else
               ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib"])
    for folder in folders:
        path = Path(folder or ".") / name
        if path.is_file():
            return str(path.resolve())
    return None


def launch_env(name: str, base: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment a new process needs to run under policy ``name``; None if its
    allocator is not installed here."""
    policy = get_policy(name)
    env = dict(os.environ if base is None else base)
    env[POLICY_ENV] = name
    env.update(policy.env)
    if policy.preload:
        path = find_library(policy.preload)
        if path is None:
            return None
        env["LD_PRELOAD"] = " ".join(filter(None, [path, env.get("LD_PRELOAD", "")]))
    return env
