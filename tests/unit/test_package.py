"""Package surface: curated exports, no torch on the core path, strict typing (issue #2)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import zoo_agent
from tests.conftest import REPO


def test_exported_members() -> None:
    """As httpx does: everything in __all__ exists and is ours; nothing private leaks."""
    for name in zoo_agent.__all__:
        assert hasattr(zoo_agent, name), name
        assert not name.startswith("_") or name == "__version__"
    assert sorted(zoo_agent.__all__) == zoo_agent.__all__


def test_core_import_leaves_torch_out() -> None:
    code = (
        "import sys, zoo_agent, zoo_agent.cli.main, zoo_agent.index.load, zoo_agent.index.fmt;"
        "heavy = {'torch', 'transformers', 'peft'} & set(sys.modules); print(sorted(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.skipif(shutil.which("mypy", path=str(REPO / ".venv" / "bin")) is None and shutil.which("mypy") is None,
                    reason="mypy is not installed (pip install -e .[test])")
def test_mypy_strict() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
