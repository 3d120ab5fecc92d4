"""The CPU allocation policy: how freed tensor memory is kept and given back, set in one place.

Every large CPU tensor is one ``posix_memalign`` call (torch's ``c10::alloc_cpu``) served by the
process's malloc, and how that malloc keeps freed blocks decides two things edgetrain cares
about: the peak resident memory, which a memory-short device must hold, and the time spent in
the kernel mapping fresh pages and zeroing them on first touch, every step.

**The policy, per method and mode on the CPU: end to end and sequential mode run under
tcmalloc, preloaded by the launcher; parallel mode, and every run where tcmalloc is not
installed, under glibc with a 128 KiB mmap threshold.**

- glibc with ``M_MMAP_THRESHOLD`` = 128 KiB (``mmap-128k``): every block above 128 KiB is its
  own mapping, unmapped when freed. No freed buffer stays resident, so peaks are what training
  needs, but each step maps, faults in (zeroes) and unmaps every activation: 60% of the CPU
  time in the kernel.
- glibc's heap (its default dynamic threshold, a fixed larger one, or no trimming until a phase
  ends) reuses buffers, but large activations and torch's small long-lived objects share one
  heap: freed activations leave holes the next step cannot always reuse; peaks 17-21% higher.
- tcmalloc keeps large spans apart from small objects and reuses freed spans for the same
  shapes next step: the run's peak stays within 1-2.5% of the 128 KiB threshold's with 2-5% of
  the CPU time in the kernel, and a third of its CPU time.

Measured side by side, interleaved, medians of 3 runs of the whole process (``python
benchmarks/alloc_policies.py``: ResNet-20, 3,000 built-in images, 2 epochs, ``--threads 1``,
2-core x86 shared with other jobs, load average 2.6-5.4; peak is the process's, framework
included; every other candidate in ``benchmarks/results/alloc-policies/``):

    policy           e2e: wall  user   sys  peak       TRGL seq, K = 4: wall  user   sys  peak
    mmap-128k           56.6  17.8  26.3  717 MiB                     82.3  23.9  38.5  697 MiB
    glibc-default       17.6  15.1   2.5  867 (+21%)                  36.0  20.8   4.4  814 (+17%)
    heap-trim           23.0  15.5   0.5  866 (+21%)                  30.1  20.8   1.2  829 (+19%)
    jemalloc            20.3  14.4   5.4  730 (+1.8%)                 35.4  20.1   5.0  705 (+1.1%)
    tcmalloc            14.1  13.3   0.4  728 (+1.6%)                 29.3  19.6   1.0  707 (+1.4%)

tcmalloc is the only candidate within 3% of the 128 KiB threshold's peak with at most 10% of
its CPU time in the kernel for both methods (jemalloc's decay purges cost 20-27% kernel time;
without decay, its peaks with checkpointing and in parallel mode were 17-21% higher in the
ResNet-56 profile; Debian's mimalloc 2.0 peaked 3.2% higher end to end, PyPI's mimalloc 3.4
4-5%).

What tcmalloc costs in memory, and why parallel mode does without it: reused spans fragment
when buffers of other shapes follow. A later module's phase can then peak above what it needs,
though not above module 1's: ResNet-20 modules 707, 634, 620, 616 MiB (128 KiB threshold:
698, 622, 604, 591); ResNet-56 at batch 256 (`edgetrain fit`, 1,024 images, K = 4) 1,115,
1,116, 779, 695 against 1,089, 905, 766, 681: module 2 reaches module 1's peak, so the run's
peak is still within 2.5%, and the planner's probes, which run under the same policy, predicted
every module within 6.2%. With ``--split balanced`` (modules of equal activation memory) this
could raise the run's peak; not measured. Parallel mode alternates every module's buffers in
each step and peaked 3.1-3.9% higher under tcmalloc (ResNet-20,
``benchmarks/results/alloc-policies-parallel/``; 4.4% in the ResNet-56 profile): over the 3%
allowed, so it keeps the 128 KiB threshold and its kernel time, as do runs with activation
checkpointing (:data:`MIXED_SHAPES_POLICY`).

At the points where a phase's buffers die (each module, each planner probe, the final
evaluation: :meth:`MemoryMeter.reset`), :func:`release_to_os` hands free memory back
(``MallocExtension_ReleaseFreeMemory``, or glibc's ``malloc_trim``), so a phase starts from
what is alive, not from what earlier phases left.

With ``--memory-budget``, a run under tcmalloc is held to its budget (:func:`hold_heap_to`,
called by :meth:`MemoryMeter.reset` at every phase start): tcmalloc's heap limit is the budget
less what is resident outside the heap, so at the limit it returns free pages to the OS before
growing (fragmentation cannot carry a phase over the budget), and what still does not fit fails
instead of going over. The planner's margin is smaller there (:func:`planner.margin_bytes`).

A malloc cannot be swapped inside a running process: ``LD_PRELOAD`` must name it when the
process starts. So the ``edgetrain`` launcher (``python -m edgetrain`` and the console script)
calls :func:`relaunch` first, which re-executes the same command once with tcmalloc preloaded
when the run's policy wants it and it is installed (Debian/Ubuntu ``libtcmalloc-minimal4``; not
on PyPI). Where it is not, or where edgetrain runs inside another program, :func:`apply` falls
back to ``mmap-128k`` and the run's report says so (``report.json`` ``allocator``). ``edgetrain
fit`` (and with it the planner's probes, which run inside it) and the worker of ``edgetrain
profile`` call :func:`apply` before building anything; subprocesses start from
:func:`base_env`, so each picks the policy of its own method and mode.

On CUDA nothing changes: activations live in torch's CUDA caching allocator, which already
reuses blocks, and host memory holds little more than the dataset. A machine with an NVIDIA
device keeps glibc with the 128 KiB threshold as before (:data:`CUDA_POLICY`), unless
``EDGETRAIN_ALLOC_POLICY`` asks otherwise.

``EDGETRAIN_ALLOC_POLICY=<name>`` picks any policy of :data:`POLICIES` for a process and the
processes it starts; ``benchmarks/alloc_policies.py`` runs them side by side.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

POLICY_ENV = "EDGETRAIN_ALLOC_POLICY"
HOLD_ENV = "EDGETRAIN_HOLD_HEAP"
"""``EDGETRAIN_HOLD_HEAP=0``: a budgeted run does not hold tcmalloc's heap to its budget."""
_RELAUNCHED_ENV = "EDGETRAIN_ALLOC_RELAUNCHED"

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
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
    """Shared library to ``LD_PRELOAD`` for that malloc (a ``cmeel.prefix/`` path is looked
    up in the Python path, where pip installs it; any other in the system's library folders)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment the process must start with (read once, at start, by malloc or torch)."""
    install: str = ""
    """How to install that malloc."""


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
           malloc="jemalloc", preload="libjemalloc.so.2",
           install="apt-get install libjemalloc2"),
    Policy("jemalloc-decay1s", "jemalloc preloaded, dirty pages purged after 1 s",
           malloc="jemalloc", preload="libjemalloc.so.2",
           env={"MALLOC_CONF": "dirty_decay_ms:1000,muzzy_decay_ms:0"},
           install="apt-get install libjemalloc2"),
    Policy("jemalloc-nodecay", "jemalloc preloaded, no time-based purging: free pages are "
           "kept for reuse until a phase ends", malloc="jemalloc", preload="libjemalloc.so.2",
           env={"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
           install="apt-get install libjemalloc2"),
    Policy("mimalloc", "mimalloc 2.0 (Debian libmimalloc2.0) preloaded, defaults",
           malloc="mimalloc", preload="libmimalloc.so.2",
           install="apt-get install libmimalloc2.0"),
    Policy("mimalloc-pypi", "mimalloc 3.4 from PyPI (cmeel-mimalloc) preloaded, defaults",
           malloc="mimalloc", preload="cmeel.prefix/lib/libmimalloc.so.3",
           install="pip install cmeel-mimalloc"),
    Policy("tcmalloc-release10", "tcmalloc preloaded, returning free pages 10x faster "
           "(TCMALLOC_RELEASE_RATE=10)", malloc="tcmalloc", preload="libtcmalloc_minimal.so.4",
           env={"TCMALLOC_RELEASE_RATE": "10"}, install="apt-get install libtcmalloc-minimal4"),
    Policy("tcmalloc", "tcmalloc (Debian libtcmalloc-minimal4) preloaded, defaults",
           malloc="tcmalloc", preload="libtcmalloc_minimal.so.4",
           install="apt-get install libtcmalloc-minimal4"),
]}

