"""The soak benchmark (issue #36): its growth rule on literal series, and a 2-minute run in CI.

The 2-minute run is the CI version of ``bench/soak.py --minutes 60``: a multi-tenant resident
under a changing mix with a reload, where the point is zero failed requests, no crash and
no runaway growth (tolerances x4, ``--generous``: two minutes on a busy 2-core machine say
nothing about a trend). It goes through the resident's public surfaces only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path[:0] = [str(BENCH)]
import soak  # noqa: E402

MB = 1 << 20


def series(router_rss: list[float], workers: int = 2) -> list[dict[str, Any]]:
    flat = {"router_fds": 16, "router_threads": 2, "worker_rss": 200 * MB, "worker_fds": 20, "worker_threads": 8,
            "tree_rss": 500 * MB, "processes": 3, "workers": workers, "health": 200}  # fmt: skip
    return [{**flat, "t_s": 60.0 * i, "router_rss": v} for i, v in enumerate(router_rss)]


def test_flat_series_pass_and_a_leak_fails() -> None:
    flat = soak.growth(series([0, 50 * MB, 51 * MB, 50 * MB, 52 * MB, 51 * MB, 50 * MB]), warmup=60)
    assert all(g["judged"] and g["ok"] for g in flat.values())
    leak = soak.growth(series([0, 50 * MB, 60 * MB, 70 * MB, 80 * MB, 90 * MB, 100 * MB]), warmup=60)
    assert not leak["router_rss"]["ok"]
    assert leak["router_rss"]["per_hour"] == pytest.approx(600 * MB)  # 10 MB a minute
    assert soak.verdict([], leak, failed=0, crashed=0) == [f"router_rss grew: {55 * MB} -> {95 * MB} (limit {leak['router_rss']['limit']:.0f})"]


def test_warmup_is_left_out_and_generous_widens() -> None:
    # the warm-up sample (t=0) is far below: counted, it would read as growth
    assert soak.growth(series([1 * MB, 50 * MB, 50 * MB, 50 * MB]), warmup=60)["router_rss"]["ok"]
    assert not soak.growth(series([1 * MB, 50 * MB, 50 * MB, 50 * MB]), warmup=0)["router_rss"]["ok"]
    grown = series([0, 50 * MB, 50 * MB, 50 * MB, 100 * MB, 100 * MB, 100 * MB])
    assert not soak.growth(grown, warmup=60)["router_rss"]["ok"]
    assert soak.growth(grown, warmup=60, scale=soak.GENEROUS)["router_rss"]["ok"]


def test_too_few_samples_are_not_judged_and_failures_fail() -> None:
    assert not soak.growth(series([50 * MB, 50 * MB]), warmup=0)["router_rss"]["judged"]
    assert soak.verdict(series([50 * MB]), {}, failed=2, crashed=1) == ["2 failed request(s)", "1 worker restart(s) (zoo:worker_restarts_total)"]
    assert soak.verdict([{**series([50 * MB])[0], "health": 503}], {}, failed=0, crashed=0) == ["/health answered 503 at 0 s"]


def test_metric_sum_reads_every_label_set() -> None:
    page = 'zoo:router_requests_waiting{tenant="a",priority="normal"} 2.0\nzoo:router_requests_waiting{tenant="b",priority="normal"} 1.0\n' \
           'zoo:router_requests_waiting_other 7\n# HELP zoo:router_requests_waiting x\nzoo:router_requests_inflight{tenant="a"} 3.0\n'  # fmt: skip
    assert soak.metric_sum(page, "zoo:router_requests_waiting") == 3.0
    assert soak.metric_sum(page, "zoo:router_requests_inflight") == 3.0
    assert soak.metric_max(page, "zoo:router_requests_waiting") == 2.0
    assert soak.metric_max(page, "zoo:model_footprint_bytes") == 0.0


def test_log_exceptions_names_each_traceback() -> None:
    log = ("zoo-agent: worker 1: serving a (m@v1)\nException in callback Future.set_result(None)\nTraceback (most recent call last):\n"
           '  File "x.py", line 1, in f\n    g()\nasyncio.exceptions.InvalidStateError: invalid state\nzoo-agent: reload\n')  # fmt: skip
    assert soak.log_exceptions(log) == ["Exception in callback Future.set_result(None) -> asyncio.exceptions.InvalidStateError: invalid state"]
    assert soak.log_exceptions("zoo-agent: worker 1: serving a (m@v1)\n") == []


@pytest.mark.slow
def test_two_minute_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(BENCH / "soak.py"), "--minutes", "2", "--interval", "10", "--warmup", "30",
                          "--reload-minutes", "0.75", "--clients", "2", "--generous", "--json", str(out), "--plot", str(tmp_path / "soak.png")],
                         capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert out.is_file(), run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert run.returncode == 0, f"{result['why']}; errors: {result['errors'][:5]}; {run.stderr[-2000:]}"
    assert not result["failed"] and not result["errors"]
    assert result["reloads"] and all(r["ok"] for r in result["reloads"])
    kinds = {k.split(":")[0] for k in result["requests"]}
    assert {"complete", "stream", "cancel"} <= kinds, kinds  # the first minute, mostly loads, may not draw every kind
    assert len(result["samples"]) >= 10 and all(s["health"] == 200 for s in result["samples"])
