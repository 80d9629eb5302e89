"""Fleet apply benchmark (issue #22): N hosts reconciling from one hub mirror at once.

    .venv/bin/python bench/fleet.py [--scale 1.0] [--runs 2] [--json bench/fleet.json]

One index declares 8 hosts; host i serves the tenant every host shares and one of its own
(a model each, ~24 MB in 3 files at scale 1). tests/support/hubserver.py on 127.0.0.1 is the site
mirror. For N = 1, 2, 4, 8, N separate zoo roots run `zoo-agent apply --host host-i`, all
started at once, each its own process (as N machines would). Measured: the wall time from
the first start to the last exit, and the bytes the mirror served against N x one host's
slice (ratio 1.00: each host fetched its slice and nothing else, each file once). Every
file's GET count is checked too: a shared file N times, a host's own once.

All N "hosts" share this machine's cores (2 here), so the wall time grows with N as the
processes compete (at these sizes mostly the interpreter's start, ~0.8 s of CPU per
`apply`, then hashing and writing); on a real fleet each host brings its own cores. The
time goal is perfect scaling on these cores: N / min(N, cores) times one host alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import AGENT, MB, table  # noqa: E402

from tests.support.hubserver import HubServer, Repo  # noqa: E402

HOSTS = 8
FLEETS = (1, 2, 4, 8)


def model_files(name: str, size: int) -> dict[str, bytes]:
    """config.json and two weight shards of pseudo-random (incompressible) bytes, distinct per model."""
    seed = hashlib.sha256(name.encode()).digest()
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(MB // 32))
    shard = size // 2 // MB
    return {
        "config.json": json.dumps({"model_type": "llama", "name": name}).encode(),
        **{f"model-{s:05d}-of-00002.safetensors": b"".join(block[j % 997:] + block[: j % 997] for j in range(s * shard, (s + 1) * shard))
           for s in range(2)},
    }  # fmt: skip


def fleet_index(server: HubServer, size: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The index of 8 hosts (shared + own-i each), its models on the mirror, and each model's bytes."""
    models: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for name in ["shared", *(f"own-{i}" for i in range(HOSTS))]:
        files = model_files(name, size)
        commit = server.repos.setdefault(f"site/{name}", Repo()).commit(files)
        models[name] = {"version": "v1", "source": {"type": "hf", "repo": f"site/{name}", "revision": commit}, "license": "MIT",
                        "files": [{"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for p, d in files.items()]}  # fmt: skip
        sizes[name] = sum(map(len, files.values()))
    return {
        "models": models,
        "tenants": {name: {"model": name} for name in models},
        "hosts": {f"host-{i}": {"tenants": ["shared", f"own-{i}"], "endpoint": f"http://host-{i}.lan:8000"} for i in range(HOSTS)},
    }, sizes


def apply_fleet(work: Path, index: Path, n: int, env: dict[str, str]) -> tuple[float, float]:
    """`apply` for host-0 .. host-(n-1), each in its own root and process, all started at once:
    the wall time, and the CPU seconds the N processes used together."""
    roots = [work / f"fleet-{n}" / f"host-{i}" for i in range(n)]
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    procs = [subprocess.Popen([*AGENT, "apply", "--root", str(root), "--index", str(index), "--host", f"host-{i}", "--json"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i, root in enumerate(roots)]  # fmt: skip
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for i, (proc, err) in enumerate(zip(procs, errors, strict=True)):
        if proc.returncode != 0:
            raise RuntimeError(f"apply --host host-{i} exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def expected_gets(n: int, models: dict[str, Any]) -> Counter[str]:
    """How many times each file should be fetched: a shared file once per host, a host's own once."""
    want: Counter[str] = Counter()
    for name, entry in models.items():
        hosts = n if name == "shared" else int(int(name.removeprefix("own-")) < n)
        for file in entry["files"]:
            want[f"/site/{name}/resolve/{entry['source']['revision']}/{file['path']}"] = hosts
    return +want


def table_rows(measured: dict[str, dict[str, Any]], slice_bytes: int, cpus: int) -> list[dict[str, object]]:
    """Per N: bytes served against N slices; wall time, and CPU per host, against one host alone."""
    alone, alone_cpu = statistics.median(measured["1"]["wall_s"]), statistics.median(measured["1"]["cpu_s"])
    rows: list[dict[str, object]] = []
    for n in FLEETS[1:]:
        m = measured[str(n)]
        wall, cpu, served, expected = statistics.median(m["wall_s"]), statistics.median(m["cpu_s"]) / n, max(m["served_bytes"]), m["expected_bytes"]
        rows.append({"name": f"fleet apply, {n} hosts x {slice_bytes // MB} MB slice: bytes served", "ours_mb": served / MB,
                     "peer": f"{n} x one host's slice", "peer_mb": expected / MB, "ratio": served / expected, "goal": "= 1.00"})
        rows.append({"name": f"fleet apply, {n} hosts at once: wall time", "ours_s": wall, "peer": "one host alone", "peer_s": alone,
                     "ratio": wall / alone, "goal": f"<= {n / min(n, cpus):.1f} ({n} hosts on {cpus} cores)"})
        rows.append({"name": f"fleet apply, {n} hosts at once: CPU per host", "ours_s": cpu, "peer": "one host alone", "peer_s": alone_cpu,
                     "ratio": cpu / alone_cpu, "goal": "~1.0 (informational)"})
    return rows  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = max(2, int(24 * args.scale)) * MB
    cpus = os.cpu_count() or 1
    server = HubServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    document, sizes = fleet_index(server, size)
    slice_bytes = sizes["shared"] + sizes["own-0"]
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-", dir=HERE.parent))
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(work / "hf-home")}
    measured: dict[str, dict[str, Any]] = {}
    try:
        index = work / "index.json"
        index.write_text(json.dumps(document))
        for n in FLEETS:
            walls, cpu, served = [], [], []
            for _ in range(args.runs):
                server.log.clear()
                wall, used = apply_fleet(work, index, n, env)
                walls.append(wall)
                cpu.append(used)
                served.append(server.bytes_sent(""))
                gets = Counter(h.path for h in server.log if h.method == "GET")
                if gets != expected_gets(n, document["models"]):
                    raise RuntimeError(f"{n} hosts: GETs per file differ from one per host that needs it: {dict(gets)}")
            measured[str(n)] = {"wall_s": walls, "cpu_s": cpu, "served_bytes": served, "expected_bytes": n * slice_bytes}
            print(f"{n} host(s): wall {statistics.median(walls):.2f} s, CPU {statistics.median(cpu) / n:.2f} s per host,"
                  f" served {max(served) / MB:.1f} MB", file=sys.stderr, flush=True)
    finally:
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    rows = table_rows(measured, slice_bytes, cpus)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": cpus}, "slice_bytes": slice_bytes, "measured": measured, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