DEFAULT_POLICY = "tcmalloc"
"""End to end and sequential mode on the CPU (see the module docstring)."""
MIXED_SHAPES_POLICY = "mmap-128k"
"""Parallel mode and activation checkpointing: within each step, buffers of many shapes are
freed and allocated in turn (every module's activations; a block's recompute inside backward),
and tcmalloc's reused spans fragment. Its peak was 3.1-3.9% above the 128 KiB threshold's in
parallel mode (ResNet-20 fit, ``benchmarks/results/alloc-policies-parallel/``; 4.4% in the
ResNet-56 profile) and 2.7-4.2% with checkpointing (ResNet-56 profile, two runs): over the 3%
allowed. Peak memory is why that threshold exists, so these runs keep it and its kernel time.
(Checkpointing that the planner turns on by itself comes too late for this choice: such a run
stays under the malloc it started with.)"""
FALLBACK_POLICY = "mmap-128k"
"""Where the chosen malloc is not in the process: peaks as low, at the price in kernel time."""
CUDA_POLICY = "mmap-128k"
"""On CUDA the host keeps what it always had (see the module docstring)."""


@dataclass(frozen=True)
class AllocatorState:
    """What :func:`apply` did, for the run's report."""

    requested: str
    policy: str
    """The policy in effect: ``requested``, or a fallback (``note`` says why)."""
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


