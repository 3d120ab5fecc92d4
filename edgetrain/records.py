"""Reading back the files edgetrain wrote: every value checked, every error names the file and
the field.

A run folder outlives the process that wrote it: a disk can damage it, a user can edit it, an
older edgetrain can have written it. Whatever is read back (``config.json``, ``report.json``,
``metrics.jsonl``, ``model.json``, ``plan.json``, checkpoint metadata, a bench's
``results.jsonl``) goes through :class:`Fields`, so that garbage, a wrong type or a missing key
ends in one clear :class:`RecordError`, never in a traceback or a silently wrong result.

    fields = Fields(read_json_object(path), path)
    epochs = fields.int("epochs", low=1)
    name = fields.str("model", choices=MODELS)
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from edgetrain.errors import UserInputError
from edgetrain.paths import shown


class RecordError(UserInputError):
    """A file edgetrain wrote is damaged, edited or from an incompatible version."""


def read_text(path: Path) -> str:
    """The text of the regular file ``path``. Anything else under its name (a FIFO would block
    the read forever, a device could be endless, a folder is no record) is refused with
    RecordError before a byte is read; FileNotFoundError if there is nothing there."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RecordError(f"{shown(path)} is not a regular file, so it is not a record "
                              "edgetrain wrote. Move it away.")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = f.read()
    finally:
        if fd >= 0:
            os.close(fd)
    return data.decode()


def read_json_object(path: Path, what: str = "") -> dict:
    """The JSON object in ``path``; RecordError if it is missing, unreadable or not an object."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise RecordError(f"{shown(path)} is missing{what}.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{shown(path)} cannot be read ({e}){what}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{shown(path)} is not valid JSON ({e}){what}.") from None
    if not isinstance(data, dict):
        raise RecordError(f"{shown(path)} holds a JSON {type(data).__name__}, not an object"
                          f"{what}.")
    return data


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each line of a JSON-lines log.

    A process killed mid-append leaves at most its last line cut short: that line is skipped.
    Any other line that is not a JSON object means the file was damaged or edited: RecordError.
    """
    try:
        lines = read_text(path).splitlines()
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{shown(path)} cannot be read ({e}).") from None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                return  # the torn tail of a killed append
            raise RecordError(f"{shown(path)} line {number} is not valid JSON: the file is "
                              "damaged.") from None
        if not isinstance(record, dict):
            raise RecordError(f"{shown(path)} line {number} is not a JSON object.")
        yield number, record


_MISSING = object()


class Fields:
    """Typed, range-checked access to one JSON object read from ``source``.

    >>> f = Fields({"epochs": 3, "lr": 0.1, "name": "x"}, "config.json")
    >>> f.int("epochs", low=1), f.float("lr", low=0), f.str("name")
    (3, 0.1, 'x')
    >>> f.int("lr")
    Traceback (most recent call last):
    ...
    edgetrain.records.RecordError: config.json: field 'lr' must be an integer (found 0.1).
    """

    def __init__(self, data: Any, source: Path | str, where: str = ""):
        self.source = f"{shown(source)}{where}"
        if not isinstance(data, dict):
            raise RecordError(f"{self.source}: expected a JSON object, found "
                              f"{type(data).__name__}.")
        self.data = data

    def _fail(self, name: str, what: str, value: Any) -> RecordError:
        text = repr(value)
        text = text if len(text) <= 60 else text[:57] + "..."
        return RecordError(f"{self.source}: field {name!r} must be {what} (found {text}).")

    def _get(self, name: str, optional: bool) -> Any:
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            if optional:
                return None
            raise RecordError(f"{self.source}: field {name!r} is missing.")
        if value is None and optional:
            return None
        return value

    def int(self, name: str, low: int | None = None, high: int | None = None,
            optional: bool = False) -> int | None:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        what = "an integer" + _range(low, high)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(name, what, value)
        if (low is not None and value < low) or (high is not None and value > high):
            raise self._fail(name, what, value)
        return value

    def float(self, name: str, low: float | None = None, high: float | None = None,
              optional: bool = False, allow_inf: bool = False) -> float | None:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        what = "a number" + _range(low, high)
        if allow_inf and (value == "inf" or (isinstance(value, float) and value == math.inf)):
            return math.inf  # "inf" as edgetrain writes it in config.json, Infinity as json does
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(name, what, value)
        value = float(value)
        if not math.isfinite(value):
            raise self._fail(name, what, value)
        if (low is not None and value < low) or (high is not None and value > high):
            raise self._fail(name, what, value)
        return value

    def str(self, name: str, choices: Collection[str] | None = None,
            optional: bool = False) -> str | None:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        what = "a string" + (f" among {sorted(choices)}" if choices else "")
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self._fail(name, what, value)
        return value

    def bool(self, name: str, optional: bool = False) -> bool | None:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            raise self._fail(name, "true or false", value)
        return value

    def ints(self, name: str, low: int | None = None, high: int | None = None,
             length: int | None = None, optional: bool = False) -> list[int] | None:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        what = ("a list of integers" + _range(low, high)
                + (f" with {length} entries" if length is not None else ""))
        if not isinstance(value, list) or (length is not None and len(value) != length):
            raise self._fail(name, what, value)
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int) or \
                    (low is not None and v < low) or (high is not None and v > high):
                raise self._fail(name, what, value)
        return value

    def floats(self, name: str, low: float | None = None, high: float | None = None,
               length: int | None = None, optional: bool = False) -> list[float] | None:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        what = ("a list of numbers" + _range(low, high)
                + (f" with {length} entries" if length is not None else ""))
        if not isinstance(value, list) or (length is not None and len(value) != length):
            raise self._fail(name, what, value)
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (low is not None and v < low) or (high is not None and v > high):
                raise self._fail(name, what, value)
            out.append(float(v))
        return out

    def object(self, name: str, optional: bool = False) -> Fields | None:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise self._fail(name, "a JSON object", value)
        return Fields(value, self.source, f", field {name!r}")

    def list(self, name: str, optional: bool = False) -> list | None:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        if not isinstance(value, list):
            raise self._fail(name, "a list", value)
        return value


def _range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" between {low} and {high}"
    if low is not None:
        return f" of at least {low}"
    if high is not None:
        return f" of at most {high}"
    return ""
