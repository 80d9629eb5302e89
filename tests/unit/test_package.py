"""Package surface: curated exports, no torch on the core path, strict typing (issue #2)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import types

import pytest

import zoo_agent
from tests.support import REPO


def test_exported_members() -> None:
    """As httpx does, in both directions: everything in __all__ exists and is ours, and every
    public name the package holds (other than its subpackages) is in __all__."""
    for name in zoo_agent.__all__:
        assert hasattr(zoo_agent, name), name
        assert not name.startswith("_") or name == "__version__"
    assert sorted(zoo_agent.__all__) == zoo_agent.__all__
    public = {n for n, v in vars(zoo_agent).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == set(zoo_agent.__all__) - {"__version__"}


@pytest.mark.parametrize("module", ["zoo_agent.cli", "zoo_agent.index.load", "zoo_agent.store.zoo", "zoo_agent.reconcile.apply",
                                    "zoo_agent.systemd.units", "zoo_agent.sources", "zoo_agent.library"])
def test_every_module_lists_what_it_offers(module: str) -> None:
    mod = importlib.import_module(module)
    assert all(hasattr(mod, name) for name in mod.__all__), module


def test_core_import_leaves_torch_out() -> None:
    code = (
        "import sys, zoo_agent, zoo_agent.cli, zoo_agent.index.load, zoo_agent.plan, zoo_agent.library;"
        "heavy = {'torch', 'transformers', 'peft'} & set(sys.modules); print(sorted(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.skipif(shutil.which("mypy", path=str(REPO / ".venv" / "bin")) is None and shutil.which("mypy") is None,
                    reason="mypy is not installed (pip install -e .[test])")
def test_mypy_strict() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