def _load_process():
    try:
        return ctypes.CDLL(None)  # every symbol the process has loaded
    except (OSError, TypeError):  # Windows
        return None


_LIBC = _load_libc()
_PROCESS = _load_process()


def active_malloc() -> str:
    """Which malloc serves this process, told by the symbols only that malloc exports."""
    if _PROCESS is None:
        return "unknown"
    if hasattr(_PROCESS, "MallocExtension_ReleaseFreeMemory"):
        return "tcmalloc"
    if hasattr(_PROCESS, "mallctl"):
        return "jemalloc"
    if hasattr(_PROCESS, "mi_collect"):
        return "mimalloc"
    if _LIBC is not None and hasattr(_LIBC, "mallopt") and hasattr(_LIBC, "malloc_trim"):
        return "glibc"
    return "unknown"


def policy_name(mode: str | None = None, device_type: str = "cpu",
                checkpointing: bool = False, budgeted: bool = False) -> str:
    """The policy for a run: ``EDGETRAIN_ALLOC_POLICY`` if set, else by device, mode (None: end
    to end), activation checkpointing and ``budgeted`` (a one-process ``fit`` with a memory
    budget, whose heap is held to it: :func:`hold_heap_to`). A held heap cannot fragment past
    the budget, and the budget is what the peak has to respect: such runs take the default
    policy in every mode."""
    if os.environ.get(POLICY_ENV):
        return os.environ[POLICY_ENV]
    if device_type == "cuda":
        return CUDA_POLICY
    if budgeted and get_policy(DEFAULT_POLICY).malloc == "tcmalloc":
        return DEFAULT_POLICY
    return MIXED_SHAPES_POLICY if mode == "parallel" or checkpointing else DEFAULT_POLICY


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        from edgetrain.errors import UserInputError

        raise UserInputError(f"{POLICY_ENV}={name!r} is not an allocation policy; choose one of "
                             f"{', '.join(POLICIES)}.") from None


def apply(device_type: str = "cpu", mode: str | None = None,
          checkpointing: bool = False, budgeted: bool = False) -> AllocatorState:
    """Put the policy for this run (:func:`policy_name`) in place; call before anything large
    is built. A policy whose malloc is not in the process (not installed, or not preloaded)
    falls back to :data:`FALLBACK_POLICY`."""
    requested = name = policy_name(mode, device_type, checkpointing, budgeted)
    policy, malloc, note = get_policy(name), active_malloc(), ""
    if policy.malloc != malloc and malloc == "glibc":
        why = (f"is not installed ({policy.install})" if find_library(policy.preload) is None else
               "was not preloaded when the process started (edgetrain's launcher does that)")
        note = f"{policy.malloc} {why}"
        name, policy = FALLBACK_POLICY, get_policy(FALLBACK_POLICY)
    if policy.malloc != malloc:
        return AllocatorState(requested, name, malloc, False,
                              f"this process's malloc is {malloc}, not {policy.malloc}")
    missing = [k for k, v in policy.env.items() if os.environ.get(k) != v]
    if missing:
        return AllocatorState(requested, name, malloc, False,
                              f"{', '.join(missing)} must be set when the process starts")
    if not all(_LIBC.mallopt(param, value) for param, value in policy.mallopt.items()):
        return AllocatorState(requested, name, malloc, False, "glibc's mallopt refused")
    return AllocatorState(requested, name, malloc, True, note)


