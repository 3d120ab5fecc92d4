"""Benchmark presets and the grid of runs they expand into.

A preset is a TOML file (``benchmarks/presets/NAME.toml``)::

    name = "smoke"
    description = "..."
    estimate = "about a minute on 2 CPU cores"

    [fit]                      # FitConfig fields shared by every run
    dataset = "fashion-mnist-mini"
    epochs = 1

    [method_fit.e2e]           # fields for one method only (the e2e baseline's own lr, ...)
    lr = 0.1

    [[grid]]                   # one or more blocks; each expands to a product
    methods = ["e2e", "vanilla", "trgl"]
    modules = [1, 2]           # K: only for the greedy methods (vanilla, trgl)
    modes = ["sequential"]     # only for the greedy methods; e2e trains the whole network
    caches = ["disk"]          # only for sequential mode; parallel mode caches nothing
    fit = { batch_size = 64 }  # optional: fields for this block only (wins over the above)
    vary = { seed = [0, 1, 2], tau = [0.5, 2.0] }   # optional: a product over these fields
    tag = "authors"            # optional: a word in the block's run labels (for --only)

``vary`` multiplies the block's runs by every combination of the listed FitConfig values
(seeds, tau, data sizes, ...). The penalty's fields (``tau``, ``tau_schedule``) vary TRGL runs
only: they mean nothing to vanilla greedy or end-to-end training, which run once per
combination of the other fields.

The end-to-end methods (``e2e``, and ``e2e-ckpt``: with activation checkpointing) run once per
block. Runs are identified by their settings, so a run listed by two blocks runs once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from edgetrain.config import CACHE_MODES, MODES, FitConfig
from edgetrain.errors import UserInputError
from edgetrain.paths import path_problem
from edgetrain.shipped import PRESETS, read_toml
from edgetrain.units import MemorySize

# Grid method name -> the FitConfig fields that select it.
METHODS: dict[str, dict] = {
    "e2e": {"method": "e2e"},
    "e2e-ckpt": {"method": "e2e", "activation_checkpointing": True},
    "vanilla": {"method": "vanilla"},
    "trgl": {"method": "trgl"},
}
GREEDY = ("vanilla", "trgl")

# Fields the grid itself sets (a preset's [fit] may not), and fields the bench owns.
_GRID_FIELDS = {"method", "modules", "mode", "cache", "activation_checkpointing"}
_BENCH_FIELDS = {"out", "overwrite", "extra", "eval_every_epoch"}
_PRESET_KEYS = {"name", "description", "estimate", "fit", "method_fit", "grid"}
_BLOCK_KEYS = {"methods", "modules", "modes", "caches", "fit", "vary", "tag"}
_PENALTY_FIELDS = ("tau", "tau_schedule")
"""Fields that only TRGL's runs vary over (see expand)."""


@dataclass(frozen=True)
class GridBlock:
    methods: tuple[str, ...]
    modules: tuple[int, ...]
    modes: tuple[str, ...]
    caches: tuple[str, ...]
    fit: dict
    """FitConfig fields for this block's runs only."""
    vary: dict = dataclasses.field(default_factory=dict)
    """FitConfig field -> the values the block's runs take, in every combination."""
    tag: str | None = None
    """A word in the block's run labels, so that --only can select the block."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    estimate: str
    """How long it takes, and where that was measured."""
    fit: dict
    """FitConfig fields shared by all runs."""
    method_fit: dict
    """Grid method name -> FitConfig fields for that method."""
    grid: tuple[GridBlock, ...]
    path: Path


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: what the table shows and the FitConfig fields it sets."""

    method: str
    """Grid method name: e2e, e2e-ckpt, vanilla or trgl."""
    modules: int | None
    """K; None for end-to-end methods."""
    mode: str | None
    """sequential or parallel; None for end-to-end methods."""
    cache: str | None
    """disk or none in sequential mode; None otherwise."""
    fit: dict
    """FitConfig fields the run sets (everything else keeps FitConfig's default)."""
    varied: tuple[str, ...] = ()
    """The fields its grid block varies: named in the label."""
    tag: str | None = None
    """Its grid block's tag: in the label."""

    @property
    def label(self) -> str:
        parts = [self.fit.get("dataset", FitConfig.dataset), *([self.tag] if self.tag else []),
                 self.method]
        if self.modules is not None:
            parts += [f"K{self.modules}", {"sequential": "seq", "parallel": "par"}[self.mode]]
        if self.cache is not None:
            parts.append({"disk": "disk", "none": "nocache"}[self.cache])
        parts += [f"{f.replace('_', '')}{self.fit[f]}" for f in self.varied if f in self.fit]
        return "-".join(parts)

    def run_id(self, settings: dict) -> str:
        """The label plus a digest of the run's resolved settings (``run_settings``): a run is
        only skipped as finished if it ran with the same settings. Editing a preset, changing
        --device-profile, or an edgetrain whose default changed (a preset that leaves tau out
        meant tau 1 before 2026-11-30) reruns it; the label is only a name."""
        text = json.dumps(settings, sort_keys=True)
        return f"{self.label}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


