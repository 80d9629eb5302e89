"""Hub fetch benchmark (issue #4): ours against huggingface_hub, measured in the same run.

    .venv/bin/python bench/hf.py [--scale 1.0] [--json bench/hf.json]

Serves ~1 GB in 4 files from tests/support/hubserver.py on 127.0.0.1 and fetches it three ways:
`zoo-agent apply` (hashed while written, fsynced, published), `snapshot_download`
alone (verifies nothing but sizes), and `snapshot_download` then `sha256sum` (the
user's way to a verified copy). Ratios are the peer's time over ours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import AGENT, MB, run, table, timed  # noqa: E402

from tests.support.hubserver import HubServer, Repo  # noqa: E402

SNAPSHOT = "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3], endpoint=sys.argv[4])"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = int(256 * args.scale) * MB
    block = os.urandom(MB)
    files = {f"model-{i:05d}-of-00004.safetensors": b"".join(block[j % 997:] + block[: j % 997] for j in range(i, i + size // MB)) for i in range(4)}
    files["config.json"] = b'{"model_type": "llama"}'
    server = HubServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    commit = server.repos.setdefault("org/big", Repo()).commit(files)
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-", dir=HERE.parent))
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(work / "hf-home")}
    try:
        index = work / "index.json"
        index.write_text(json.dumps({
            "models": {"big": {"version": "v1", "source": {"type": "hf", "repo": "org/big", "revision": commit}, "license": "MIT",
                               "files": [{"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for p, d in files.items()]}},
            "hosts": {"bench": {"available": ["big"]}},
        }))  # fmt: skip

        def ours() -> None:
            shutil.rmtree(work / "zoo", ignore_errors=True)
            run(*AGENT, "apply", "--root", work / "zoo", "--index", index, "--host", "bench", "--json", env=env)

        def snapshot() -> None:
            shutil.rmtree(work / "snap", ignore_errors=True)
            run(sys.executable, "-c", SNAPSHOT, "org/big", commit, work / "snap", server.url, env=env)

        def snapshot_then_sha() -> None:
            snapshot()
            run("sha256sum", *sorted(p for p in (work / "snap").iterdir() if p.is_file()))

        t_ours, t_snap, t_both = timed(ours, args.runs), timed(snapshot, args.runs), timed(snapshot_then_sha, args.runs)
    finally:
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    total = sum(map(len, files.values())) // MB
    rows = [
        {"name": f"hub fetch {total} MB (verified, fsynced)", "ours_s": t_ours, "peer": "snapshot_download; sha256sum", "peer_s": t_both, "ratio": t_both / t_ours, "goal": ">= 1.3"},
        {"name": f"hub fetch {total} MB (verified, fsynced)", "ours_s": t_ours, "peer": "snapshot_download (no hash)", "peer_s": t_snap, "ratio": t_snap / t_ours, "goal": ">= 0.8"},
    ]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
