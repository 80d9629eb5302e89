"""Batching benchmark (issue #19): aggregate tokens/s and time to first token at 1, 4, 8 and 16
concurrent clients, three servers in one run on the same published directory:

- ours with continuous batching (``resources.max_batch`` 16),
- ours one request at a time (``resources.max_batch`` 1: one ``generate()`` at a time, the previous behaviour),
- ``transformers serve --continuous-batching`` (the peer), started here.

    .venv/bin/python bench/batching.py [--shape qwen2-0.5b|tiny] [--tokens 32] [--json bench/batching.json]

Each client sends one streamed chat request per level (three in a row at 1 client), greedy,
``--tokens`` tokens each (``ignore_eos`` for ours; the peer's random-weight model almost never
picks its end-of-sequence id among 151,936). Tokens are counted from each answer's usage.
Time to first token is measured on the tiny model (ours batched vs one at a time), whose
answers stream text from the first token.
Servers run one after another (2 cores: side by side they would measure each other). Everything
is on 127.0.0.1; each level is bounded by its request count and a timeout.
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
from common import AGENT, free_port, table  # noqa: E402
from resident import rss_kb  # noqa: E402

LEVELS = (1, 4, 8, 16)
PROMPTS = ["Tell me about the zoo", "What is a model zoo?", "Hello, how are you?", "Ask a question and the model answers it",
           "The zoo keeps every model pinned by its digest", "Adapters change how the model answers", "What is a host?", "I am fine"]  # fmt: skip


class Server:
    """A server under test: started, waited for, stopped; its process tree's RSS."""

    def __init__(self, label: str, cmd: list[str], env: dict[str, str], port: int, model: str, ours: bool) -> None:
        self.label, self.port, self.model, self.ours = label, port, model, ours
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.label} exited with {self.proc.returncode} before it answered")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.label} did not answer /health within {timeout:.0f}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one(server: Server, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token, end to end, completion tokens) of one streamed request."""
    import httpx

    body: dict[str, Any] = {"model": server.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if server.ours:
        body["ignore_eos"] = True
    t0, first, used = time.monotonic(), 0.0, 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if not first and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                first = time.monotonic() - t0
            if chunk.get("usage"):
                used = int(chunk["usage"]["completion_tokens"])
    end = time.monotonic() - t0
    return first or end, end, used


def level(server: Server, clients: int, tokens: int) -> dict[str, Any]:
    results: list[tuple[float, float, int]] = []
    per_client = 3 if clients == 1 else 1

    def client(n: int) -> None:
        for k in range(per_client):
            results.append(one(server, PROMPTS[(n + k) % len(PROMPTS)], tokens))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    rss = 0
    while any(th.is_alive() for th in threads):
        rss = max(rss, rss_kb(server.proc.pid))
        time.sleep(0.2)
    wall = time.monotonic() - t0
    ttft = sorted(r[0] for r in results)
    return {"tps": sum(r[2] for r in results) / wall, "ttft_p50": statistics.median(ttft), "ttft_p99": ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))],
            "rss_mb": rss / 1024, "tokens": sum(r[2] for r in results), "requests": len(results)}  # fmt: skip


