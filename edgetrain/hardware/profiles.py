"""Device profiles: what a target device offers a training run, read from small TOML files.

A profile names a device (a Jetson, a laptop GPU, a Raspberry Pi, a plain CPU), its memory and
the share of it a run may use (the budget), the cache dtype and precision that suit it, and how
to install torch there. The budget is in `--memory-budget`'s terms, what the planner enforces:
the process's peak, framework included, on CPUs and unified-memory boards (total memory minus
the OS and a margin); the CUDA allocator's peak on a discrete GPU. Each file says how its
number was chosen and how much of it is left for training once torch is loaded.
`edgetrain fit/bench --device-profile NAME` applies one with :func:`apply_profile`.

On a machine that is not the profile's device, the profile still applies: its budget is
recorded as on the device, and the run is marked ``simulated`` (see :func:`is_simulated`).

The files live in the repository's ``devices/`` folder; see :mod:`edgetrain.shipped` for where
they are looked up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from edgetrain.config import CACHE_DTYPES, FitConfig
from edgetrain.errors import UserInputError
from edgetrain.hardware.machine import MachineInfo
from edgetrain.shipped import DEVICES, read_toml
from edgetrain.units import MemorySize

KINDS = ("jetson", "laptop-gpu", "raspberry-pi", "cpu")
DEVICE_TYPES = ("cuda", "cpu")
PRECISIONS = ("float32", "float16-mixed", "bfloat16-mixed")

# A real device reports a little less memory than its DRAM size (firmware and GPU carve-outs on
# Jetson, ~0.93x on an Orin Nano 8GB) and GPUs round differently; this is wide enough for that
# and still tells a 4 GB board from an 8 GB one.
_MEMORY_MATCH = (0.8, 1.25)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    """Profile name, equal to the file name without .toml (`--device-profile NAME`)."""
    description: str
    """The device in one line: model, memory, what computes."""
    kind: str
    """jetson, laptop-gpu, raspberry-pi or cpu."""
    device: str
    """The torch device training runs on there: cuda or cpu."""
    total_memory_bytes: int
    """Physical memory: shared RAM if unified, else the GPU's own memory."""
    total_memory_text: str
    unified_memory: bool
    """True if CPU and GPU share one RAM (Jetson, and trivially CPU-only devices)."""
    memory_budget_bytes: int
    """The run's --memory-budget (FitConfig.memory_budget): the process's peak, framework
    included, on CPUs and unified memory; the CUDA allocator's peak on a discrete GPU."""
    memory_budget_text: str
    budget_reason: str
    """How the budget was derived from the total memory."""
    cache_dtype: str
    """Storage dtype of the disk cache of frozen outputs (FitConfig.cache_dtype)."""
    cache_dtype_reason: str
    precision: str
    """Preferred training precision: float32, float16-mixed or bfloat16-mixed. Informational
    until FitConfig has a precision setting."""
    match: tuple[str, ...]
    """Substrings of the machine's board/CPU/GPU names that identify the real device; empty:
    any machine is one (generic profiles)."""
    torch_install: str
    """How to install torch (and edgetrain) on the device."""
    path: Path
    """The TOML file the profile was read from."""


_TEXT_FIELDS = ("name", "description", "kind", "device", "total_memory", "memory_budget",
                "budget_reason", "cache_dtype", "cache_dtype_reason", "precision",
                "torch_install")
_FIELDS = (*_TEXT_FIELDS, "unified_memory", "match")


def list_profiles() -> list[DeviceProfile]:
    """Every profile found, sorted by name."""
    return [load_profile_file(path) for _, path in sorted(DEVICES.files().items())]


def profile_names() -> list[str]:
    return sorted(DEVICES.files())


