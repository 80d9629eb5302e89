"""Checkpoint restore benchmark (issue #36): the first token of a session restored from a named
checkpoint, against the same conversation resumed from its own files and prefilled again.

    .venv/bin/python bench/checkpoints.py [--shape tiny|qwen2-0.5b] [--tokens 1000] [--runs 15] [--json bench/checkpoints.json]

A session with one long turn (about --tokens tokens) is committed with its cache, checkpointed,
and goes on for another turn. Then, --runs times each, the next turn (one new token) of:
the checkpoint restored as a new session (its frozen cache), the same files copied by hand
under a new id (what a session resumed after a restart has), and the checkpoint restored with
its cache removed (a re-prefill from the transcript). The answers must be the same token.
Also timed: the checkpoint and the restore themselves (file work only: links, a transcript).
One of bench/run's rows (``--only checkpoints``); docs/sessions.md quotes it.
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
    parser.add_argument("--shape", choices=("tiny", "qwen2-0.5b"), default="tiny")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from zoo_agent.demo.tiny import QWEN2_05B_SHAPE, build_tiny_model
    from zoo_agent.resident.engine.base import Generated, Request
    from zoo_agent.resident.sessions.checkpoints import Checkpoints
    from zoo_agent.resident.sessions.prompt import conversation_ids
    from zoo_agent.resident.sessions.store import Sessions, Turn
    from zoo_agent.resident.worker.backend import TransformersBackend

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-checkpoints-"))
    shape: dict[str, Any] = QWEN2_05B_SHAPE if args.shape == "qwen2-0.5b" else {}
    model_dir = build_tiny_model(work / "model", **shape)
    base = work / "t"
    b = TransformersBackend(model_dir, allow_pickle=False, allow_code=False, device="cpu")
    b.load()
    b.sessions = Sessions(base, model_key="m@1", dtype=b.dtype, template=str(b.tokenizer.chat_template))
    store = Checkpoints(base)

    def ask(sid: str, text: str, tokens: int) -> tuple[tuple[float, float], str, Turn]:
        """(Seconds, CPU seconds of this process) to the first token (streamed: the turn's commit and cache save come after it),
        the reply, the turn. The CPU time is what a busy machine's other work does not add to."""
        loaded = b.sessions.load(sid)
        history = loaded.turns if loaded else []
        turn = Turn(sid, [{"role": "user", "content": text}], history=history, cache="pending" if history else "none")
        result = Generated()
        started, cpu = time.perf_counter(), time.process_time()
        first: tuple[float, float] | None = None
        for _ in b.stream(Request(None, "", tokens, 0.0, 1.0, ignore_eos=True, session=turn), result):
            first = first or (time.perf_counter() - started, time.process_time() - cpu)
        return first or (time.perf_counter() - started, time.process_time() - cpu), result.text, turn

    words, n = [], 0
    while n < args.tokens - 8:  # grow the user message until the prompt is about --tokens long
        words += WORDS
        n = len(conversation_ids(b.tokenizer, [], [{"role": "user", "content": " ".join(words)}]))
    ask("long", " ".join(words), 8)
    started = time.perf_counter()
    store.create("long", "cp", keep=10)
    checkpoint_s = time.perf_counter() - started
    ask("long", "and then?", 8)  # the session goes on past its checkpoint

    times: dict[str, list[float]] = {"restored": [], "resumed": [], "re-prefilled": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    restore_s, answers = [], set()
    kinds = list(times)
    for i in range(args.runs):
        for how in kinds[i % 3 :] + kinds[: i % 3]:  # each kind first in turn: a busy machine's noise is shared
            sid = f"{how.replace('-', '')}{i}"
            started = time.perf_counter()
            if how == "resumed":  # the checkpoint's files copied by hand: a session as a restart finds it
                frozen = base / "checkpoints" / "long" / "cp"
                document = json.loads((frozen / "session.json").read_text())
                (base / "sessions" / f"{sid}.json").write_text(json.dumps({**document, "id": sid}))
                shutil.copy(frozen / "long.safetensors", base / "kv-cache" / f"{sid}.safetensors")
            else:
                store.restore("cp", sid)
                if how == "restored":
                    restore_s.append(time.perf_counter() - started)
                else:
                    (base / "kv-cache" / f"{sid}.safetensors").unlink()
            seconds, text, turn = ask(sid, "and?", 2)
            assert turn.cache == ("re-prefilled" if how == "re-prefilled" else "restored"), (how, turn.cache)
            times[how].append(seconds[0])
            cpu[how].append(seconds[1])
            answers.add(text)
    assert len(answers) == 1, f"the three disagree: {answers}"
    restored, resumed, prefill = (statistics.median(times[k]) for k in ("restored", "resumed", "re-prefilled"))
    rows = [
        {"name": f"first token, {n}-token session restored from a checkpoint", "ours_s": restored, "peer": "resumed from its own files",
         "peer_s": resumed, "ratio": resumed / restored, "goal": "ratio ~ 1"},
        {"name": f"first token, {n}-token session restored from a checkpoint", "ours_s": restored, "peer": "re-prefill from transcript",
         "peer_s": prefill, "ratio": prefill / restored, "goal": "ratio > 1; < 5 s"},
        {"name": "the checkpoint itself (links, a transcript)", "ours_s": checkpoint_s, "peer": "", "peer_s": None, "ratio": None, "goal": "< 5 s"},
        {"name": "the restore itself (links, a transcript)", "ours_s": statistics.median(restore_s), "peer": "", "peer_s": None, "ratio": None,
         "goal": "< 5 s"},
    ]  # fmt: skip
    size = (base / "checkpoints" / "long" / "cp" / "long.safetensors").stat().st_size
    print(f"\ncheckpoint restore, {args.shape} shape, {n}-token prompt, cache file {size / 2**20:.1f} MiB, CPU 2 threads, median of {args.runs}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "tokens": n, "cache_bytes": size, "rows": rows}, indent=2) + "\n")
    for label, measured in (("fastest of the runs", {k: min(v) for k, v in times.items()}), ("median CPU time", {k: statistics.median(v) for k, v in cpu.items()})):
        print(f"{label}: restored {measured['restored'] * 1e3:.1f} ms, resumed {measured['resumed'] * 1e3:.1f} ms, "
              f"re-prefilled {measured['re-prefilled'] * 1e3:.1f} ms (re-prefilled / restored {measured['re-prefilled'] / measured['restored']:.2f})")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
