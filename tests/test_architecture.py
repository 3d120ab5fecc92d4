"""The shape of the code, checked: the package layout README's *Architecture* describes holds,
imports included that sit inside functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "edgetrain"


def _unit(module: str) -> str:
    """A module's architectural unit: its subpackage (edgetrain.training), or the top-level
    module itself (edgetrain.config)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _imports() -> dict[str, list[tuple[str, str, int, list[str]]]]:
    """Every module's edgetrain imports: (imported module, file, line, names)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        rows = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.startswith("edgetrain"):
                rows.append((node.module, str(path), node.lineno, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                rows += [(a.name, str(path), node.lineno, []) for a in node.names
                         if a.name.startswith("edgetrain")]
        found[module] = rows
    return found


def _unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, rows in _imports().items():
        for target, *_ in rows:
            if _unit(target) != _unit(module) and _unit(target) != "edgetrain":
                graph.setdefault(_unit(module), set()).add(_unit(target))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_packages():
    assert _cycles(_unit_graph()) == []


def test_layers():
    """models builds networks and knows nothing of training; training never reaches for a
    backend (the ONNX Runtime one is passed in) nor for the profiler; memory measures and
    plans, it does not train; only the CLI and the launcher import the CLI."""
    graph = _unit_graph()
    allowed_for_models = {"edgetrain.errors", "edgetrain.models"}
    assert graph.get("edgetrain.models", set()) <= allowed_for_models
    assert not graph.get("edgetrain.training", set()) & {"edgetrain.onnx", "edgetrain.profiler",
                                                        "edgetrain.cli", "edgetrain.bench"}
    assert not graph.get("edgetrain.memory", set()) & {"edgetrain.training", "edgetrain.onnx",
                                                      "edgetrain.profiler", "edgetrain.cli"}
    users_of_cli = {unit for unit, targets in graph.items() if "edgetrain.cli" in targets}
    assert users_of_cli <= {"edgetrain.__main__"}


def test_no_private_names_cross_modules():
    """A name with a leading underscore is private to its module: another module that imports
    it depends on what its owner may change at will."""
    crossings = [f"{file}:{line} imports {target}.{name}"
                 for module, rows in _imports().items()
                 for target, file, line, names in rows for name in names
                 if name.startswith("_") and target != module]
    assert crossings == []


def test_one_phase():
    """A training phase (build, optimiser, step) is written once, training/phase.py: nothing
    else calls the step functions or builds optimisers, except the distributed stages, whose
    replicas average gradients between backward and the optimiser step (their own SGD)."""
    step_parts = {"greedy_step", "end_to_end_step", "make_optimizer"}
    users = sorted({module for module, rows in _imports().items()
                    for target, _, _, names in rows
                    if target == "edgetrain.training.steps" and step_parts & set(names)})
    assert [u for u in users if not u.startswith("edgetrain.distributed.")] == [
        "edgetrain.training.phase"]