NOT_SETTINGS = frozenset({"out", "overwrite", "resume", "allow_changes", "download"})
"""FitConfig fields that say where a run is written and how it starts, not what it computes:
left out of its id, so that `bench run` can give every run its own --out and --overwrite."""


def run_settings(config: FitConfig) -> dict:
    """Every setting a run computes with, defaults filled in, as JSON values.

    A bench run passes `edgetrain fit` only the flags its preset sets; the rest are the defaults
    of the edgetrain that runs it. Its id digests these resolved settings, not the flags, so a
    finished run is never taken for a current one after a default moved under it. The cost: an
    edgetrain that adds a setting reruns every finished run once (it cannot know that the runs
    before the setting existed computed what its default computes)."""
    return {k: v for k, v in config.to_dict().items() if k not in NOT_SETTINGS}


def preset_names() -> list[str]:
    return sorted(PRESETS.files())


def load_preset(name_or_path: str) -> Preset:
    """A shipped preset by name, or a preset file by path."""
    if problem := path_problem("--preset", name_or_path):
        raise UserInputError(problem)
    path = Path(name_or_path).expanduser()
    if not (name_or_path.endswith(".toml") or path.is_file()):
        files = PRESETS.files()
        if name_or_path not in files:
            raise UserInputError(
                f"--preset {name_or_path!r} is not known; choose one of "
                f"{', '.join(sorted(files)) or '(none found)'} (read from {PRESETS.where()}), "
                "or pass the path of a preset .toml file."
            )
        path = files[name_or_path]
    elif not path.is_file():
        raise UserInputError(f"--preset {name_or_path}: no such file.")
    return parse_preset(read_toml(path), path)


def parse_preset(data: dict, path: Path) -> Preset:
    """Check a preset's structure and values; every problem is reported at once."""
    problems: list[str] = []
    for key in sorted(set(data) - _PRESET_KEYS):
        problems.append(f"unknown key {key!r}; a preset has {', '.join(sorted(_PRESET_KEYS))}.")
    for key in ("name", "description", "estimate"):
        if not isinstance(data.get(key), str):
            problems.append(f"{key!r} must be a string.")
    fit = _check_fit(data.get("fit", {}), "[fit]", problems)
    method_fit = {}
    for method, table in data.get("method_fit", {}).items():
        if method not in METHODS:
            problems.append(f"[method_fit.{method}]: {method!r} is not a grid method; choose "
                            f"one of {', '.join(METHODS)}.")
        method_fit[method] = _check_fit(table, f"[method_fit.{method}]", problems)
    blocks = data.get("grid", [])
    if not blocks:
        problems.append("no [[grid]] block: add at least one (methods, modules, modes, caches).")
    grid = tuple(_parse_block(b, i, problems) for i, b in enumerate(blocks))
    if problems:
        raise UserInputError([f"preset {path}: {p}" for p in problems])
    return Preset(name=data["name"], description=data["description"].strip(),
                  estimate=data["estimate"].strip(), fit=fit, method_fit=method_fit,
                  grid=grid, path=path)


def _parse_block(block: dict, index: int, problems: list[str]) -> GridBlock:
    where = f"[[grid]] block {index + 1}"
    for key in sorted(set(block) - _BLOCK_KEYS):
        problems.append(f"{where}: unknown key {key!r}; a block has "
                        f"{', '.join(sorted(_BLOCK_KEYS))}.")

    def values(key: str, allowed: tuple, default: tuple) -> tuple:
        raw = block.get(key, list(default))
        if not isinstance(raw, list) or not raw:
            problems.append(f"{where}: {key!r} must be a non-empty list.")
            return ()
        for v in raw:
            if allowed and v not in allowed:
                problems.append(f"{where}: {key} has {v!r}; choose from {', '.join(allowed)}.")
        return tuple(raw)

    methods = values("methods", tuple(METHODS), ())
    modules = values("modules", (), (4,))
    for k in modules:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            problems.append(f"{where}: modules has {k!r}; K must be a whole number >= 1.")
    modes = values("modes", MODES, ("sequential",))
    caches = values("caches", CACHE_MODES, ("disk",))
    fit = _check_fit(block.get("fit", {}), f"{where} fit", problems)
    vary: dict = {}
    raw_vary = block.get("vary", {})
    if not isinstance(raw_vary, dict):
        problems.append(f"{where}: 'vary' must be a table of field = [values].")
        raw_vary = {}
    for key, options in raw_vary.items():
        if not isinstance(options, list) or not options:
            problems.append(f"{where} vary: {key} must be a non-empty list of values.")
            continue
        checked = [_check_fit({key: v}, f"{where} vary", problems).get(key) for v in options]
        vary[key] = [v for v in checked if v is not None]
    tag = block.get("tag")
    if tag is not None and (not isinstance(tag, str) or not tag.replace("_", "").isalnum()):
        problems.append(f"{where}: 'tag' must be one word of letters and digits.")
        tag = None
    return GridBlock(methods, modules, modes, caches, fit, vary, tag)


