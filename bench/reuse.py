"""Reuse benchmark (issue #23): a new version that changes one small file of 20, over the url and hf sources.

    .venv/bin/python bench/reuse.py [--size 1024] [--runs 3] [--json bench/reuse.json]

A model of 20 files (``--size`` MB in all, 19 shards and a config.json) is published as v1;
v2 changes config.json only. Measured in the same run, from tests/support/hubserver.py and
tests/support/httpfiles.py on 127.0.0.1:

- bytes fetched by `zoo-agent apply` of v2 into a zoo that holds v1 (goal: the changed file only),
  and by `snapshot_download` of the new revision into a hub cache that holds the old one;
- the time of that apply against fetching the changed file alone (goal: at most 1.2x), against
  `snapshot_download` into the warm cache, and against a full fetch (what apply did before);
- a no-op apply of 100 models sharing their files, against `zoo-agent --version` (the store
  benchmark's no-op row: the reuse index must not make it slower).
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
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import AGENT, MB, run, table, timed  # noqa: E402

import tests.support.hubserver  # noqa: E402
from tests.support.httpfiles import FileServer  # noqa: E402
from tests.support.hubserver import HubServer, Repo  # noqa: E402
from zoo_agent.formats import human_bytes  # noqa: E402

SNAPSHOT = "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], revision=sys.argv[2], cache_dir=sys.argv[3], endpoint=sys.argv[4])"
N_FILES = 20


class _StoredDigests:
    """tests/support/hubserver.py hashes the whole file for its ETag on every HEAD and GET; a real hub
    stores it. Remembered here, so snapshot_download's 20 HEADs are not charged ~1 GB of our
    test server's hashing (which would flatter us)."""

    def __init__(self, served: list[bytes]) -> None:
        self.served = {id(d): d for d in served}  # held here, so their ids stay theirs
        self.known: dict[tuple[str, int], _Digest] = {}

    def _memo(self, name: str, data: bytes = b"") -> _Digest:
        if id(data) not in self.served:
            return _Digest(getattr(hashlib, name)(data).hexdigest())
        if (name, id(data)) not in self.known:
            self.known[(name, id(data))] = _Digest(getattr(hashlib, name)(data).hexdigest())
        return self.known[(name, id(data))]

    def sha256(self, data: bytes = b"") -> _Digest:
        return self._memo("sha256", data)

    def sha1(self, data: bytes = b"") -> _Digest:
        return self._memo("sha1", data)


class _Digest:
    def __init__(self, hexdigest: str) -> None:
        self._hex = hexdigest

    def hexdigest(self) -> str:
        return self._hex


