"""Store benchmarks (issue #3): ours against the peer tool, measured in the same run.

    .venv/bin/python bench/store.py [--scale 1.0] [--json bench/store.json]

Prints one table: our figure, the peer's, the ratio (peer time / our time, so > 1 means
we are faster) and the goal. Sizes shrink with --scale for a quick look; docs/performance.md
quotes a run at scale 1. Everything runs on loopback and on the local disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AGENT, MB, run, table, timed, write_random  # noqa: E402


def make_index(path: Path, models: dict[str, tuple[str, dict[str, object], list[dict[str, object]]]]) -> None:
    doc = {
        "models": {m: {"version": v, "source": src, "files": files, "license": "MIT"} for m, (v, src, files) in models.items()},
        "hosts": {"bench": {"available": sorted(models)}},
    }
    path.write_text(json.dumps(doc))


def apply(root: Path, index: Path) -> subprocess.CompletedProcess[bytes]:
    return run(*AGENT, "apply", "--root", root, "--index", index, "--host", "bench", "--json")


def bench_verify(work: Path, scale: float, runs: int) -> dict[str, object]:
    n, size = 8, int(256 * scale) * MB
    src, files = work / "vsrc", []
    for i in range(n):
        files.append({"path": f"part-{i}.safetensors", "sha256": write_random(src / f"part-{i}.safetensors", size), "size": size})
    index, root = work / "verify.json", work / "vzoo"
    make_index(index, {"big": ("v1", {"type": "file", "path": str(src)}, files)})
    apply(root, index)
    paths = sorted((root / "models/big/current").glob("*.safetensors"))
    ours = timed(lambda: run(*AGENT, "verify", "--root", root), runs)
    peer = timed(lambda: run("sha256sum", *paths), runs)
    shutil.rmtree(src)
    return {"name": f"deep verify, {n} x {size // MB} MB", "ours_s": ours, "peer": "sha256sum", "peer_s": peer, "ratio": peer / ours, "goal": ">= 2.0"}


def bench_fetch(work: Path, scale: float, runs: int) -> list[dict[str, object]]:
    n, size = 4, int(256 * scale) * MB
    served, files = work / "served", []
    for i in range(n):
        files.append({"path": f"w-{i}.bin.safetensors", "sha256": write_random(served / f"w-{i}.bin.safetensors", size), "size": size})
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "-d", str(served)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        port = server.stdout.readline().split("port ")[1].split()[0]
        url = f"http://127.0.0.1:{port}"
        index, out = work / "fetch.json", work / "fetched"
        make_index(index, {"net": ("v1", {"type": "url", "base_url": url}, files)})

        def ours() -> None:
            shutil.rmtree(work / "fzoo", ignore_errors=True)
            apply(work / "fzoo", index)

        def curl_then_sha() -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            for f in files:
                run("curl", "-sf", "-o", out / str(f["path"]), f"{url}/{f['path']}")
            run("sha256sum", *sorted(out.iterdir()))

        def curl_tee_sha() -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            for f in files:
                subprocess.run(f"curl -sf {url}/{f['path']} | tee {out / str(f['path'])} | sha256sum", shell=True, check=True, capture_output=True)

        t_ours = timed(ours, runs)
        t_two = timed(curl_then_sha, runs)
        t_pipe = timed(curl_tee_sha, runs)
        total = n * size // MB
        return [
            {"name": f"fetch {total} MB over loopback (verified, fsynced)", "ours_s": t_ours, "peer": "curl -o; sha256sum", "peer_s": t_two, "ratio": t_two / t_ours, "goal": ">= 1.3"},
            {"name": f"fetch {total} MB over loopback (verified, fsynced)", "ours_s": t_ours, "peer": "curl | tee | sha256sum", "peer_s": t_pipe, "ratio": t_pipe / t_ours, "goal": ">= 0.9"},
        ]
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(served, ignore_errors=True)
        shutil.rmtree(work / "fzoo", ignore_errors=True)
        shutil.rmtree(work / "fetched", ignore_errors=True)


def bench_memory(work: Path, scale: float) -> dict[str, object]:
    size = int(2048 * scale) * MB
    src = work / "msrc"
    files = [{"path": "one.safetensors", "sha256": write_random(src / "one.safetensors", size), "size": size}]
    index = work / "mem.json"
    make_index(index, {"huge": ("v1", {"type": "file", "path": str(src)}, files)})
    cmd = [*AGENT, "apply", "--root", str(work / "mzoo"), "--index", str(index), "--host", "bench", "--json"]
    if shutil.which("time") and Path("/usr/bin/time").exists():
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True)
        rss_kb = int(next(line for line in proc.stderr.splitlines() if "Maximum resident set size" in line).split(":")[1])
        how = "/usr/bin/time -v"
    else:
        subprocess.run(cmd, capture_output=True, check=True)
        rss_kb, how = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "getrusage"
    shutil.rmtree(src)
    shutil.rmtree(work / "mzoo")
    return {"name": f"peak RSS of apply, one {size // MB} MB file ({how})", "ours_s": None, "ours_mb": rss_kb / 1024, "peer": "-", "peer_s": None, "ratio": None, "goal": "<= 100 MB"}


def bench_noop(work: Path, models: int, runs: int) -> dict[str, object]:
    src = work / f"nsrc{models}"
    files = []
    for j in range(20):
        data = f"file {j}\n".encode() * 10
        (src / f"f{j:02d}.json").parent.mkdir(parents=True, exist_ok=True)
        (src / f"f{j:02d}.json").write_bytes(data)
        files.append({"path": f"f{j:02d}.json", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    index, root = work / f"noop{models}.json", work / f"nzoo{models}"
    make_index(index, {f"m{i:04d}": ("v1", {"type": "file", "path": str(src)}, files) for i in range(models)})
    apply(root, index)
    noop = timed(lambda: apply(root, index), runs)
    version = timed(lambda: run(*AGENT, "--version"), runs)
    shutil.rmtree(root)
    return {"name": f"no-op apply, {models} models x 20 files", "ours_s": noop, "peer": "zoo-agent --version", "peer_s": version, "ratio": noop / version, "goal": "<= 1.3 (ours/peer)" if models == 100 else "linear in files"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply data sizes (default 1: 2 GB verify, 1 GB fetch)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir beside the repo)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-", dir=args.dir or Path(__file__).resolve().parent.parent))
    try:
        rows = [bench_verify(work, args.scale, args.runs), *bench_fetch(work, args.scale, args.runs), bench_memory(work, args.scale)]
        rows += [bench_noop(work, 100, 5), bench_noop(work, 1000, 3)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