def release_to_os() -> None:
    """Hand free memory back to the OS: where a phase's buffers have died, before the next
    phase's peak is measured."""
    malloc = active_malloc()
    if malloc == "glibc":
        _LIBC.malloc_trim(0)
    elif malloc == "tcmalloc":
        _PROCESS.MallocExtension_ReleaseFreeMemory()
    elif malloc == "jemalloc":
        # arena.<MALLCTL_ARENAS_ALL>.purge: every arena's unused dirty pages back to the OS
        _PROCESS.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
    elif malloc == "mimalloc":
        _PROCESS.mi_collect(ctypes.c_bool(True))


def _tcmalloc_property(name: str) -> int | None:
    value = ctypes.c_size_t(0)
    if not _PROCESS.MallocExtension_GetNumericProperty(name.encode(), ctypes.byref(value)):
        return None
    return value.value


def heap_taken_bytes() -> int | None:
    """Bytes tcmalloc holds from the OS for its heap (reserved minus given back), or None when
    tcmalloc does not serve this process."""
    if active_malloc() != "tcmalloc":
        return None
    size = _tcmalloc_property("generic.heap_size")
    unmapped = _tcmalloc_property("tcmalloc.pageheap_unmapped_bytes")
    return None if size is None or unmapped is None else size - unmapped


def can_hold_heap() -> bool:
    """Whether :func:`hold_heap_to` can hold this process: tcmalloc serves it, and
    ``EDGETRAIN_HOLD_HEAP`` is not ``0``."""
    return os.environ.get(HOLD_ENV, "1") != "0" and heap_taken_bytes() is not None