def model(size_mb: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """v1 and v2: the same 19 incompressible shards, another config.json."""
    block, shard = os.urandom(MB), max(1, size_mb * MB // (N_FILES - 1))
    shards = {f"model-{i:05d}-of-{N_FILES - 1:05d}.safetensors": (block[i % 997:] + block[: i % 997]) * (shard // MB) + block[: shard % MB]
              for i in range(N_FILES - 1)}  # fmt: skip
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256}
    v1 = {**shards, "config.json": json.dumps(config, indent=2).encode()}
    v2 = {**shards, "config.json": json.dumps({**config, "rope_theta": 500000.0}, indent=2).encode()}
    return v1, v2


def entry(version: str, source: dict[str, object], files: dict[str, bytes]) -> dict[str, object]:
    return {"version": version, "source": source, "license": "MIT",
            "files": [{"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for p, d in sorted(files.items())]}  # fmt: skip


def write_index(path: Path, models: dict[str, dict[str, object]], keep: int = 2) -> Path:
    path.write_text(json.dumps({"models": models, "hosts": {"bench": {"available": sorted(models), "retention": {"keep_versions": keep}}}}))
    return path


def agent(command: str, root: Path, index: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return run(*AGENT, command, "--root", root, "--index", index, "--host", "bench", "--json", env=env)


def bench_source(kind: str, work: Path, v1: dict[str, bytes], v2: dict[str, bytes], src: tuple[dict[str, object], dict[str, object]],
                 sent: Callable[[], int], env: dict[str, str], runs: int) -> tuple[float, int, float, float]:  # fmt: skip
    """(seconds and bytes of the reusing apply, seconds of the changed file alone, seconds of a full fetch)."""
    root = work / f"{kind}-zoo"
    old = write_index(work / f"{kind}-v1.json", {"m": entry("v1", src[0], v1)}, keep=1)
    new = write_index(work / f"{kind}-v2.json", {"m": entry("v2", src[1], v2)})
    agent("apply", root, old, env)
    measured: list[int] = []
    samples: list[float] = []
    for _ in range(runs):
        before, started = sent(), time.perf_counter()
        agent("apply", root, new, env)
        samples.append(time.perf_counter() - started)
        measured.append(sent() - before)
        agent("apply", root, old, env)  # back to v1, and gc takes v2 (not timed)
        agent("gc", root, old, env)
    t_reuse = statistics.median(samples)
    changed = {"config.json": v2["config.json"]}
    one = write_index(work / f"{kind}-one.json", {"m": entry("v2", src[1], changed)})
    full = write_index(work / f"{kind}-full.json", {"m": entry("v2", src[1], v2)})

    def fresh(index: Path) -> None:
        shutil.rmtree(work / f"{kind}-fresh", ignore_errors=True)
        agent("apply", work / f"{kind}-fresh", index, env)

    t_one = timed(lambda: fresh(one), runs)
    t_full = timed(lambda: fresh(full), 1)
    shutil.rmtree(work / f"{kind}-fresh", ignore_errors=True)
    shutil.rmtree(root)
    return t_reuse, max(measured), t_one, t_full


def bench_snapshot(work: Path, hub: HubServer, commits: tuple[str, str], env: dict[str, str], runs: int) -> tuple[float, int]:
    """snapshot_download of v2 into a copy of a cache that holds v1 (blobs hard-linked: the copy is not timed)."""
    warm = work / "hf-cache-v1"
    run(sys.executable, "-c", SNAPSHOT, "org/big", commits[0], warm, hub.url, env=env)
    measured: list[int] = []
    samples: list[float] = []
    for _ in range(runs):
        cache = work / "hf-cache"
        shutil.rmtree(cache, ignore_errors=True)
        run("cp", "-al", warm, cache)
        before, started = sum(h.sent for h in hub.log), time.perf_counter()
        run(sys.executable, "-c", SNAPSHOT, "org/big", commits[1], cache, hub.url, env=env)
        samples.append(time.perf_counter() - started)
        measured.append(sum(h.sent for h in hub.log) - before)
    seconds = statistics.median(samples)
    shutil.rmtree(work / "hf-cache", ignore_errors=True)
    shutil.rmtree(warm)
    return seconds, max(measured)


def bench_noop(work: Path, v1: dict[str, bytes], env: dict[str, str], runs: int) -> dict[str, object]:
    """100 models x 20 files that all hold the same bytes (one inode each, 100 links)."""
    src = work / "noop-src"
    files = {f"f{j:02d}.json": f"file {j}\n".encode() * 10 for j in range(N_FILES)}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    index = write_index(work / "noop.json", {f"m{i:04d}": entry("v1", {"type": "file", "path": str(src)}, files) for i in range(100)})
    root = work / "noop-zoo"
    agent("apply", root, index, env)
    links = (root / "models/m0000/current/f00.json").stat().st_nlink
    noop = timed(lambda: agent("apply", root, index, env), runs)
    version = timed(lambda: run(*AGENT, "--version", env=env), runs)
    shutil.rmtree(root)
    return {"name": f"no-op apply, 100 models x 20 shared files ({links} links each)", "ours_s": noop, "peer": "zoo-agent --version",
            "peer_s": version, "ratio": noop / version, "goal": "<= 1.3 (ours/peer)"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="MB in the model's 20 files (default 1024)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    v1, v2 = model(args.size)
    tests.support.hubserver.hashlib = _StoredDigests([*v1.values(), *v2.values()])  # type: ignore[assignment]
    hub = HubServer()
    repo = hub.repos.setdefault("org/big", Repo())
    commits = (repo.commit(v1), repo.commit(v2))
    files = FileServer({**{f"v1/{p}": d for p, d in v1.items()}, **{f"v2/{p}": d for p, d in v2.items()}})
    for server in (hub, files):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-", dir=HERE.parent))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(work / "hf-home")}

    # FileServer logs requests, not bytes: none of these has a Range, so each got its whole file.
    served = {**{f"v1/{p}": len(d) for p, d in v1.items()}, **{f"v2/{p}": len(d) for p, d in v2.items()}}

    def url_sent() -> int:
        return sum(served[p] for p, _range in files.faults.requests)

    def hub_sent() -> int:
        return sum(h.sent for h in hub.log)

    try:
        url = bench_source("url", work, v1, v2, ({"type": "url", "base_url": f"{files.url}/v1"}, {"type": "url", "base_url": f"{files.url}/v2"}),
                           url_sent, env, args.runs)  # fmt: skip
        hf = bench_source("hf", work, v1, v2, ({"type": "hf", "repo": "org/big", "revision": commits[0]}, {"type": "hf", "repo": "org/big", "revision": commits[1]}),
                          hub_sent, env, args.runs)  # fmt: skip
        t_snap, snap_bytes = bench_snapshot(work, hub, commits, env, args.runs)
        noop = bench_noop(work, v1, env, 5)
    finally:
        hub.shutdown()
        files.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    total, changed = sum(map(len, v2.values())), len(v2["config.json"])
    what = f"v2 of a {human_bytes(total)} model, 1 of {N_FILES} files changed ({human_bytes(changed)})"
    rows: list[dict[str, object]] = []
    for name, (t_reuse, fetched, t_one, t_full) in (("url", url), ("hf", hf)):
        rows += [
            {"name": f"{name}: bytes fetched, {what}", "ours_s": None, "ours_text": human_bytes(fetched), "peer": "the changed file",
             "peer_s": None, "peer_text": human_bytes(changed), "ratio": changed / fetched if fetched else None, "goal": "1.00 (= the changed file)"},
            {"name": f"{name}: apply {what}", "ours_s": t_reuse, "peer": "apply of the changed file alone", "peer_s": t_one,
             "ratio": t_one / t_reuse, "goal": ">= 0.83 (<= 1.2x)"},
            {"name": f"{name}: apply {what}", "ours_s": t_reuse, "peer": "full fetch (before reuse)", "peer_s": t_full,
             "ratio": t_full / t_reuse, "goal": "-"},
        ]  # fmt: skip
    rows += [
        {"name": f"hf: bytes fetched, {what}", "ours_s": None, "ours_text": human_bytes(hf[1]), "peer": "snapshot_download, warm cache",
         "peer_s": None, "peer_text": human_bytes(snap_bytes), "ratio": snap_bytes / hf[1] if hf[1] else None, "goal": ">= 1.0"},
        {"name": f"hf: apply {what}", "ours_s": hf[0], "peer": "snapshot_download, warm cache", "peer_s": t_snap,
         "ratio": t_snap / hf[0], "goal": ">= 1.0"},
        noop,
    ]  # fmt: skip
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "size_mb": args.size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