def measure(shape: str, tokens: int, max_batch: int, levels: tuple[int, ...], peer: bool) -> dict[str, dict[int, dict[str, Any]]]:
    """Each server in turn on one published model of ``shape``: {server: {clients: figures}}."""
    from zoo_agent.demo.tiny import QWEN2_05B_SHAPE, build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="zoo-bench-", dir=HERE.parent))
    measured: dict[str, dict[int, dict[str, Any]]] = {}
    try:
        src = build_tiny_model(work / "src", **(QWEN2_05B_SHAPE if shape == "qwen2-0.5b" else {}))  # type: ignore[arg-type]
        files = [{"path": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size} for p in sorted(src.iterdir())]
        zoo, index = work / "zoo", work / "index.json"

        def declare(batch: int) -> None:
            index.write_text(json.dumps({
                "models": {"m": {"version": "1", "source": {"type": "file", "path": str(src)}, "license": "MIT", "files": files}},
                "tenants": {"t": {"model": "m", "generation": {"temperature": 0, "max_tokens": tokens},
                                  "resources": {"max_batch": batch, "max_queue": 64}}},
                "hosts": {"h": {"resident": "t"}}}))  # fmt: skip

        declare(max_batch)
        subprocess.run([*AGENT, "apply", "--root", str(zoo), "--index", str(index), "--host", "h"], check=True, capture_output=True)
        published = (zoo / "models" / "m" / "current").resolve()

        def ours(batch: int) -> Server:
            declare(batch)
            port = free_port()
            cmd = [*AGENT, "resident", "--root", str(zoo), "--index", str(index), "--host", "h", "--listen", f"127.0.0.1:{port}"]
            return Server(f"ours, max_batch {batch} ({shape})", cmd, {}, port, "t", ours=True)

        def transformers_serve() -> Server:
            port = free_port()
            cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(published), "--continuous-batching",
                   "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]  # fmt: skip
            return Server(f"transformers serve --continuous-batching ({shape})", cmd, {"HF_HUB_OFFLINE": "1"}, port, str(published), ours=False)

        starters = [("batched", lambda: ours(max_batch)), ("serial", lambda: ours(1))] + ([("peer", transformers_serve)] if peer else [])
        for key, start in starters:
            server = start()
            try:
                server.wait()
                print(f"==> {server.label}", file=sys.stderr, flush=True)
                one(server, PROMPTS[0], 4)  # warm: the first forward pages the weights in
                measured[key] = {}
                for clients in levels:
                    measured[key][clients] = m = level(server, clients, tokens)
                    print(f"    {clients:>2} clients: {m['tps']:.1f} tok/s, TTFT p50 {m['ttft_p50']:.2f} s, p99 {m['ttft_p99']:.2f} s, "
                          f"RSS {m['rss_mb']:.0f} MB ({m['tokens']} tokens)", file=sys.stderr, flush=True)  # fmt: skip
            finally:
                server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shape", choices=["tiny", "qwen2-0.5b"], default="qwen2-0.5b", help="the model for the throughput rows")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16, help="ours with batching: resources.max_batch")
    parser.add_argument("--skip-peer", action="store_true", help="leave transformers serve out")
    args = parser.parse_args()
    label = "Qwen2-0.5B shape" if args.shape == "qwen2-0.5b" else "tiny model"
    big = measure(args.shape, args.tokens, args.max_batch, LEVELS, not args.skip_peer)
    # Time to first token needs text to time: the Qwen2 shape's random weights mostly pick ids
    # its 512-token tokenizer cannot spell, so those answers stream no text until the end.
    small = measure("tiny", args.tokens, args.max_batch, (8, 16), False) if args.shape != "tiny" else big

    b, s, p = big["batched"], big["serial"], big.get("peer")
    rows: list[dict[str, Any]] = []
    for clients in LEVELS:
        goal = ">= 0.95" if clients == 1 else (">= 3.0" if clients == 8 else "-")
        rows.append({"name": f"{clients} client(s): aggregate tok/s ({label}, {args.tokens} tokens)", "ours_text": f"{b[clients]['tps']:.1f} tok/s",
                     "peer": "ours, one at a time", "peer_text": f"{s[clients]['tps']:.1f} tok/s", "ratio": b[clients]["tps"] / s[clients]["tps"], "goal": goal})  # fmt: skip
        if p is not None:
            rows.append({"name": f"{clients} client(s): aggregate tok/s vs the peer", "ours_text": f"{b[clients]['tps']:.1f} tok/s",
                         "peer": "transformers serve --cb", "peer_text": f"{p[clients]['tps']:.1f} tok/s", "ratio": b[clients]["tps"] / p[clients]["tps"],
                         "goal": ">= 1.0" if clients == 8 else "-"})  # fmt: skip
    for clients in (8, 16):
        for q in ("p50", "p99"):
            key = f"ttft_{q}"
            sb, ss = small["batched"][clients][key], small["serial"][clients][key]
            rows.append({"name": f"{clients} clients: time to first token, {q} (tiny model)", "ours_s": sb, "peer": "ours, one at a time",
                         "peer_s": ss, "ratio": sb / ss, "goal": "<= 0.5 (ours/peer)" if (clients, q) == (8, "p50") else "- (ours/peer)"})  # fmt: skip
    rows.append({"name": f"RSS at 16 clients vs 1 ({label})", "ours_mb": b[16]["rss_mb"], "peer": "ours at 1 client", "peer_mb": b[1]["rss_mb"],
                 "ratio": b[16]["rss_mb"] / b[1]["rss_mb"], "goal": "bounded (docs/batching.md)"})  # fmt: skip
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "measured": big, "ttft": small, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
