"""llama.cpp benchmark (issue #33): a llama.cpp tenant through our router against the same
`llama-server` asked directly, in one run: aggregate tokens/s at 1, 8 and 16 clients and the
time to first token at one client.

    .venv/bin/python bench/llamacpp.py [--shape qwen2-0.5b|tiny] [--quant q4_k_m] [--tokens 4] [--rounds 3] [--json bench/llamacpp.json]

The model is the tests' tiny transformers model (or its Qwen2-0.5B shape, random weights)
converted to GGUF by the pinned llama.cpp source's converter and quantized by its
`llama-quantize` (.ci/llama-cpp builds both). Both servers run the command line the resident
gives the tenant (`engines/llamacpp.server_argv`): `max_batch` 16 slots of `max_context` 512; the direct one
listens on 127.0.0.1, as a user would run it. Each client sends streamed chat requests, greedy,
`--tokens` tokens each (`ignore_eos`), tokens counted from each answer's usage; the time to first
token is that of the first text (``--rounds`` x 8 requests a side, prompts that share no
beginning). Both servers are up, and asked in turn, never at once (2 cores: side by side they
would measure each other): each level is `--rounds` rounds of (direct, ours) or (ours, direct),
the time to first token one request of each in turn; the table shows the medians, the median of
the rounds' (pairs') ratios and their spread, and the machine's load average, so that the load of
a shared machine falls on both and shows. Every level is a fixed number of requests, each
bounded by a timeout.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import signal
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

from tests.support.llamacpp import find_llama_cpp  # noqa: E402
from zoo_agent.resident.config import WorkerConfig  # noqa: E402
from zoo_agent.resident.engines.llamacpp import engine_env, server_argv  # noqa: E402

LEVELS = (1, 8, 16)
MAX_BATCH, MAX_CONTEXT = 16, 512
TTFT_REQUESTS = 8
#: Requests each client sends one after another, per level: short units, many rounds, so the load of a shared machine falls on both sides.
PER_CLIENT = {1: 2, 8: 1, 16: 1}
_FRESH = itertools.count()  # a number that begins every prompt: none shares a cached beginning with another
PROMPTS = ["Tell me about the zoo", "What is a model zoo?", "Hello, how are you?", "Ask a question and the model answers it",
           "The zoo keeps every model pinned by its digest", "Adapters change how the model answers", "What is a host?", "I am fine"]  # fmt: skip


class Server:
    """One server under test, on 127.0.0.1 or (``uds``) a unix socket: started, waited for, stopped."""

    def __init__(self, label: str, cmd: list[str], port: int, env: dict[str, str], uds: str | None = None, ours: bool = False) -> None:
        self.label, self.port, self.uds, self.ours = label, port, uds, ours
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        """A client of its own per caller. One request per connection to llama-server itself, as our
        front asks it: its build here now and then closed a kept-alive connection as the next request
        was sent on it ("Server disconnected without sending a response")."""
        import httpx

        if self.uds is not None:
            return httpx.Client(transport=httpx.HTTPTransport(uds=self.uds), base_url="http://llama", timeout=600, headers={"Connection": "close"})
        return httpx.Client(base_url=self.url, timeout=600, headers={} if self.ours else {"Connection": "close"})

    def wait(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.label} exited with {self.proc.returncode} before it answered")
            try:
                with self.client() as client:
                    if client.get("/health", timeout=5).status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise SystemExit(f"{self.label} did not answer /health within {timeout:.0f}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)


def one(client: Any, prompt: str, tokens: int, model: str = "t") -> tuple[float, float, int]:
    """(time to first text, end to end, completion tokens) of one streamed chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0, first, used = time.perf_counter(), 0.0, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if not first and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                used = int(chunk["usage"]["completion_tokens"])
    end = time.perf_counter() - t0
    return first or end, end, used


