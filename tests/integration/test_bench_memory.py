"""The memory benchmark (issue #34): its /metrics reader and prompts, and a short run of the script.

The short run is ``bench/memory.py`` on the tests' tiny model (transformers only, a 128-token
context): the point is that the script measures what it says (a peak per prompt length, the
prompts as long as asked, the limit of ``cgroups.limit_for``), not its figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
sys.path[:0] = [str(BENCH)]
import memory  # noqa: E402

from zoo_agent.resident.cgroups import limit_for  # noqa: E402


def test_metric_reads_one_tenant_and_kind() -> None:
    page = ('# HELP zoo:model_memory_bytes x\nzoo:model_memory_bytes{kind="device",tenant="a"} 0.0\n'
            'zoo:model_memory_bytes{kind="ram",tenant="a"} 2.5e+08\nzoo:model_memory_bytes{kind="ram",tenant="ab"} 7.0\n'
            'zoo:model_footprint_bytes{tenant="a"} 1.2e+09\nzoo:model_footprint_bytes_other{tenant="a"} 5\n')  # fmt: skip
    assert memory.metric(page, "zoo:model_memory_bytes", "a", "ram") == 250_000_000
    assert memory.metric(page, "zoo:model_memory_bytes", "ab", "ram") == 7
    assert memory.metric(page, "zoo:model_footprint_bytes", "a") == 1_200_000_000
    assert memory.metric(page, "zoo:model_memory_bytes", "b", "ram") is None


def test_status_and_peak_reset_of_this_process() -> None:
    import os

    mine = memory.status(os.getpid())
    assert mine["VmHWM"] >= mine["VmRSS"] > 0 and "RssAnon" in mine
    assert memory.reset_peak(os.getpid())
    assert memory.status(2**22 + 1) == {}  # beyond pid_max: gone reads as nothing, not an error


@pytest.mark.resident
@pytest.mark.slow
def test_the_script_measures_each_prompt_length(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the resident extra is not installed")
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(BENCH / "memory.py"), "--shape", "tiny", "--context", "128", "--backends", "transformers",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    [m] = doc["measured"]
    assert m["backend"] == "transformers" and m["idle_rss"] > m["footprint"] >= m["estimate"] > 0
    lengths = [m["lengths"][name] for name, _ in memory.LENGTHS]
    sent = [g["prompt_tokens"] for g in lengths]
    assert all(len(s) == 2 for s in sent)  # --batch 2: two requests at once
    assert max(sent[0]) < min(sent[1]) and max(sent[1]) < min(sent[2]) <= 128 - 4  # short < half < near-full, within max_context
    assert all(g["peak_rss"] > 0 and g["peak_anon"] > 0 for g in lengths)
    assert [row["peer_mb"] for row in doc["rows"]] == [limit_for(m["estimate"]) / (1 << 20)] * 3  # a first start's memory.max
    assert "held" in done.stdout and "near-full" in done.stdout
