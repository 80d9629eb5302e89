"""Delegation overhead (issue #22): time to first token through a peer hop vs at the peer directly.

    sudo .venv/bin/python bench/delegation.py [--requests 100] [--json bench/delegation.json]

About 20 s on 2 cores (100 requests). Needs root: three network namespaces on a private bridge
(tests/support/netns.py, addresses only inside them): a client, host ``a`` (which does not serve
tenant ``t``) and host ``b`` (which serves ``t`` and accepts it from peers). The tests' tiny
model, one index, each host's own zoo root and resident, the fleet key between them.

Each iteration sends the same streamed chat request (4 tokens, ``ignore_eos``) from the
client's namespace to ``b`` directly (the reference: client → b, one link) and to ``a``,
which delegates it to ``b`` (client → a → b: the router's hop, a poll-verified peer, the
fleet key, a second link), in alternating order. Time to first token is to the first data
event with text (bench/routing.py's ``request``); total is to the end of the stream. p50 and
p90 of both; the goal is the p50 difference. Bounded by a count and a deadline; every
process is killed and every namespace deleted on the way out, also after a failure.
Without root (or ``ip netns``) it says why and writes no rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import REQUEST_TIMEOUT, seconds, table  # noqa: E402
from routing import request  # noqa: E402

from tests.support.netns import Network, network, unavailable, wait_until  # noqa: E402
from tests.support.resident import Resident  # noqa: E402

TARGETS = {"direct": "at the peer directly (client → b)", "hop": "through a peer hop (client → a → b)"}
GOAL_MS = 3.0
GEN = {"generation": {"temperature": 0, "max_tokens": 4}, "resources": {"max_batch": 4, "max_queue": 8}, "pinned": True}


def build(work: Path, net: Network) -> Path:
    """The tiny model, the index (a serves o, b serves t for peers) and each host's `apply`."""
    from zoo_agent.demo.tiny import build_tiny_model

    src = build_tiny_model(work / "src" / "m")
    files = [{"path": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size} for p in sorted(src.iterdir())]
    model = {"version": "1", "source": {"type": "file", "path": str(src)}, "license": "MIT", "files": files}
    hosts = {"a": {"resident": "o", "endpoint": net.hosts["a"].url}, "b": {"resident": "t", "endpoint": net.hosts["b"].url, "accept_from_peers": ["t"]}}
    index = work / "index.json"
    index.write_text(json.dumps({"models": {"m": model}, "tenants": {"o": {"model": "m", **GEN}, "t": {"model": "m", **GEN}}, "hosts": hosts}))
    for hid in hosts:
        done = net.run(hid, sys.executable, "-m", "zoo_agent", "apply", "--root", work / hid, "--index", index, "--host", hid)
        if done.returncode != 0:
            raise RuntimeError(f"{hid}: apply exited {done.returncode}: {done.stderr}")
    return index


def measure(net: Network, requests: int) -> dict[str, dict[str, list[float]]]:
    """From inside the client's namespace: warm both paths, then alternate them."""
    import httpx

    urls = {"direct": net.hosts["b"].url, "hop": net.hosts["a"].url}
    samples: dict[str, dict[str, list[float]]] = {t: {"ttft": [], "total": []} for t in TARGETS}

    def run() -> None:
        with httpx.Client(headers={"Authorization": "Bearer client-secret"}) as http:
            answer = http.post(urls["hop"] + "/v1/chat/completions", json={"model": "t", "messages": [{"role": "user", "content": "Hi"}],
                                                                           "max_tokens": 1}, timeout=REQUEST_TIMEOUT)  # fmt: skip
            if answer.raise_for_status().json().get("x_zoo", {}).get("host") != "b":
                raise RuntimeError(f"a did not delegate to b: {answer.text}")
            for _ in range(10):
                for t in TARGETS:
                    request(http, urls[t], "t")
            deadline = time.monotonic() + 600
            for i in range(requests):
                if time.monotonic() > deadline:
                    break
                for t in (("direct", "hop") if i % 2 == 0 else ("hop", "direct")):
                    ttft, total = request(http, urls[t], "t")
                    samples[t]["ttft"].append(ttft)
                    samples[t]["total"].append(total)

    net.call("client", run, timeout=700)
    return samples


def _p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1]


def rows_of(samples: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    n, rows = len(samples["hop"]["ttft"]), []
    for what, key in (("time to first token", "ttft"), ("total latency", "total")):
        for q, f in (("p50", statistics.median), ("p90", _p90)):
            ours, peer = f(samples["hop"][key]), f(samples["direct"][key])
            goal = f"≤ {GOAL_MS:g} ms more (here {1000 * (ours - peer):+.2f} ms)" if (key, q) == ("ttft", "p50") else f"- (here {1000 * (ours - peer):+.2f} ms)"
            rows.append({"name": f"{what}, {q} ({n} each): {TARGETS['hop']}", "ours_s": ours, "peer": TARGETS["direct"], "peer_s": peer,
                         "ratio": ours / peer, "goal": goal})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--requests", type=int, default=100, help="iterations; each sends the request once on each path")
    args = parser.parse_args()
    why = unavailable()
    if why:
        print(f"delegation: skipped: {why}", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "skipped": why, "rows": []}, indent=2) + "\n")
        return
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-delegation-"))
    started = time.monotonic()
    try:
        with network(work) as net:
            for hid in ("client", "a", "b"):
                net.add(hid)
            index = build(work, net)
            for name, text in (("client", "client-secret"), ("fleet", "fleet-secret")):
                (work / name).write_text(text + "\n")
            residents = [Resident.on_host(net, hid, work / hid, index, "--api-key-file", work / "client", "--fleet-key-file", work / "fleet")
                         for hid in ("a", "b")]  # fmt: skip
            try:
                for r in residents:
                    r.wait_ready(timeout=300)
                wait_until("a verified b", lambda: _peer_ok(net), 30)
                samples = measure(net, args.requests)
            finally:
                for r in residents:
                    r.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = rows_of(samples)
    print(table(rows))
    print(f"({seconds(time.monotonic() - started)} in all, {os.cpu_count()} CPUs)")
    if args.json:
        p90 = {t: {k: _p90(xs) for k, xs in s.items()} for t, s in samples.items()}
        measured = {"paths": TARGETS, "p90_s": p90, "samples_s": samples}
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "measured": measured, "rows": rows}, indent=2) + "\n")


def _peer_ok(net: Network) -> bool:
    import httpx

    health = net.call("a", lambda: httpx.get(net.hosts["a"].url + "/health", timeout=10).json())
    return bool(health.get("peers", {}).get("b", {}).get("state") == "ok")


if __name__ == "__main__":
    main()
