"""An API client run in the container's network namespace (its 127.0.0.1): standard library only.

`loop STOPFILE`: chat requests one after another until STOPFILE exists (at most 300 s or
2,000 requests), then prints {"ok", "failed", "errors", "fingerprints"}.
`long MAX_TOKENS`: one streamed request that ignores end-of-sequence; prints what arrived.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

URL = "http://127.0.0.1:8000/v1/chat/completions"


def chat(body: dict[str, object], timeout: float = 60) -> urllib.request._UrlopenRet:
    data = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hello"}], **body}).encode()
    return urllib.request.urlopen(urllib.request.Request(URL, data, {"content-type": "application/json"}), timeout=timeout)


def loop(stop: Path) -> dict[str, object]:
    ok, failed, errors, fingerprints = 0, 0, [], {}
    deadline = time.monotonic() + 300
    for _ in range(2000):
        if stop.exists() or time.monotonic() > deadline:
            break
        try:
            with chat({"max_tokens": 4}) as response:
                fp = json.load(response)["system_fingerprint"]
                fingerprints[fp] = fingerprints.get(fp, 0) + 1
                ok += 1
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failed += 1
            errors.append(str(exc)[:200])
    return {"ok": ok, "failed": failed, "errors": errors[:5], "fingerprints": fingerprints}


def long(max_tokens: int) -> dict[str, object]:
    chunks, done, finish = 0, False, None
    try:
        with chat({"max_tokens": max_tokens, "ignore_eos": True, "stream": True}, timeout=120) as response:
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
    mode, arg = sys.argv[1], sys.argv[2]
    print(json.dumps(loop(Path(arg)) if mode == "loop" else long(int(arg))), flush=True)
