"""The test suite's own layout (issue #32): a newcomer can move a test module without breaking another.

Fixtures live in a ``conftest.py`` and are used by name; helpers and harnesses live in
``tests/support`` and are imported from there. So no test module imports from another test
module or from a ``conftest.py``. And every module that runs the resident (starts it or a
worker, or serves a model with torch in-process) carries the ``resident`` marker, so
``pytest -m "not resident and not e2e"`` is the fast core suite; no other module carries it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support import REPO

TESTS = REPO / "tests"
MODULES = sorted(p for p in TESTS.rglob("test_*.py") if p != Path(__file__))  # this one names the patterns it looks for

# What running the resident looks like in a test module's source: the resident harness, the
# in-process backends and their helpers, the CLI's `resident` and `demo` as processes, the tiny model.
RUNS_THE_RESIDENT = re.compile(
    r"tests\.support\.(resident|lora|sessions)\b"
    r'|spawn\("resident"|"zoo_agent", "(resident|demo)"'
    r"|build_tiny_model|TransformersBackend"
)
# The shared fixtures (tests/integration/conftest.py) that build or serve the tiny models.
MODEL_FIXTURES = {"tiny", "model_dir", "app", "built"}


def _imported_modules(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def _is_test_module_or_conftest(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return module.startswith("tests.") and (last.startswith("test_") or last == "conftest")


def runs_the_resident(path: Path) -> bool:
    text = path.read_text()
    if RUNS_THE_RESIDENT.search(text):
        return True
    functions = (n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    return any({a.arg for a in f.args.args} & MODEL_FIXTURES for f in functions)


def carries_the_marker(path: Path) -> bool:
    """``pytestmark`` at module level names ``pytest.mark.resident`` (alone or in a list)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return any(isinstance(n, ast.Attribute) and n.attr == "resident" for n in ast.walk(node.value))
    return False


def test_nothing_is_imported_from_a_test_module_or_a_conftest() -> None:
    wrong = {}
    for path in [*MODULES, *TESTS.rglob("conftest.py"), *(TESTS / "support").glob("*.py")]:
        if found := [m for m in _imported_modules(ast.parse(path.read_text())) if _is_test_module_or_conftest(m)]:
            wrong[str(path.relative_to(REPO))] = found
    assert wrong == {}, "move each helper to tests/support, each fixture to a conftest.py (used by name)"


def test_a_module_carries_the_resident_marker_exactly_when_it_runs_the_resident() -> None:
    unmarked = [str(p.relative_to(REPO)) for p in MODULES if runs_the_resident(p) and not carries_the_marker(p)]
    marked = [str(p.relative_to(REPO)) for p in MODULES if carries_the_marker(p) and not runs_the_resident(p)]
    assert unmarked == [], "these run the resident: add `pytestmark = pytest.mark.resident`"
    assert marked == [], "these carry the resident marker but run no resident: drop it"


def test_the_marker_is_registered_and_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    assert "resident:" in (REPO / "pyproject.toml").read_text()
    runs = tmp_path / "test_runs.py"
    runs.write_text("from tests.support.resident import Resident\n")
    assert runs_the_resident(runs) and not carries_the_marker(runs)
    runs.write_text("import pytest\npytestmark = [pytest.mark.slow, pytest.mark.resident]\ndef test_x(tiny): pass\n")
    assert runs_the_resident(runs) and carries_the_marker(runs)
    plain = tmp_path / "test_plain.py"
    plain.write_text("def test_x(world): pass\n")
    assert not runs_the_resident(plain) and not carries_the_marker(plain)
    assert _is_test_module_or_conftest("tests.integration.test_resident") and _is_test_module_or_conftest("tests.conftest")
    assert not _is_test_module_or_conftest("tests.support.resident")


def test_no_two_test_modules_share_a_name() -> None:
    """pytest tells them apart by package, a newcomer by name: `-k`, tracebacks and `git log` do not."""
    names: dict[str, list[str]] = {}
    for path in MODULES:
        names.setdefault(path.name, []).append(str(path.relative_to(TESTS)))
    assert {n: where for n, where in names.items() if len(where) > 1} == {}
