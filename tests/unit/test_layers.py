"""The package's own imports read along the data flow, with no circle (issue #32).

Every import counts, wherever it is written (inside a function, under ``TYPE_CHECKING``): an
import hidden there is still a dependency, and a circle hidden there was the resident's
``supervisor`` <-> ``router`` <-> ``reports``. ``from pkg import submodule`` is an edge to the
submodule; ``from pkg.mod import name`` an edge to ``pkg.mod``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import zoo_agent

ROOT = Path(zoo_agent.__file__).parent

#: The flow, bottom first: a module may import its own layer's and the layers below, never above.
#: ``systemd`` (notify, units, install) sits below ``reconcile``: an on-demand fetch and apply's
#: progress tell systemd how far they are (``reconcile/progress.py``), and nothing in ``systemd``
#: needs a plan or a zoo's state.
FLOW: list[set[str]] = [
    {"errors", "jsonbound", "keyfile", "formats", "_version"},
    {"index"},
    {"plan"},
    {"sources"},
    {"store"},
    {"pin"},
    {"systemd"},
    {"reconcile"},
    {"resident"},
    {"library", "registry", "demo"},
    {"cli", "__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known}
            found |= subs
            if module in known and len(subs) < len(node.names):  # a name defined in the module itself
                found.add(module)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _layer(module: str) -> int | None:
    """The module's place in ``FLOW``; None for the package's face (``zoo_agent/__init__.py``), above all."""
    top = module.split(".")[1] if "." in module else None
    if top is None:
        return None
    return next(i for i, names in enumerate(FLOW) if top in names)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_top_level_module_has_a_place_in_the_flow() -> None:
    tops = {name.split(".")[1] for name in _modules() if "." in name}
    assert tops <= set().union(*FLOW), tops - set().union(*FLOW)


def test_the_package_has_no_import_circle() -> None:
    assert _circles(_graph()) == []


def test_no_module_imports_one_above_it_in_the_flow() -> None:
    up = []
    for module, imported in _graph().items():
        mine = _layer(module)
        for other in imported:
            theirs = _layer(other)
            if mine is not None and theirs is not None and theirs > mine:
                up.append(f"{module} -> {other}")
    assert sorted(up) == []


def test_the_check_sees_a_circle_hidden_under_type_checking() -> None:
    """The resident's circle was written under ``TYPE_CHECKING`` and inside a function: both count."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from zoo_agent.resident.supervisor import Supervisor\ndef f():\n    from zoo_agent import plan\n"
    path = ROOT.parent / "probe.py"
    known = {"zoo_agent.resident.supervisor": path, "zoo_agent.plan": path, "zoo_agent": path}
    tree_path = Path(__file__).parent / "_layers_probe.txt"
    try:
        tree_path.write_text(source, encoding="utf-8")
        assert _imports("zoo_agent.resident.reports", tree_path, known) == {"zoo_agent.resident.supervisor", "zoo_agent.plan"}
    finally:
        tree_path.unlink()
