"""What machine is this? CPU, board, memory, GPUs and torch version, for benchmark records and
for telling a real device-profile run from a simulated one.

Nothing here imports torch: on a unified-memory board (Jetson) a CUDA context in the benchmark
driver would take memory from the runs it measures, and `edgetrain devices` stays instant.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int | None
    """Total memory as nvidia-smi reports it; None where it does not (Jetson)."""


@dataclass(frozen=True)
class MachineInfo:
    cpu: str
    """CPU model name (/proc/cpuinfo), or the architecture where there is none."""
    board: str | None
    """Board model from the device tree (Jetson, Raspberry Pi); None on PCs."""
    memory_bytes: int
    """Host memory (RAM) the kernel reports."""
    gpus: tuple[Gpu, ...]
    """NVIDIA GPUs nvidia-smi lists (none if it is not installed)."""
    platform: str
    python: str
    torch: str | None
    """Installed torch version (read from package metadata, torch is not imported)."""

    def identity(self) -> str:
        """Board, CPU and GPU names in one string, for matching device profiles."""
        return " | ".join([self.board or "", self.cpu, *(g.name for g in self.gpus)])

    def to_dict(self) -> dict:
        return asdict(self)


def detect_machine() -> MachineInfo:
    return MachineInfo(
        cpu=_cpu_name(),
        board=_board_model(),
        memory_bytes=psutil.virtual_memory().total,
        gpus=_nvidia_gpus(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=_installed_version("torch"),
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    # ARM kernels list no model name; the architecture is the honest fallback.
    return platform.processor() or platform.machine()


def _board_model() -> str | None:
    try:
        return Path("/proc/device-tree/model").read_text().strip("\x00\n ") or None
    except OSError:
        return None


def _nvidia_gpus() -> tuple[Gpu, ...]:
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.strip().splitlines():
        name, _, memory = line.rpartition(",")
        mib = memory.strip()
        gpus.append(Gpu(name.strip(), int(mib) * 2**20 if mib.isdigit() else None))
    return tuple(gpus)


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
