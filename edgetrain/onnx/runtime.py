"""Which ONNX Runtime build is installed, checked in one place.

onnxruntime-training (last release 1.19.2) has wheels for CPython <= 3.11 on x86_64 Linux only;
elsewhere edgetrain installs plain onnxruntime, which runs exported graphs but cannot train. Both
packages own the same ``onnxruntime/`` folder, so which one is present is only known by trying
the import.
"""

from __future__ import annotations

import logging
import platform
import sys
from types import SimpleNamespace

from edgetrain.errors import UserInputError


def training_api(what: str) -> SimpleNamespace:
    """The ONNX Runtime training modules, as ``.artifacts`` (artifact generation) and
    ``.CheckpointState`` / ``.Module`` / ``.Optimizer`` (the on-device training API).

    ``what`` names the command or flag that needs them, for the error message: where
    onnxruntime-training cannot be imported this raises a :class:`UserInputError` saying why
    and what to do instead.
    """
    # Importing onnxruntime.training imports torch.utils.cpp_extension, which logs "No CUDA
    # runtime is found" on every CPU-only machine: noise in front of every message after it.
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_log.level
    cpp_extension_log.setLevel(logging.ERROR)
    try:
        from onnxruntime.training import artifacts
        from onnxruntime.training.api import CheckpointState, Module, Optimizer
    except ImportError as e:
        raise UserInputError(
            f"{what} needs onnxruntime-training, which cannot be imported here ({e}). Its last "
            "release (1.19.2) has wheels for Python <= 3.11 on x86_64 Linux only, so on "
            f"Python {sys.version_info.major}.{sys.version_info.minor} / {platform.machine()} "
            f"{platform.system()} edgetrain installs plain onnxruntime, which runs exported "
            "models (`edgetrain export` works) but cannot train them. Train with --backend "
            "torch, or use Python 3.11 on x86_64 Linux with `pip install "
            "onnxruntime-training-cpu==1.19.2` (uninstall onnxruntime first: both packages own "
            "the onnxruntime/ folder)."
        ) from None
    finally:
        cpp_extension_log.setLevel(level)
    return SimpleNamespace(artifacts=artifacts, CheckpointState=CheckpointState, Module=Module,
                           Optimizer=Optimizer)
