"""Session resume benchmark (issues #9, #21): continue a long conversation from its saved KV
cache versus prefilling it again from the transcript, same model, same run; and the same on
returning to a model after the session moved to another one (a route session).

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

    from zoo_agent.demo.tiny import QWEN2_05B_SHAPE, build_tiny_model
    from zoo_agent.resident.engine.base import Generated, Request
    from zoo_agent.resident.sessions.prompt import conversation_ids
    from zoo_agent.resident.sessions.store import Sessions, Turn
    from zoo_agent.resident.worker.backend import TransformersBackend

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
    moved_r, moved_p = move_and_back(work, backend, loaded.turns[0].messages[0].content, args.runs)
    rows = [
        {"name": f"next turn of a {n}-token session: first token", "ours_s": r, "peer": "re-prefill from transcript", "peer_s": p,
         "ratio": p / r, "goal": "ratio >= 10; < 5 s"},
        {"name": f"back from another model, {n}-token route session: first token", "ours_s": moved_r,
         "peer": "re-prefill from transcript", "peer_s": moved_p, "ratio": moved_p / moved_r, "goal": "ratio >= 10"},
    ]  # fmt: skip
    print(f"\nsession resume, {args.shape} shape, {n}-token prompt, cache file {size / 2**20:.0f} MiB, CPU 2 threads, median of {args.runs}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "tokens": n, "cache_bytes": size, "rows": rows}, indent=2) + "\n")
    shutil.rmtree(work)
    return 0


def move_and_back(work: Path, large: Any, text: str, runs: int) -> tuple[float, float]:
    """A route session (issue #21): a long turn on ``large``, one on a second model with another
    tokenizer and template, then back to ``large``: its first token with its own cache for the
    session restored, against the same turn prefilled again. Medians of ``runs``."""
    from zoo_agent.demo.tiny import build_tiny_model
    from zoo_agent.resident.engine.base import Generated, Request
    from zoo_agent.resident.sessions.store import Sessions, Turn
    from zoo_agent.resident.worker.backend import TransformersBackend

    route = work / "route"
    small = TransformersBackend(build_tiny_model(work / "small", seed=3, vocab=400, chat_template=_OTHER), allow_pickle=False,
                                allow_code=False, device="cpu")  # fmt: skip
    small.load()

    def sessions(b: Any, key: str) -> Sessions:
        return Sessions(route, model_key=key, dtype=b.dtype, template=str(b.tokenizer.chat_template), route="r")

    on_large, on_small = sessions(large, "m@1"), sessions(small, "s@1")

    def ask(b: Any, store: Sessions, content: str, tokens: int) -> Turn:
        transcript = store.load("moved")
        history = transcript.turns if transcript else []
        new = [{"role": "user", "content": content}]
        ids = b.session_prompt(history, new, None, native=store.native)[1]
        turn = Turn("moved", new, history=history, cache="pending" if history else "none", prompt_ids=ids, store=store)
        b.complete(Request(None, "", tokens, 0.0, 1.0, ignore_eos=True, session=turn), Generated())
        return turn

    ask(large, on_large, text, 8)
    ask(small, on_small, "and the lions?", 8)
    transcript = (route / "sessions" / "moved.json").read_bytes()
    cache = on_large.cache_path("moved", None)
    saved = cache.read_bytes()
    times: dict[str, list[float]] = {"restored": [], "re-prefilled": []}
    for how in [*["restored"] * runs, *["re-prefilled"] * runs]:
        if how == "restored":
            cache.write_bytes(saved)
        else:
            cache.unlink(missing_ok=True)
        started = time.perf_counter()
        turn = ask(large, on_large, "back to you", 1)
        times[how].append(time.perf_counter() - started)
        assert turn.cache == how, (turn.cache, how)
        (route / "sessions" / "moved.json").write_bytes(transcript)  # every run returns from the same transcript
    return statistics.median(times["restored"]), statistics.median(times["re-prefilled"])


_OTHER = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
