"""Session resume benchmark (issue #9): continue a long conversation from its saved KV cache
versus prefilling it again from the transcript, same model, same run.

    .venv/bin/python bench/sessions.py [--shape qwen2-0.5b|tiny] [--tokens 2000] [--json bench/sessions.json]

A session with one long turn (about --tokens tokens) is committed, with its cache saved.
Then a fresh backend (weights loaded, as after a restart) answers the next turn with one
new token: once with the cache file there (restore) and once without it (re-prefill from
the transcript). The answers must be the same token; the table gives the two times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import table  # noqa: E402

WORDS = "zoo model host tenant adapter digest version answer question pinned serves keeps changes every time set".split()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=("qwen2-0.5b", "tiny"), default="qwen2-0.5b")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from zoo_agent.resident.backend import Generated, Request, TransformersBackend
    from zoo_agent.resident.prompt import conversation_ids
    from zoo_agent.resident.sessions import Sessions, Turn
    from zoo_agent.resident.tiny import QWEN2_05B_SHAPE, build_tiny_model

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-sessions-"))
    shape: dict[str, Any] = QWEN2_05B_SHAPE if args.shape == "qwen2-0.5b" else {}
    print(f"building the {args.shape} model in {work} ...", file=sys.stderr)
    model_dir = build_tiny_model(work / "model", **shape)

    def fresh(sessions_dir: Path) -> Any:
        b = TransformersBackend(model_dir, allow_pickle=False, allow_code=False, device="cpu")
        b.load()
        b.sessions = Sessions(sessions_dir, model_key="m@1", dtype=b.dtype, template=str(b.tokenizer.chat_template))
        return b

    first = fresh(work / "s")
    words, n = [], 0
    while n < args.tokens - 8:  # grow the user message until the prompt is about --tokens long
        words += WORDS
        n = len(conversation_ids(first.tokenizer, [], [{"role": "user", "content": " ".join(words)}]))
    started = time.perf_counter()
    first.complete(Request(None, "", 8, 0.0, 1.0, ignore_eos=True, session=Turn("long", [{"role": "user", "content": " ".join(words)}])), Generated())
    print(f"first turn ({n} prompt tokens) took {time.perf_counter() - started:.1f}s", file=sys.stderr)
    transcript = json.loads((work / "s" / "sessions" / "long.json").read_text())
    loaded = first.sessions.load("long")
    assert loaded is not None
    history = loaded.turns

    def next_turn(b: Any, sessions_dir: Path) -> tuple[float, str, str]:
        turn = Turn("long", [{"role": "user", "content": "and?"}], history=history, cache="pending")
        started = time.perf_counter()
        result = Generated()
        b.complete(Request(None, "", 1, 0.0, 1.0, session=turn), result)
        seconds = time.perf_counter() - started
        shutil.rmtree(sessions_dir / "sessions")  # the next run starts from the same transcript
        (sessions_dir / "sessions").mkdir()
        (sessions_dir / "sessions" / "long.json").write_text(json.dumps(transcript))
        return seconds, result.text, turn.cache

    restore, prefill, answers = [], [], set()
    backend = fresh(work / "s")
    for _ in range(args.runs):
        shutil.copy(work / "s" / "kv-cache" / "long.safetensors", work / "saved.safetensors")
        seconds, text, how = next_turn(backend, work / "s")
        assert how == "restored", how
        restore.append(seconds)
        answers.add(text)
        shutil.copy(work / "saved.safetensors", work / "s" / "kv-cache" / "long.safetensors")
    for _ in range(args.runs):
        (work / "s" / "kv-cache" / "long.safetensors").unlink(missing_ok=True)
        seconds, text, how = next_turn(backend, work / "s")
        assert how == "re-prefilled", how
        prefill.append(seconds)
        answers.add(text)
    assert len(answers) == 1, f"restore and re-prefill disagree: {answers}"
    size = (work / "saved.safetensors").stat().st_size
    r, p = statistics.median(restore), statistics.median(prefill)
    rows = [
        {"name": f"next turn of a {n}-token session: first token", "ours_s": r, "peer": "re-prefill from transcript", "peer_s": p,
         "ratio": p / r, "goal": "ratio >= 10; < 5 s"},
    ]  # fmt: skip
    print(f"\nsession resume, {args.shape} shape, {n}-token prompt, cache file {size / 2**20:.0f} MiB, CPU 2 threads, median of {args.runs}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "tokens": n, "cache_bytes": size, "rows": rows}, indent=2) + "\n")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