def hold_heap_to(budget_bytes: int | None, resident_bytes: int) -> int | None:
    """Under tcmalloc, keep the process's resident set within ``budget_bytes`` as far as the
    heap decides it: tcmalloc's heap limit is set to the budget minus what is resident outside
    the heap now (``resident_bytes`` minus the heap: libraries, Python's arenas, mapped files;
    the disk cache is read with positioned reads, not mapped).
    At that limit tcmalloc gives free pages back to the OS before it grows (so fragmentation
    can no longer carry a phase over its budget), and an allocation it still cannot fit fails
    (torch raises "can't allocate memory"), where without the limit the process would have
    gone over the budget. Call at each phase start, after freed memory was released: what is
    resident outside the heap changes between phases. ``None`` lifts the limit. Returns the
    limit set, in bytes, or None (no limit: no budget, or not tcmalloc)."""
    taken = heap_taken_bytes()
    if taken is None:
        return None
    if budget_bytes is None:  # lift: back to the limit the process had (0: none)
        if _LIMIT_BEFORE:
            _set_heap_limit_mib(_LIMIT_BEFORE.pop())
        return None
    if not _LIMIT_BEFORE:
        _LIMIT_BEFORE.append(_tcmalloc_property(_HEAP_LIMIT) or 0)
    outside = max(0, resident_bytes - taken)
    # The limit is in whole MiB and 0 means none: at least 1 MiB, rounded down.
    limit_mib = max(1, (budget_bytes - outside) // MiB)
    _set_heap_limit_mib(limit_mib)
    return limit_mib * MiB


_HEAP_LIMIT = "tcmalloc.heap_limit_mb"
_LIMIT_BEFORE: list[int] = []
"""The heap limit the process had before the first hold (a user's ``TCMALLOC_HEAP_LIMIT_MB``),
restored when the hold is lifted."""


def _set_heap_limit_mib(mib: int) -> None:
    _PROCESS.MallocExtension_SetNumericProperty(_HEAP_LIMIT.encode(), ctypes.c_size_t(mib))


def find_library(name: str | None) -> str | None:
    """Path of a shared library, or None: a ``cmeel.prefix/...`` name in the Python path (where
    pip puts a cmeel wheel's files), any other in the usual system folders."""
    if name is None:
        return None
    folders = (sys.path if name.startswith("cmeel.prefix/") else
               ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib"])
    for folder in folders:
        path = Path(folder or ".") / name
        if path.is_file():
            return str(path.resolve())
    return None


def base_env() -> dict[str, str]:
    """This process's environment as it was before :func:`relaunch` preloaded a malloc: what an
    edgetrain subprocess starts from, so that the policy of its own run is chosen for it."""
    env = dict(os.environ)
    if _RELAUNCHED_ENV in env:
        added = json.loads(env.pop(_RELAUNCHED_ENV))
        for key in added["keys"]:
            env.pop(key, None)
        if added["ld_preload"]:
            env["LD_PRELOAD"] = added["ld_preload"]
        else:
            env.pop("LD_PRELOAD", None)
    return env


def _preload_env(name: str, env: dict[str, str]) -> dict[str, str] | None:
    """``env`` with what policy ``name`` needs at process start (its malloc preloaded, its
    variables); None if that malloc is not installed here."""
    policy = get_policy(name)
    path = find_library(policy.preload) if policy.preload else None
    if policy.preload and path is None:
        return None
    record = {"ld_preload": env.get("LD_PRELOAD"), "keys": list(policy.env)}
    env = {**env, **policy.env}
    if path:
        env["LD_PRELOAD"] = " ".join(filter(None, [path, env.get("LD_PRELOAD", "")]))
    env[_RELAUNCHED_ENV] = json.dumps(record)
    return env


def launch_env(name: str) -> dict[str, str] | None:
    """The environment a new process needs to run under policy ``name``, asked for by name
    (``EDGETRAIN_ALLOC_POLICY``); None if its malloc is not installed here."""
    return _preload_env(name, {**base_env(), POLICY_ENV: name})


def _nvidia_device_present() -> bool:
    """An NVIDIA GPU (or Jetson) is visible, told without importing torch."""
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0",
                                          "/dev/nvhost-ctrl-gpu"))


def _wants_preload(name: str) -> bool:
    policy = get_policy(name)
    return (policy.malloc != "glibc" and active_malloc() != policy.malloc
            and (POLICY_ENV in os.environ or not _nvidia_device_present()))


def child_env(mode: str | None = None, device_type: str = "cpu",
              checkpointing: bool = False) -> dict[str, str]:
    """Environment for an edgetrain subprocess that trains with ``mode`` (the profile worker):
    started under the policy `edgetrain fit` would run under, its malloc preloaded."""
    env, name = base_env(), policy_name(mode, device_type, checkpointing)
    if get_policy(name).malloc == "glibc" or (POLICY_ENV not in env
                                               and _nvidia_device_present()):
        return env
    return _preload_env(name, env) or env


def _budgeted_fit(argv: list[str]) -> bool:
    """Whether a command line is a one-process ``fit`` with a memory budget (its own, or a
    device profile's); a rank of a distributed job is not held (:func:`policy_name`)."""
    flags = [a.split("=", 1)[0] for a in argv]
    return ("fit" in argv and "--distributed" not in flags
            and ("--memory-budget" in flags or "--device-profile" in flags))


def _mode_in(argv: list[str]) -> str | None:
    """The value of ``--mode`` on a command line, if any."""
    for i, arg in enumerate(argv):
        if arg == "--mode" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--mode="):
            return arg.split("=", 1)[1]
    return None


def relaunch() -> None:
    """Re-execute this command once with its policy's malloc preloaded, if it needs one that
    is installed but not loaded. Called by the launcher before torch is imported (a re-exec
    then costs milliseconds); returns only when there is nothing to do."""
    name = policy_name(_mode_in(sys.argv[1:]), "cpu",
                       "--activation-checkpointing" in sys.argv[1:], _budgeted_fit(sys.argv[1:]))
    if (name not in POLICIES or not _wants_preload(name)
            or _RELAUNCHED_ENV in os.environ):  # preloaded once already: it did not take
        return
    env = _preload_env(name, dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
