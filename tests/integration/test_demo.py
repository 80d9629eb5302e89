"""The quick start's first command, `zoo-agent demo`, on a copy of the repository's index (issue #12)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident

REPO = Path(__file__).resolve().parents[2]


def test_demo_builds_what_the_index_pins_applies_serves_answers_and_stops(tmp_path: Path) -> None:
    shutil.copy(REPO / "index.json", tmp_path / "index.json")
    proc = subprocess.run([sys.executable, "-m", "zoo_agent", "demo", "--listen", "127.0.0.1:0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    # The build reproduced the index's sha256 pins byte for byte (else demo stops, naming the files).
    assert "    built demo, demo-terse" in out
    assert "apply: 6 steps done; the zoo at zoo matches the index for host demo" in out
    assert "serving: demo-chat (demo@1), demo-chat:demo-terse (demo-terse@1), demo-long (demo@1)" in out
    assert "answer (demo@1, random tiny weights, so not much sense): " in out
    # The index's route: the short question to demo-chat by its rule, the long one to the default, demo-long (loaded by it).
    assert "==> asked assistant (a route): Which host serves this?\n    answered by demo-chat (rule words<=8): " in out
    assert "how one index keeps a fleet of hosts in sync\n    answered by demo-long (rule default): " in out
    assert "  model demo                     declared 1            current 1" in out
    assert re.search(r'Status: "2 tenants: demo-chat demo@1 \(idle \d+s(, [\d.]+ tok/s)?, adapters demo-terse@1(, mem [\d.]+ [kMGT]?B, est\. [\d.]+ [kMGT]?B)?\), '
                     r'demo-long demo@1 \([^)]*\); 3 requests', out), out
    assert "==> stopped the resident cleanly (exit 0)" in out
    again = subprocess.run([sys.executable, "-m", "zoo_agent", "demo", "--listen", "127.0.0.1:0"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert "    already built" in again.stdout and "apply: nothing to do; the zoo at zoo matches the index for host demo" in again.stdout