def level(server: Server, clients: int, tokens: int, model: str = "t", per_client: int | None = None) -> dict[str, Any]:
    """``clients`` threads, each sending requests one after another: two each (four at one client)."""
    results: list[tuple[float, float, int]] = []
    per_client = per_client or (4 if clients == 1 else 2)

    def client(n: int) -> None:
        with server.client() as http:  # one per client thread, made before it is timed
            ready.wait(60)
            for k in range(per_client):
                results.append(one(http, f"{next(_FRESH)} " + PROMPTS[(n + k) % len(PROMPTS)], tokens, model))

    ready = threading.Event()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for th in threads:
        th.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    ready.set()
    for th in threads:
        th.join(timeout=1800)
    wall = time.perf_counter() - t0
    return {"tps": sum(r[2] for r in results) / wall, "tokens": sum(r[2] for r in results), "requests": len(results)}


def ttft(server: Server) -> float:
    """Time to first text at one client of one request of 4 tokens, its prompt sharing no beginning with another's."""
    with server.client() as http:
        return one(http, f"{next(_FRESH)} {PROMPTS[next(_FRESH) % len(PROMPTS)]}", 4)[0]


def build(work: Path, shape: str, quant: str) -> Path:
    from zoo_agent.demo.tiny import QWEN2_05B_SHAPE, build_tiny_model

    build = find_llama_cpp()
    if build is None:
        raise SystemExit("llama.cpp is not built: bash .ci/llama-cpp")
    hf = build_tiny_model(work / "hf", **(QWEN2_05B_SHAPE if shape == "qwen2-0.5b" else {}))  # type: ignore[arg-type]
    f32 = build.convert(hf, work / "m-f32.gguf", "f32")
    if quant == "f32":
        return f32
    out = build.quantize(f32, work / f"m-{quant}.gguf", quant)
    f32.unlink()
    return out


