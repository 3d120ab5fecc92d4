"""Command-line options generated from a config dataclass: one source for every flag.

Each field of the dataclass becomes ``--field-name``, with the field's type, its default and
the docstring under it as the help. A field that is written differently on the command line
than it is stored (``--widths 16,32,64`` for a tuple, ``--memory-budget 2GB`` for a
MemorySize) names a parser in :class:`Flag`; every parser's error is collected, so that one bad
flag does not hide the others.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from edgetrain.config import field_docs
from edgetrain.errors import UserInputError


@dataclass(frozen=True)
class Flag:
    """How a field is written on the command line, where its type alone does not say."""

    names: tuple[str, ...] = ()
    """More names for the option, e.g. ("-K",)."""
    parse: Callable[[str], Any] | None = None
    """Text -> value, raising UserInputError; the option is then a string."""
    show: Callable[[Any], str] = str
    """The default as it is written on the command line."""


def _base(hint: Any) -> tuple[Any, bool]:
    """``(T, optional)`` for ``T`` or ``T | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def config_parameters(cls: type, flags: dict[str, Flag], exclude: set[str]
                      ) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``cls`` (but ``exclude``), as typer reads them."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    params = []
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        flag = flags.get(field.name, Flag())
        base, optional = _base(hints[field.name])
        default = (field.default if field.default is not dataclasses.MISSING
                   else field.default_factory())
        if flag.parse is not None:
            kind: Any = str | None if optional else str
            default = None if default is None else flag.show(default)
        elif base in (str, int, float, bool, Path):
            kind = base | None if optional else base
        else:  # an internal invariant: a field of another type needs a Flag with a parser
            raise TypeError(f"{cls.__name__}.{field.name}: give it a Flag(parse=...)")
        names = (f"--{field.name.replace('_', '-')}", *flag.names) if flag.names else ()
        option = typer.Option(*names, help=docs.get(field.name, ""))
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=Annotated[kind, option]))
    return params


def build_config(cls: type, values: dict[str, Any], flags: dict[str, Flag],
                 problems: list[str]) -> Any:
    """``cls(**values)`` with each flagged text parsed; a parser's problems are added to
    ``problems`` (the field keeps its default) instead of stopping at the first."""
    fields = {}
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        flag = flags.get(name)
        if flag is not None and flag.parse is not None and value is not None:
            try:
                value = flag.parse(value)
            except UserInputError as e:
                problems.extend(e.problems)
                continue
        if name in defaults:
            fields[name] = value
    return cls(**fields)


def with_signature(func: Callable, params: list[inspect.Parameter]) -> Callable:
    """``func`` (taking ``**kwargs`` after its own parameters) as typer should see it."""
    own = [p for p in inspect.signature(func).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    func.__signature__ = inspect.Signature([*own, *params])
    return func