def _check_fit(table: dict, where: str, problems: list[str]) -> dict:
    """Check FitConfig fields by name and type. Values are checked by FitConfig.validate()."""
    if not isinstance(table, dict):
        problems.append(f"{where} must be a table of FitConfig fields.")
        return {}
    kinds = {f.name: str(f.type) for f in dataclasses.fields(FitConfig)}
    fit = {}
    for key, value in table.items():
        if key in _GRID_FIELDS:
            problems.append(f"{where}: {key!r} is set by the grid (methods, modules, modes, "
                            "caches); remove it here.")
        elif key in _BENCH_FIELDS or key not in kinds:
            settable = sorted(set(kinds) - _GRID_FIELDS - _BENCH_FIELDS)
            problems.append(f"{where}: {key!r} is not a field a preset can set; choose from "
                            f"{', '.join(settable)}.")
        elif key == "memory_budget":
            try:
                MemorySize.parse(str(value), flag=f"{where}: memory_budget")
                fit[key] = str(value)  # turned into bytes + text by to_fit_config
            except UserInputError as e:
                problems.append(str(e))
        elif not _type_ok(kinds[key], value):
            problems.append(f"{where}: {key} = {value!r} has the wrong type (FitConfig.{key} "
                            f"is {kinds[key]}).")
        else:
            fit[key] = value
    return fit


def _type_ok(annotation: str, value: object) -> bool:
    # FitConfig's annotations are strings (postponed evaluation); its field types are few.
    if annotation.startswith("tuple"):
        return isinstance(value, list) and all(isinstance(v, int) for v in value)
    if annotation.startswith("bool"):
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if annotation.startswith("int"):
        return isinstance(value, int)
    if annotation.startswith("float"):
        return isinstance(value, (int, float))
    return isinstance(value, str)  # str and Path fields


def expand(preset: Preset) -> list[RunSpec]:
    """Every run of the preset, in order, without duplicates.

    K applies to the greedy methods only, and the cache to sequential mode only: an end-to-end
    run trains the whole network at once, and parallel mode has no frozen module to cache.
    """
    runs: list[RunSpec] = []
    seen: set[str] = set()
    for block in preset.grid:
        for method in block.methods:
            if method in GREEDY:
                combos = [(k, mode, cache) for k in block.modules for mode in block.modes
                          for cache in (block.caches if mode == "sequential" else (None,))]
            else:
                combos = [(None, None, None)]
            vary = {f: v for f, v in block.vary.items()
                    if method == "trgl" or f not in _PENALTY_FIELDS}
            for k, mode, cache in combos:
                for values in itertools.product(*vary.values()):
                    fit = {**preset.fit, **preset.method_fit.get(method, {}), **block.fit,
                           **dict(zip(vary, values)), **METHODS[method]}
                    if method != "trgl":
                        for f in _PENALTY_FIELDS:
                            fit.pop(f, None)
                    if k is not None:
                        fit.update(modules=k, mode=mode)
                        if cache is not None:
                            fit["cache"] = cache
                    else:
                        # One module: the whole network, without a split to report.
                        fit["modules"] = 1
                    run = RunSpec(method, k, mode, cache, fit, tuple(vary), block.tag)
                    key = json.dumps(fit, sort_keys=True)
                    if key not in seen:
                        seen.add(key)
                        runs.append(run)
    return runs


def to_fit_config(fit: dict) -> FitConfig:
    """A FitConfig from a run's fields (``memory_budget`` given as text, e.g. "2GB")."""
    fields = dict(fit)
    if "widths" in fields:
        fields["widths"] = tuple(fields["widths"])
    if "data_dir" in fields:
        fields["data_dir"] = Path(fields["data_dir"])
    if "memory_budget" in fields:
        fields["memory_budget"] = MemorySize.parse(fields["memory_budget"])
    return FitConfig(**fields)


def explicit_fields(fit: dict) -> set[str]:
    """The FitConfig fields a run sets itself: a device profile does not override them."""
    return set(fit)


def fit_args(config: FitConfig, fields: set[str]) -> list[str]:
    """`edgetrain fit` flags that reproduce ``fields`` of ``config`` (the others keep their
    defaults). Flags are field names with dashes, as the fit command declares them."""
    args: list[str] = []
    for name in sorted(fields):
        value = getattr(config, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            args += [flag, ",".join(str(v) for v in value)]
        elif value is not None:
            args += [flag, str(value)]  # a MemorySize as written: "2GB"
    return args