def measure(shape: str, quant: str, tokens: int, rounds: int) -> dict[str, Any]:
    """Both servers up (idle, each costs its memory only), asked in turn: for each level, ``rounds``
    rounds of (peer, ours) or (ours, peer), so that a change in the machine's load falls on both."""
    build_dir = find_llama_cpp()
    assert build_dir is not None
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-llama-", dir=HERE.parent))
    servers: dict[str, Server] = {}
    measured: dict[str, Any] = {"peer": {}, "ours": {}, "ratios": {}}
    try:
        gguf = build(work, shape, quant)
        files = [{"path": gguf.name, "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(), "size": gguf.stat().st_size}]
        zoo, index = work / "zoo", work / "index.json"
        index.write_text(json.dumps({
            "models": {"m": {"version": "1", "format": "gguf", "source": {"type": "file", "path": str(work)}, "license": "MIT", "files": files}},
            "tenants": {"t": {"model": "m", "backend": "llama.cpp", "generation": {"temperature": 0, "max_tokens": tokens},
                              "resources": {"max_batch": MAX_BATCH, "max_context": MAX_CONTEXT, "max_queue": 64}}},
            "hosts": {"h": {"resident": "t"}}}))  # fmt: skip
        subprocess.run([*AGENT, "apply", "--root", str(zoo), "--index", str(index), "--host", "h"], check=True, capture_output=True)
        published = next((zoo / "models" / "m" / "current").resolve().glob("*.gguf"))
        port = free_port()
        config = WorkerConfig(tenant="t", model="m", version="1", version_dir=published.parent, max_batch=MAX_BATCH, max_context=MAX_CONTEXT,
                              defaults={"temperature": 0, "max_tokens": tokens})  # fmt: skip
        (work / "slots").mkdir(exist_ok=True)
        cmd = [*server_argv(str(build_dir.server), config, published, "127.0.0.1", work / "slots"), "--port", str(port)]
        servers["peer"] = Server("llama-server directly", cmd, port, engine_env())
        port = free_port()
        cmd = [*AGENT, "resident", "--root", str(zoo), "--index", str(index), "--host", "h", "--listen", f"127.0.0.1:{port}",
               "--llama-server", str(build_dir.server)]  # fmt: skip
        servers["ours"] = Server("ours: a llama.cpp tenant through the router", cmd, port, dict(os.environ), ours=True)
        for server in servers.values():
            server.wait()
            with server.client() as http:
                one(http, PROMPTS[0], 4)  # warm: the first forward pages the weights in
        print(f"==> {shape}, {quant}: llama-server directly vs ours, {rounds} rounds each", file=sys.stderr, flush=True)
        measured["samples"], measured["spread"], measured["load"] = {}, {}, []
        for clients in ("ttft", *map(str, LEVELS)):
            samples: dict[str, list[float]] = {"peer": [], "ours": []}
            for r in range(rounds * TTFT_REQUESTS if clients == "ttft" else rounds):  # TTFT: one request a side, in turn
                measured["load"].append(os.getloadavg()[0])
                for key in ("peer", "ours") if r % 2 == 0 else ("ours", "peer"):
                    samples[key].append(ttft(servers[key]) if clients == "ttft" else level(servers[key], int(clients), tokens, per_client=PER_CLIENT[int(clients)])["tps"])
            for key in samples:
                measured[key][clients] = statistics.median(samples[key])
            ratios = [o / p for o, p in zip(samples["ours"], samples["peer"], strict=True)]
            measured["ratios"][clients] = statistics.median(ratios)
            measured["spread"][clients] = [min(ratios), max(ratios)]
            measured["samples"][clients] = samples
            shown = {k: [round(v * 1000 if clients == "ttft" else v, 1) for v in (sorted(vs) if clients == "ttft" else vs)] for k, vs in samples.items()}
            print(f"    {clients:>4}: {shown} ({'ms' if clients == 'ttft' else 'tok/s'}; load {measured['load'][-1]:.1f})", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return measured


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM runs the finally blocks: no server left behind
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shape", choices=["tiny", "qwen2-0.5b"], default="qwen2-0.5b")
    parser.add_argument("--quant", choices=["f32", "q8_0", "q4_k_m"], default="q4_k_m")
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each level, the two servers in turn (medians)")
    args = parser.parse_args()
    label = f"{'Qwen2-0.5B shape' if args.shape == 'qwen2-0.5b' else 'tiny model'} {args.quant}"
    m = measure(args.shape, args.quant, args.tokens, args.rounds)
    ours, peer = m["ours"], m["peer"]
    where = f"median of {args.rounds}, load {min(m['load']):.1f}-{max(m['load']):.1f}"
    rows: list[dict[str, Any]] = []
    for clients in map(str, LEVELS):
        low, high = m["spread"][clients]
        rows.append({"name": f"{clients} client(s): aggregate tok/s, a llama.cpp tenant ({label}, {args.tokens} tokens; {where}; ratios {low:.2f}-{high:.2f})",
                     "ours_text": f"{ours[clients]:.1f} tok/s", "peer": "llama-server directly", "peer_text": f"{peer[clients]:.1f} tok/s",
                     "ratio": m["ratios"][clients], "goal": ">= 0.97"})  # fmt: skip
    deltas = [1000 * (o - p) for o, p in zip(m["samples"]["ttft"]["ours"], m["samples"]["ttft"]["peer"], strict=True)]
    quartiles = statistics.quantiles(deltas, n=4)
    rows.append({"name": f"1 client: time to first token, p50 of {len(deltas)} pairs ({label}; ours - direct per pair: median "
                         f"{statistics.median(deltas):+.1f} ms, quartiles {quartiles[0]:+.1f} / {quartiles[2]:+.1f} ms; load {min(m['load']):.1f}-{max(m['load']):.1f})",
                 "ours_s": ours["ttft"],
                 "peer": "llama-server directly", "peer_s": peer["ttft"], "ratio": m["ratios"]["ttft"], "goal": "<= +2 ms (ours/peer)"})  # fmt: skip
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "shape": args.shape, "quant": args.quant, "tokens": args.tokens,
                                         "measured": m, "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
