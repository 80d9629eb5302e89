"""Multi-model resident benchmarks (issue #20): paging, the router hop, rotation, memory.

    .venv/bin/python bench/paging.py [--shape tiny|qwen2-0.5b] [--json bench/paging.json]

About 5 minutes on 2 cores with the defaults, nearly all of it worker starts (about 5 s each for
the tiny model, 30 of them in the rotation); ``--reps``, ``--requests`` and ``--rounds`` bound it.

One model (the tests' tiny model, or a Qwen2-0.5B shape with random weights) published once;
every tenant serves it. Each row has the reference measured in the same run:

1. cold start: request -> first streamed token of a paged-out tenant (two tenants, budget for
   one, the other loaded) vs exec -> READY of a fresh single-tenant resident (its own index,
   same zoo); medians of ``--reps``, the two interleaved.
2. the router hop: p50/p90 of a ``max_tokens: 1`` request through the router vs straight to
   the worker's private socket (``model-info.json`` names it), ``--requests`` each, interleaved
   (``--only hop`` runs this part alone).
3. rotation: five tenants, budget 2.5 footprints (room for two), ``--rounds`` of a skewed
   sequence (a hot tenant every other request); requests/s and loads (``page-in`` records of
   the action log) for the default LRU policy vs ``--paging-policy oldest``, same sequence.
4. memory: the summed RSS of the supervisor and all its children, sampled every 50 ms during
   each rotation; the peak against the budget plus the slack docs/paging.md documents (per live
   worker: its runtime, i.e. an idle worker's RSS minus its model's footprint; plus the router,
   i.e. the supervisor process itself), both measured in this run.

Everything is on 127.0.0.1 and unix sockets; every loop is bounded by a count and a deadline;
residents get SIGTERM, then SIGKILL of their process group, in ``finally`` blocks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import AGENT, MB, REQUEST_TIMEOUT, Resident, seconds, table  # noqa: E402

GEN = {"generation": {"temperature": 0, "max_tokens": 4}, "resources": {"max_batch": 2, "max_queue": 4}}
HOT_SEQUENCE = "abacadae"  # a hot tenant every other request: LRU keeps it, "oldest" evicts it


class Zoo:
    """The published model, the index files and what the resident wrote (footprints, the action log)."""

    def __init__(self, work: Path, src: Path) -> None:
        self.work, self.src = work, src
        files = [{"path": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size} for p in sorted(src.iterdir())]
        self.model = {"version": "v1", "source": {"type": "file", "path": str(src)}, "license": "MIT", "files": files}
        self.root = work / "zoo"

    def index(self, name: str, tenants: list[str], budget: int | None) -> Path:
        host: dict[str, Any] = {"tenants": tenants, **({"memory_budget": str(budget)} if budget is not None else {})}
        path = self.work / f"{name}.json"
        path.write_text(json.dumps({"models": {"m": self.model}, "tenants": {t: {"model": "m", **GEN} for t in tenants}, "hosts": {"h": host}}))
        return path

    def apply(self, index: Path) -> None:
        subprocess.run([*AGENT, "apply", "--root", str(self.root), "--index", str(index), "--host", "h"], check=True, capture_output=True)

    def estimate(self, index: Path, tenant: str) -> int:
        """What the budget counts for the tenant before it loads (the fit module's estimate)."""
        from zoo_agent.index.fit import read_config, tenant_footprint
        from zoo_agent.index.load import load_index

        return tenant_footprint(load_index(index, str(index)), tenant, read_config(self.src)).total

    def info(self, tenant: str) -> dict[str, Any]:
        return json.loads((self.root / "resident" / "tenants" / tenant / "model-info.json").read_text())  # type: ignore[no-any-return]

    def actions(self) -> list[dict[str, Any]]:
        log = self.root / "host" / "actions.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def paged(self, since: int) -> list[tuple[str, str]]:
        return [(r["action"], r["id"]) for r in self.actions()[since:] if r["action"] in ("page-in", "page-out")]


def first_token(http: Any, url: str, tenant: str) -> float:
    """Seconds from sending a streamed request to its first data line (a token; SSE comments
    saying the tenant is loading do not count)."""
    t0, first = time.monotonic(), 0.0
    body = {"model": tenant, "prompt": "Hello", "max_tokens": 1, "stream": True}
    with http.stream("POST", url + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {") and not first:
                first = time.monotonic() - t0
                if '"error"' in line:
                    raise RuntimeError(f"{tenant}: {line}")
    if not first:
        raise RuntimeError(f"{tenant}: the stream carried no token")
    return first


def cold_start(zoo: Zoo, fp: int, reps: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A paged-out tenant's first token vs a fresh resident's READY, interleaved."""
    import httpx

    pair = zoo.index("pair", ["a", "b"], int(fp * 1.5))
    solo = zoo.index("solo", ["solo"], None)
    cold: list[float] = []
    fresh: list[float] = []
    r = Resident(zoo.work, pair)
    try:
        r.wait_ready()
        with httpx.Client() as http:
            for i in range(reps):
                tenant = "ab"[(i + 1) % 2]  # the one not loaded: b, a, b, ...
                since = len(zoo.actions())
                cold.append(first_token(http, r.url, tenant))
                if ("page-in", tenant) not in zoo.paged(since):
                    raise RuntimeError(f"{tenant} was not paged in: not a cold start ({zoo.paged(since)})")
                f = Resident(zoo.work, solo)
                try:
                    fresh.append(f.wait_ready())
                finally:
                    f.stop()
                print(f"    cold start {i + 1}/{reps}: first token {cold[-1]:.2f} s, fresh READY {fresh[-1]:.2f} s", file=sys.stderr, flush=True)
            measured = zoo.info("ab"[reps % 2])["footprint"]
    finally:
        r.stop()
    ours, peer = statistics.median(cold), statistics.median(fresh)
    ratio = ours / peer
    row = {"name": f"cold start: first token of a paged-out tenant (median of {reps})", "ours_s": ours, "peer": "exec to READY, fresh resident",
           "peer_s": peer, "ratio": ratio, "goal": "<= 1.1 (ours/peer)"}  # fmt: skip
    if ratio > 1.1:
        row["notes"] = f"goal missed: {ratio:.2f}x of a fresh resident's READY"
    return [row], {"cold_s": cold, "fresh_ready_s": fresh, "footprint": measured}


def router_hop(zoo: Zoo, requests: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """p50/p90 of a 1-token request: through the router vs straight to the worker's socket."""
    import httpx

    index = zoo.index("hop", ["a"], None)
    r = Resident(zoo.work, index)
    try:
        r.wait_ready()
        uds = zoo.info("a")["socket"]
        body = {"model": "a", "prompt": "Hello", "max_tokens": 1}
        via: list[float] = []
        direct: list[float] = []
        with httpx.Client(base_url=r.url, timeout=REQUEST_TIMEOUT) as router, \
                httpx.Client(base_url="http://worker", transport=httpx.HTTPTransport(uds=uds), timeout=REQUEST_TIMEOUT) as worker:  # fmt: skip
            for _ in range(10):  # warm both connections
                router.post("/v1/completions", json=body).raise_for_status()
                worker.post("/v1/completions", json=body).raise_for_status()
            deadline = time.monotonic() + 300
            for i in range(requests):
                if time.monotonic() > deadline:
                    break
                for client, out in ((router, via), (worker, direct)) if i % 2 == 0 else ((worker, direct), (router, via)):
                    t0 = time.perf_counter()
                    client.post("/v1/completions", json=body).raise_for_status()
                    out.append(time.perf_counter() - t0)
    finally:
        r.stop()
    p = {name: (statistics.median(xs), statistics.quantiles(xs, n=10)[-1]) for name, xs in (("router", via), ("direct", direct))}
    rows = []
    for q, k in (("p50", 0), ("p90", 1)):
        ours, peer = p["router"][k], p["direct"][k]
        extra = 1000 * (ours - peer)
        row = {"name": f"warm 1-token request through the router, {q} ({len(via)} each)", "ours_s": ours, "peer": "the worker's socket directly",
               "peer_s": peer, "ratio": ours / peer, "goal": f"{'<= 2 ms' if q == 'p50' else '-'} over direct (here {extra:+.2f} ms)"}  # fmt: skip
        if q == "p50" and extra > 2:
            row["notes"] = f"goal missed: the hop adds {extra:.2f} ms at p50"
        rows.append(row)
    return rows, {"router_s": via, "direct_s": direct}


class Sampler:
    """The summed RSS of a process and all its children, every ``interval`` seconds, on a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self.proc, self.interval = psutil.Process(pid), interval
        self.peak, self.peak_workers, self.samples = 0, 0, 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        import psutil

        total, kids = 0, 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
                kids += p is not self.proc
            except psutil.Error:
                pass
        return total, kids

    def _run(self) -> None:
        import psutil

        while not self.stop_event.wait(self.interval):
            try:
                total, kids = self.sample()
            except psutil.Error:
                return
            self.samples += 1
            if total > self.peak:
                self.peak, self.peak_workers = total, kids

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)


def rotation(zoo: Zoo, fp: int, rounds: int, policy: str) -> dict[str, Any]:
    """``rounds`` of the skewed sequence over five tenants, room for two: requests/s, loads, peak RSS."""
    import httpx
    import psutil

    budget = int(fp * 2.5)
    index = zoo.index(f"five-{policy}", list("abcde"), budget)
    sequence = list(HOT_SEQUENCE * rounds)
    r = Resident(zoo.work, index, "--paging-policy", policy)
    try:
        r.wait_ready()
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http:  # a few requests, then idle: the worker's RSS as it serves
            for _ in range(3):
                http.post(r.url + "/v1/completions", json={"model": "a", "prompt": "Hello there", "max_tokens": 4}).raise_for_status()
        time.sleep(1.0)
        router_rss = psutil.Process(r.proc.pid).memory_info().rss
        info = zoo.info("a")
        worker_rss = psutil.Process(int(info["pid"])).memory_info().rss
        runtime = worker_rss - int(info["footprint"]["used"])  # an idle worker beyond what the budget counts for it
        since = len(zoo.actions())
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http, Sampler(r.proc.pid) as sampler:
            baseline = sampler.sample()[0]
            t0 = time.monotonic()
            deadline = t0 + 900
            done = 0
            for tenant in sequence:
                if time.monotonic() > deadline:
                    break
                resp = http.post(r.url + "/v1/completions", json={"model": tenant, "prompt": "Hello there", "max_tokens": 4})
                resp.raise_for_status()
                done += 1
            wall = time.monotonic() - t0
        paged = zoo.paged(since)
    finally:
        r.stop()
    workers = max(sampler.peak_workers, 1)
    reference = budget + workers * runtime + router_rss
    out = {"policy": policy, "requests": done, "seconds": wall, "rps": done / wall, "loads": sum(a == "page-in" for a, _ in paged),
           "evictions": sum(a == "page-out" for a, _ in paged), "order": paged, "budget": budget, "baseline_rss": baseline,
           "peak_rss": sampler.peak, "peak_workers": sampler.peak_workers, "samples": sampler.samples, "router_rss": router_rss,
           "idle_worker_rss": worker_rss, "worker_runtime": runtime, "reference_rss": reference}  # fmt: skip
    print(f"    rotation ({policy}): {done} requests in {wall:.1f} s, {out['loads']} loads; RSS baseline {baseline / MB:.0f} MB, "
          f"peak {sampler.peak / MB:.0f} MB with {sampler.peak_workers} workers, budget+slack {reference / MB:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
    return out


def rotation_rows(lru: dict[str, Any], old: dict[str, Any], rounds: int) -> list[dict[str, Any]]:
    what = f"5 tenants, room for 2, {lru['requests']} requests ({rounds} x {HOT_SEQUENCE})"
    rows: list[dict[str, Any]] = [
        {"name": f"rotation, requests/s: LRU vs evict-oldest ({what})", "ours_text": f"{lru['rps']:.2f} req/s", "peer": "--paging-policy oldest",
         "peer_text": f"{old['rps']:.2f} req/s", "ratio": lru["rps"] / old["rps"], "goal": ">= 1.0"},
        {"name": f"rotation, loads (page-in records): LRU vs evict-oldest ({what})", "ours_text": f"{lru['loads']} loads", "peer": "--paging-policy oldest",
         "peer_text": f"{old['loads']} loads", "ratio": old["loads"] / lru["loads"] if lru["loads"] else None, "goal": "fewer loads (>= 1.0)"},
    ]  # fmt: skip
    if lru["rps"] < old["rps"]:
        rows[0]["notes"] = "goal missed: LRU served fewer requests/s than evict-oldest"
    if lru["loads"] > old["loads"]:
        rows[1]["notes"] = "goal missed: LRU loaded more often than evict-oldest"
    for m in (lru, old):
        slack = m["reference_rss"] - m["budget"]
        row = {"name": f"memory: peak RSS of the resident's process tree, rotation ({m['policy']})", "ours_mb": m["peak_rss"] / MB,
               "peer": f"budget + slack ({m['peak_workers']} workers)", "peer_mb": m["reference_rss"] / MB, "ratio": m["peak_rss"] / m["reference_rss"],
               "goal": "<= 1.0 (ours/peer)",
               "notes": f"peak {m['peak_rss'] / MB:.0f} MB - baseline {m['baseline_rss'] / MB:.0f} MB = {(m['peak_rss'] - m['baseline_rss']) / MB:.0f} MB; "
                        f"budget {m['budget'] / MB:.1f} MB + slack {slack / MB:.0f} MB (router {m['router_rss'] / MB:.0f} MB + "
                        f"{m['peak_workers']} x worker runtime {m['worker_runtime'] / MB:.0f} MB)"}  # fmt: skip
        if m["peak_rss"] > m["reference_rss"]:
            row["notes"] = "goal missed: " + row["notes"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shape", choices=["tiny", "qwen2-0.5b"], default="tiny", help="qwen2-0.5b: 494M random weights (about 2 GB a tenant)")
    parser.add_argument("--reps", type=int, default=5, help="cold starts (and fresh residents) to take the median of")
    parser.add_argument("--requests", type=int, default=200, help="requests through the router and directly, each")
    parser.add_argument("--rounds", type=int, default=2, help=f"rounds of {HOT_SEQUENCE} in the rotation, per policy")
    parser.add_argument("--only", default="cold,hop,rotation", help="the parts to run, comma-separated: cold, hop, rotation (rotation needs cold)")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if parts - {"cold", "hop", "rotation"} or ("rotation" in parts and "cold" not in parts):
        parser.error(f"--only {args.only}: name some of cold, hop, rotation (rotation needs cold)")
    from zoo_agent.demo.tiny import QWEN2_05B_SHAPE, build_tiny_model

    label = "Qwen2-0.5B shape" if args.shape == "qwen2-0.5b" else "tiny model"
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-paging-"))
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    started = time.monotonic()
    try:
        src = build_tiny_model(work / "src" / "v1", **(QWEN2_05B_SHAPE if args.shape == "qwen2-0.5b" else {}))  # type: ignore[arg-type]
        zoo = Zoo(work, src)
        five = zoo.index("five", list("abcde"), None)
        zoo.apply(five)
        estimate = zoo.estimate(five, "a")
        if "cold" in parts:
            print(f"==> cold start ({label}, footprint estimate {estimate / MB:.1f} MB)", file=sys.stderr, flush=True)
            got, extra["cold_start"] = cold_start(zoo, estimate, args.reps)
            rows += got
            # The budget counts the larger of the estimate and what a load measured: size it by both.
            fp = max(estimate, int(extra["cold_start"]["footprint"]["measured"]))
            extra["footprint"] = {"estimate": estimate, "used": fp}
        if "hop" in parts:
            print("==> router hop", file=sys.stderr, flush=True)
            got, extra["router_hop"] = router_hop(zoo, args.requests)
            rows += got
        if "rotation" in parts:
            print("==> rotation", file=sys.stderr, flush=True)
            lru = rotation(zoo, fp, args.rounds, "lru")
            old = rotation(zoo, fp, args.rounds, "oldest")
            extra["rotation"] = {"lru": lru, "oldest": old}
            rows += rotation_rows(lru, old, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["name"] = f"{row['name']} [{label}]" if args.shape != "tiny" else row["name"]
    print(table(rows))
    for row in rows:
        if row.get("notes"):
            print(f"  {row['name']}: {row['notes']}")
    print(f"({seconds(time.monotonic() - started)} in all, {os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "shape": args.shape, "measured": extra, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
