"""An API client run in the container's network namespace (its 127.0.0.1): standard library only.

`loop STOPFILE [MODEL [PAUSE]]`: chat requests to tenant MODEL (default `chat`) one after
another, PAUSE seconds apart (default 0), until STOPFILE exists (at most 300 s or 2,000
requests), then prints {"ok", "failed", "errors", "fingerprints", "answered"}: `answered`
is the CLOCK_MONOTONIC second of each answer (the host's clock: the test compares it with
its own).
`long MAX_TOKENS [MODEL]`: one streamed request that ignores end-of-sequence; prints what arrived.
`get PATH`: the body of GET PATH (e.g. /health, whatever its status).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

URL = "http://127.0.0.1:8000/v1/chat/completions"


def chat(body: dict[str, object], timeout: float = 60, model: str = "chat") -> urllib.request._UrlopenRet:
    data = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}], **body}).encode()
    return urllib.request.urlopen(urllib.request.Request(URL, data, {"content-type": "application/json"}), timeout=timeout)


def loop(stop: Path, model: str = "chat", pause: float = 0.0) -> dict[str, object]:
    ok, failed = 0, 0
    errors: list[str] = []
    fingerprints: dict[str, int] = {}
    answered: list[float] = []
    deadline = time.monotonic() + 300
    for _ in range(2000):
        if stop.exists() or time.monotonic() > deadline:
            break
        try:
            with chat({"max_tokens": 4}, model=model) as response:
                fp = json.load(response)["system_fingerprint"]
                fingerprints[fp] = fingerprints.get(fp, 0) + 1
                ok += 1
                answered.append(round(time.monotonic(), 3))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failed += 1
            errors.append(str(exc)[:200])
        if pause:
            time.sleep(pause)
    return {"ok": ok, "failed": failed, "errors": errors[:5], "fingerprints": fingerprints, "answered": answered}


def long(max_tokens: int, model: str = "chat") -> dict[str, object]:
    chunks, done, finish = 0, False, None
    try:
        with chat({"max_tokens": max_tokens, "ignore_eos": True, "stream": True}, timeout=120, model=model) as response:
            print("started", file=sys.stderr, flush=True)
            for raw in response:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunks += 1
                    finish = json.loads(line[6:])["choices"][0].get("finish_reason") or finish
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"chunks": chunks, "done": done, "finish": finish, "error": str(exc)[:200]}
    return {"chunks": chunks, "done": done, "finish": finish, "error": None}


if __name__ == "__main__":
    mode, arg, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "get":
        try:
            print(urllib.request.urlopen(URL.removesuffix("/v1/chat/completions") + arg, timeout=10).read().decode(), flush=True)
        except urllib.error.HTTPError as exc:
            print(exc.read().decode(), flush=True)
        sys.exit(0)
    model = rest[0] if rest else "chat"
    if mode == "loop":
        result = loop(Path(arg), model, float(rest[1]) if len(rest) > 1 else 0.0)
    else:
        result = long(int(arg), model)
    print(json.dumps(result), flush=True)
