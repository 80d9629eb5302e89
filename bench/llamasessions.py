"""A llama.cpp tenant's session after a page-out (issue #33): the next turn's first token with the
session's hibernated slot restored, against the same conversation prefilled again (what
`llama-server` alone does with a conversation it no longer holds).

    .venv/bin/python bench/llamasessions.py [--shape tiny|qwen2-0.5b] [--quant q8_0] [--tokens 2000] [--runs 5] [--json FILE]

One resident serves tenant t (`max_batch` 1, `max_context` 4096, greedy) from the tests' tiny
transformers model (or its Qwen2-0.5B shape, random weights) converted to GGUF by the pinned
llama.cpp source's converter and quantized by its `llama-quantize` (.ci/llama-cpp builds both).
A session's one long turn (about --tokens prompt tokens) is committed, its slot saved. Then,
--runs times each, alternating: the tenant is paged out and in again (`POST /models/unload`,
`/models/load`: a fresh `llama-server`, no slot holds anything), and the next turn (streamed, 4
tokens) of a copy of the session is timed to its first text: a copy with the saved slot (restored)
or without it (re-prefilled). The answers must be the same.
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
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import AGENT, free_port  # noqa: E402

from tests.support.llamacpp import find_llama_cpp  # noqa: E402

WORDS = "zoo model host tenant adapter digest version answer question pinned serves keeps changes every time set".split()


def build(work: Path, shape: str, quant: str) -> Path:
    from zoo_agent.demo.tiny import QWEN2_05B_SHAPE, build_tiny_model

    llama = find_llama_cpp()
    if llama is None:
        raise SystemExit("llama.cpp is not built: bash .ci/llama-cpp")
    hf = build_tiny_model(work / "hf", **(QWEN2_05B_SHAPE if shape == "qwen2-0.5b" else {}))  # type: ignore[arg-type]
    f32 = llama.convert(hf, work / "m-f32.gguf", "f32")
    if quant == "f32":
        return f32
    out = llama.quantize(f32, work / f"m-{quant}.gguf", quant)
    f32.unlink()
    return out


def first_text(http: Any, sid: str) -> tuple[float, str, dict[str, Any]]:
    """One streamed turn: seconds to its first text, its whole text, its ``x_zoo.session``."""
    body = {"model": "t", "session": sid, "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "And then?"}]}
    started, first, text = time.perf_counter(), None, ""
    report: dict[str, Any] = {}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece and first is None:
                    first = time.perf_counter() - started
                text += piece or ""
            report = event.get("x_zoo", {}).get("session", report)
    return (first if first is not None else time.perf_counter() - started), text, report


def cycle(http: Any) -> None:
    """Page the tenant out and in again: a fresh llama-server whose slots hold nothing."""
    for action in ("unload", "load"):
        answer = http.post(f"/models/{action}", json={"model": "t"}, timeout=600)
        assert answer.status_code == 200, answer.text


def measure(shape: str, quant: str, tokens: int, runs: int) -> dict[str, Any]:
    import httpx

    llama = find_llama_cpp()
    assert llama is not None
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-llamasessions-", dir=HERE.parent))
    proc = None
    try:
        gguf = build(work, shape, quant)
        files = [{"path": gguf.name, "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(), "size": gguf.stat().st_size}]
        zoo, index = work / "zoo", work / "index.json"
        index.write_text(json.dumps({
            "models": {"m": {"version": "1", "format": "gguf", "source": {"type": "file", "path": str(work)}, "license": "MIT", "files": files}},
            "tenants": {"t": {"model": "m", "backend": "llama.cpp", "pinned": False, "generation": {"temperature": 0, "max_tokens": 4},
                              "resources": {"max_batch": 1, "max_context": 4096}}},
            "hosts": {"h": {"resident": "t"}}}))  # fmt: skip
        subprocess.run([*AGENT, "apply", "--root", str(zoo), "--index", str(index), "--host", "h"], check=True, capture_output=True)
        port = free_port()
        cmd = [*AGENT, "resident", "--root", str(zoo), "--index", str(index), "--host", "h", "--listen", f"127.0.0.1:{port}",
               "--llama-server", str(llama.server)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    if http.get("/health").json().get("tenants", {}).get("t", {}).get("state") == "serving":
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.5)
            long = " ".join(WORDS[i % len(WORDS)] for i in range(tokens * 5 // 8))  # about 1.6 tokens a word, with the template
            first = http.post("/v1/chat/completions", json={"model": "t", "session": "talk", "messages": [{"role": "user", "content": long}]})
            assert first.status_code == 200, first.text
            prompt_tokens = first.json()["usage"]["prompt_tokens"]
            tenant = zoo / "resident" / "tenants" / "t"
            transcript = json.loads((tenant / "sessions" / "talk.json").read_text())
            (saved,) = (tenant / "slots").glob("talk+*.bin")  # and talk+*.bin.sha256 beside it
            slot_bytes = saved.stat().st_size
            samples: dict[str, list[float]] = {"restored": [], "re-prefilled": []}
            texts, reports = set(), []
            print(f"==> {shape} {quant}: a {prompt_tokens}-token conversation, {runs} runs each", file=sys.stderr, flush=True)
            for run in range(runs):
                for kind in ("restored", "re-prefilled") if run % 2 == 0 else ("re-prefilled", "restored"):
                    sid = f"{'hibernated' if kind == 'restored' else 'plain'}-{run}"
                    (tenant / "sessions" / f"{sid}.json").write_text(json.dumps({**transcript, "id": sid}))
                    if kind == "restored":  # the saved slot and its digest, under the copy's name
                        for suffix in ("", ".sha256"):
                            shutil.copyfile(f"{saved}{suffix}", tenant / "slots" / (saved.name.replace("talk+", f"{sid}+") + suffix))
                    cycle(http)
                    seconds, text, report = first_text(http, sid)
                    assert report.get("cache") == kind, (kind, report)
                    samples[kind].append(seconds)
                    texts.add(text)
                    reports.append(report)
                    print(f"    {kind:>12}: {seconds * 1000:.0f} ms", file=sys.stderr, flush=True)
            assert len(texts) == 1, texts  # the restored slot and the re-prefill: the same answer
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {"shape": shape, "quant": quant, "prompt_tokens": prompt_tokens, "slot_bytes": slot_bytes,
            "samples_ms": {k: [round(x * 1000, 1) for x in v] for k, v in samples.items()},
            "median_ms": {k: round(v * 1000, 1) for k, v in medians.items()}, "speedup": round(medians["re-prefilled"] / medians["restored"], 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=["tiny", "qwen2-0.5b"], default="tiny")
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    m = measure(args.shape, args.quant, args.tokens, args.runs)
    label = f"{'Qwen2-0.5B shape' if args.shape == 'qwen2-0.5b' else 'tiny model'} {args.quant}, {m['prompt_tokens']} tokens"
    print(f"| {'llama.cpp session after a page-out':<40} | first token, median of {args.runs} |")
    print(f"| {'---':<40} | {'---':<30} |")
    print(f"| {label + ', slot restored':<40} | {m['median_ms']['restored']:>8.1f} ms {'':<18} |")
    print(f"| {label + ', re-prefilled':<40} | {m['median_ms']['re-prefilled']:>8.1f} ms {'':<18} |")
    print(f"| {'restored vs re-prefilled':<40} | {m['speedup']:>8.2f}x {'':<20} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, **m}, indent=1) + "\n")


if __name__ == "__main__":
    main()
