"""Data files shipped beside the code: device profiles and benchmark presets.

Their source of truth is a folder at the top of the repository (``devices/``,
``benchmarks/presets/``), where people read and edit them. They are looked up, first match
wins, in:

1. the folder named by an environment variable (``$EDGETRAIN_DEVICES_DIR``, ...), so users can
   add their own files or override a shipped one by name;
2. the repository folder beside the package: a source checkout or an editable install
   (``pip install -e .``, what the README uses);
3. a copy inside the package (``edgetrain/_devices/``, ...), present in wheels built with the
   ``package-dir`` mapping in pyproject.toml.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from edgetrain.errors import UserInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (pyproject: tomli; python_version < '3.11')
    import tomli as tomllib

_PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ShippedFiles:
    """One kind of shipped TOML file and where to look for it."""

    env_var: str
    """Environment variable naming an extra folder, searched first."""
    repo_dir: str
    """The folder in the repository, relative to its root."""
    package_dir: str
    """The copy inside the installed package, relative to ``edgetrain/``."""

    def folders(self) -> list[Path]:
        """Existing folders to search, in order."""
        candidates = []
        if os.environ.get(self.env_var):
            candidates.append(Path(os.environ[self.env_var]).expanduser())
        # The repository folder only in a source tree: an installed package's parent is
        # site-packages, whose `devices/` (if any) belongs to someone else.
        if (_PACKAGE.parent / "pyproject.toml").is_file():
            candidates.append(_PACKAGE.parent / self.repo_dir)
        candidates.append(_PACKAGE / self.package_dir)
        return [c for c in candidates if c.is_dir()]

    def files(self) -> dict[str, Path]:
        """Name (file stem) to path, the first folder that has a name winning."""
        found: dict[str, Path] = {}
        for folder in self.folders():
            for path in sorted(folder.glob("*.toml")):
                found.setdefault(path.stem, path)
        return found

    def where(self) -> str:
        """The folders searched, for error messages."""
        folders = self.folders()
        searched = ", ".join(str(f) for f in folders) if folders else "no folder found"
        return f"{searched}; set ${self.env_var} to add a folder"


DEVICES = ShippedFiles("EDGETRAIN_DEVICES_DIR", "devices", "_devices")
PRESETS = ShippedFiles("EDGETRAIN_PRESETS_DIR", "benchmarks/presets", "_presets")


def read_toml(path: Path) -> dict:
    """Parse a TOML file; a syntax error becomes a UserInputError naming the file and line."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UserInputError(f"{path} cannot be read ({e.strerror}).") from None
    except tomllib.TOMLDecodeError as e:
        raise UserInputError(f"{path} is not valid TOML: {e}. Fix the file.") from None