def load_profile(name: str) -> DeviceProfile:
    """The profile called ``name``, or one read from a path ending in .toml."""
    if name.endswith(".toml"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserInputError(f"--device-profile {name}: no such file. Give a profile name "
                                 "(see `edgetrain devices`) or the path of a profile file.")
        return load_profile_file(path)
    files = DEVICES.files()
    if name not in files:
        choices = ", ".join(sorted(files)) or "(none found)"
        raise UserInputError(
            f"--device-profile {name!r} is not known; choose one of {choices} "
            f"(profiles are read from {DEVICES.where()}), or pass the path of a .toml file."
        )
    return load_profile_file(files[name])


def load_profile_file(path: Path) -> DeviceProfile:
    """Read and check one profile file; every problem is reported at once, naming the field."""
    data = read_toml(path)
    problems = []
    for key in sorted(set(data) - set(_FIELDS)):
        problems.append(f"unknown field {key!r}; profile fields are {', '.join(_FIELDS)}.")
    for key in _FIELDS:
        if key not in data:
            problems.append(f"field {key!r} is missing.")
    text = {k: data[k] for k in _TEXT_FIELDS if k in data}
    for key, value in list(text.items()):
        if not (isinstance(value, str) and value.strip()):
            problems.append(f"field {key!r} must be a non-empty string.")
            del text[key]
    if not isinstance(data.get("unified_memory", False), bool):
        problems.append("field 'unified_memory' must be true or false.")
    match = data.get("match", [])
    if not (isinstance(match, list) and all(isinstance(m, str) and m for m in match)):
        problems.append("field 'match' must be a list of strings (may be empty).")
    for key, allowed in (("kind", KINDS), ("device", DEVICE_TYPES),
                         ("cache_dtype", CACHE_DTYPES), ("precision", PRECISIONS)):
        if key in text and text[key] not in allowed:
            problems.append(f"field {key!r} is {text[key]!r}; choose one of "
                            f"{', '.join(allowed)}.")
    if "name" in text and text["name"] != path.stem:
        problems.append(f"field 'name' is {text['name']!r} but the file is {path.name}; "
                        "they must agree, since --device-profile finds a profile by file name.")
    sizes = {}
    for key in ("total_memory", "memory_budget"):
        if key in text:
            try:
                size = MemorySize.parse(text[key], flag=f"field {key!r}")
                if size.fraction is not None:  # a device has a size, not a share
                    raise UserInputError(f"field {key!r} {text[key]!r} must be a size such as "
                                         "2GB, not a share of end-to-end training's need.")
                sizes[key] = size.bytes
            except UserInputError as e:
                problems.append(str(e))
    if len(sizes) == 2 and sizes["memory_budget"] > sizes["total_memory"]:
        problems.append(f"field 'memory_budget' ({text['memory_budget']}) is larger than "
                        f"'total_memory' ({text['total_memory']}).")
    if problems:
        raise UserInputError([f"device profile {path}: {p}" for p in problems])
    return DeviceProfile(
        name=data["name"], description=_reflow(data["description"]), kind=data["kind"],
        device=data["device"], total_memory_bytes=sizes["total_memory"],
        total_memory_text=data["total_memory"], unified_memory=data["unified_memory"],
        memory_budget_bytes=sizes["memory_budget"], memory_budget_text=data["memory_budget"],
        budget_reason=_reflow(data["budget_reason"]), cache_dtype=data["cache_dtype"],
        cache_dtype_reason=_reflow(data["cache_dtype_reason"]), precision=data["precision"],
        match=tuple(match), torch_install=_reflow(data["torch_install"]), path=path,
    )


def _reflow(text: str) -> str:
    r"""Join the lines of a TOML multi-line string into paragraphs (files wrap at 100 columns,
    terminals elsewhere); indented lines (commands) stay lines of their own.

    >>> _reflow("Use\nthis:\n  pip install x\nthen run.")
    'Use this:\n  pip install x\nthen run.'
    """
    out: list[str] = []
    for line in text.strip("\n").splitlines():
        if line.startswith((" ", "\t")) or not out or out[-1].startswith((" ", "\t")):
            out.append(line.rstrip())
        else:
            out[-1] = f"{out[-1]} {line.strip()}".strip()
    return "\n".join(out).strip()


def is_simulated(profile: DeviceProfile, machine: MachineInfo) -> bool:
    """True unless this machine is the profile's device: its board/GPU name matches and its
    memory is about the profile's (a Jetson Orin Nano 4GB is not the 8GB profile)."""
    if not profile.match:
        return False
    identity = machine.identity().lower()
    if not any(m.lower() in identity for m in profile.match):
        return True
    if profile.unified_memory:
        have = machine.memory_bytes
    else:
        have = max((g.memory_bytes or 0 for g in machine.gpus), default=0)
    low, high = _MEMORY_MATCH
    return not low <= have / profile.total_memory_bytes <= high


def apply_profile(config: FitConfig, profile: DeviceProfile, explicit: set[str],
                  simulated: bool = False) -> FitConfig:
    """``config`` with the profile's memory budget, cache dtype and device, except for the
    FitConfig fields named in ``explicit`` (set by the user, who wins).

    A simulated run keeps the budget and cache dtype but not a CUDA device: it runs on whatever
    this machine has (``auto``), since forcing a Jetson's ``cuda`` onto a CPU-only machine would
    only fail. A CPU profile runs on the CPU either way.

    >>> from edgetrain.config import FitConfig
    >>> p = load_profile("jetson-nano-4gb")
    >>> c = apply_profile(FitConfig(), p, explicit={"cache_dtype"})
    >>> c.memory_budget.bytes, str(c.memory_budget), c.cache_dtype, c.device
    (3200000000, '3.2GB', 'float32', 'cuda')
    >>> apply_profile(FitConfig(), p, set(), simulated=True).device
    'auto'
    """
    changes: dict = {}
    if "memory_budget" not in explicit:
        changes["memory_budget"] = MemorySize(profile.memory_budget_bytes,
                                              profile.memory_budget_text)
    if "cache_dtype" not in explicit:
        changes["cache_dtype"] = profile.cache_dtype
    if "device" not in explicit:
        changes["device"] = "auto" if simulated and profile.device == "cuda" else profile.device
    changes["extra"] = {**config.extra, "device_profile": profile.name, "simulated": simulated}
    return dataclasses.replace(config, **changes)
