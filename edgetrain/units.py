"""Human-readable values: memory sizes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edgetrain.errors import UserInputError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*%\s*$")


@dataclass(frozen=True, eq=False)
class MemorySize:
    """A number of bytes. Decimal units are powers of 10 (GB = 10^9), binary ones powers of 2
    (GiB = 2^30), as the SI and IEC define them.

    Or a share of what end-to-end training of the same network at the same batch needs
    (``50%``): ``fraction`` is set and ``bytes`` is 0 until `fit` has probed end-to-end training
    and resolved it (:meth:`resolved`). Two relative sizes are equal if their fractions are.

    >>> MemorySize.parse("2GB").bytes
    2000000000
    >>> MemorySize.parse("1.5GiB").bytes
    1610612736
    >>> MemorySize.parse("512MB").bytes
    512000000
    >>> MemorySize.parse("2000000000").bytes
    2000000000
    >>> str(MemorySize(1610612736))
    '1.50 GiB'
    >>> str(MemorySize.parse("2GB")), MemorySize.parse("2GB") == MemorySize.parse("2000MB")
    ('2GB', True)
    >>> half = MemorySize.parse("50%")
    >>> half.fraction, half.bytes, half == half.resolved(123), half == MemorySize.parse("25%")
    (0.5, 0, True, False)
    """

    bytes: int
    text: str | None = field(default=None)
    """As the user wrote it ("2GB"), for messages and files; equality is by bytes."""
    fraction: float | None = None
    """A share of end-to-end training's need (0.5 for ``50%``), or None for a fixed size."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemorySize):
            return NotImplemented
        if self.fraction is not None or other.fraction is not None:
            return self.fraction == other.fraction
        return self.bytes == other.bytes

    def __hash__(self) -> int:
        return hash(("fraction", self.fraction) if self.fraction is not None else self.bytes)

    def resolved(self, size: int) -> MemorySize:
        """This relative size, now known to be ``size`` bytes (its text and fraction kept)."""
        return MemorySize(size, self.text, self.fraction)

    @classmethod
    def parse(cls, text: str, flag: str = "--memory-budget") -> MemorySize:
        percent = _PERCENT.match(str(text))
        if percent is not None:
            fraction = float(percent.group(1)) / 100
            if not 0 < fraction <= 10:
                raise UserInputError(f"{flag} {text!r}: a share of end-to-end training's need "
                                     "must be above 0% and at most 1000%, e.g. 50%.")
            return cls(0, str(text).strip(), fraction)
        match = _PATTERN.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise UserInputError(
                f"{flag} {text!r} is not a memory size. Write a number with an optional unit: "
                "B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2), "
                "e.g. 2GB, 1.5GiB, 512MB or 2000000000; or a share of what end-to-end training "
                "needs, e.g. 50%."
            )
        value = int(float(match.group(1)) * _UNITS[unit])
        if value <= 0:
            raise UserInputError(f"{flag} {text!r} must be at least one byte, e.g. 2GB or "
                                 "512MB.")
        return cls(value, str(text).strip())

    def __str__(self) -> str:
        return self.text or format_bytes(self.bytes)


def format_bytes(n: float) -> str:
    """Bytes in binary units, for tables and messages.

    >>> format_bytes(2_000_000_000)
    '1.86 GiB'
    >>> format_bytes(300 * 2**20)
    '300.0 MiB'
    """
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
