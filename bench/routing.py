"""Routing overhead per request (issue #21): the same request to a tenant by name, and through routes.

    .venv/bin/python bench/routing.py [--requests 100] [--json bench/routing.json]

About a minute on 2 cores with the defaults. One resident (the tests' tiny model as tenants
``a`` and ``b``) with three routes that all choose ``a`` for the request below:

- ``rules``: word, keyword and code rules (no tokenizer, no model: a few regexes);
- ``similar``: a similarity rule through the tests' bag-of-words embedding model (0 layers);
- ``similar-l6``: a similarity rule through a random-weight BERT of MiniLM-L6's shape (6 layers,
  hidden 384): what a real sentence-embedding model costs per message on this CPU.

Each iteration sends the same streamed chat request (4 tokens, ``ignore_eos``) as ``model: a``
(the reference: the router's hop without a route) and through each route, in rotating order.
Time to first token is to the first data event with text (the role chunk does not count: a
routed answer holds it until the first token); total is to the end of the stream. p50s and
ratios against the reference; p90s in the JSON. Loopback only; the loop is bounded by a count
and a deadline; the resident gets SIGTERM, then SIGKILL of its process group.

Hostile messages (issue #31): the route decision (the request's parse, the rules' features,
the choice) for 1 MiB bodies of each pathological kind, in-process, against reading the same
body with ``json.loads`` (the worst kind's median); and the slowest ``/health`` answer while
those bodies go through the ``rules`` route at once, against ``/health`` when idle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import AGENT, MB, REQUEST_TIMEOUT, Resident, run, seconds, table, timed  # noqa: E402

TEXT = "could you please review my python code for bugs and errors"
TASK = "review this python code for bugs"
ROUTES = {  # every route chooses tenant a for TEXT (checked before measuring)
    "rules": {"rules": [{"tenant": "b", "when": {"code": True}}, {"tenant": "b", "when": {"keywords": ["explain", "analyze", "design"]}},
                        {"tenant": "b", "when": {"min_messages": 6}}, {"tenant": "a", "when": {"max_words": 40}}], "default": "b"},
    "similar": {"rules": [{"tenant": "a", "when": {"similar_to": TASK, "min_similarity": 0.4}}], "default": "b", "embedding_model": "e"},
    # random layers: similarities mean nothing, so the bar is the lowest; the message is embedded all the same
    "similar-l6": {"rules": [{"tenant": "a", "when": {"similar_to": TASK, "min_similarity": -1}}], "default": "b", "embedding_model": "e6"},
}  # fmt: skip
NAMES = {"a": "tenant by name", "rules": "route, word/keyword/code rules", "similar": "route, similarity (0-layer embedder)",
         "similar-l6": "route, similarity (MiniLM-L6 shape)"}  # fmt: skip


#: 1 MiB bodies (JSON writes a newline or a tab in two bytes) that cost the former rules hours, and plain ones.
HOSTILE = {"newlines": "\n" * (MB // 2 - 512), "blank lines of tabs": ("\t" * 1000 + "\n") * (MB // 2002 - 1),
           "a brace, then blanks": "{" + " " * (MB - 1024) + "x", "words": "zoo " * (MB // 4 - 256),
           "code lines": "x = f(y);\n" * (MB // 11 - 100)}  # fmt: skip


def _hostile_body(text: str) -> bytes:
    return json.dumps({"model": "rules", "messages": [{"role": "user", "content": text}], "max_tokens": 1}).encode()


def decision(rounds: int = 5) -> dict[str, dict[str, float]]:
    """Per kind: the median route decision for its 1 MiB body (parse, features, choice), and json.loads of it."""
    from zoo_agent.index.model import RouteEntry
    from zoo_agent.resident.inbound import Host, Parsed, parse_request
    from zoo_agent.resident.router import _features
    from zoo_agent.resident.routing import choose

    route = RouteEntry.model_validate(ROUTES["rules"])
    host = Host(["a", "b"], list(ROUTES), [], lambda tenant: False, {})

    def decide(body: bytes) -> str:
        parsed = parse_request("POST", "/v1/chat/completions", b"", body, host, content_type="application/json")
        assert isinstance(parsed, Parsed), parsed
        return choose(route, _features(route, parsed.document)[0]).tenant

    out = {}
    for kind, text in HOSTILE.items():
        body = _hostile_body(text)
        assert len(body) <= MB, (kind, len(body))
        out[kind] = {"decision_s": timed(lambda: decide(body), rounds), "json_loads_s": timed(lambda: json.loads(body), rounds), "bytes": len(body)}
    return out


def health_under_hostile(url: str) -> dict[str, Any]:
    """The slowest /health answer while every hostile body goes through the rules route at once, and /health idle (p50 of 20)."""
    import threading

    import httpx

    with httpx.Client() as http:
        idle = timed(lambda: http.get(url + "/health", timeout=REQUEST_TIMEOUT), 20)
        stop, seen, answers = threading.Event(), [], []

        def ask(body: bytes) -> None:
            with httpx.Client() as own:
                headers = {"content-type": "application/json"}
                answers.append(own.post(url + "/v1/chat/completions", content=body, headers=headers, timeout=REQUEST_TIMEOUT).status_code)

        askers = [threading.Thread(target=ask, args=(_hostile_body(text),)) for text in HOSTILE.values()]
        for asker in askers:
            asker.start()
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while any(a.is_alive() for a in askers) and time.monotonic() < deadline:
            start = time.perf_counter()
            http.get(url + "/health", timeout=REQUEST_TIMEOUT)
            seen.append(time.perf_counter() - start)
            time.sleep(0.02)
        for asker in askers:
            asker.join(REQUEST_TIMEOUT)
    return {"idle_p50_s": idle, "max_s": max(seen), "polls": len(seen), "answers": answers}


def _entry(src: Path) -> dict[str, Any]:
    files = [{"path": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size} for p in sorted(src.iterdir()) if p.is_file()]
    return {"version": "1", "source": {"type": "file", "path": str(src)}, "license": "MIT", "files": files}


def build(work: Path) -> Path:
    """The models, the index (tenants a and b, the three routes) and the zoo `apply` makes of it."""
    from zoo_agent.demo.tiny import build_tiny_embedder, build_tiny_model

    words = " ".join([TEXT, TASK])
    models = {"m": _entry(build_tiny_model(work / "src" / "m")), "e": _entry(build_tiny_embedder(work / "src" / "e", words)),
              "e6": _entry(build_tiny_embedder(work / "src" / "e6", words, hidden=384, layers=6))}  # fmt: skip
    gen = {"generation": {"temperature": 0, "max_tokens": 4}, "resources": {"max_batch": 4, "max_queue": 8}, "pinned": True}
    index = work / "index.json"
    index.write_text(json.dumps({"models": models, "tenants": {"a": {"model": "m", **gen}, "b": {"model": "m", **gen}}, "routes": ROUTES,
                                 "hosts": {"h": {"tenants": ["a", "b"], "routes": list(ROUTES)}}}))  # fmt: skip
    run(*AGENT, "apply", "--root", work / "zoo", "--index", index, "--host", "h")
    return index


def request(http: Any, url: str, model: str) -> tuple[float, float]:
    """(time to the first data event with text, time to the end of the stream) of one streamed chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": TEXT}], "max_tokens": 4, "ignore_eos": True, "stream": True}
    t0, first = time.perf_counter(), 0.0
    with http.stream("POST", url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if first or not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"{model}: {line}")
            if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                first = time.perf_counter() - t0
    if not first:
        raise RuntimeError(f"{model}: the stream carried no token")
    return first, time.perf_counter() - t0


def check(http: Any, url: str) -> dict[str, Any]:
    """Every route chooses tenant a for the request (else the comparison is not like for like)."""
    seen = {}
    for rid in ROUTES:
        body = {"model": rid, "messages": [{"role": "user", "content": TEXT}], "max_tokens": 1}
        route = http.post(url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT).raise_for_status().json()["x_zoo"]["route"]
        if route["tenant"] != "a" or ("similar" in rid) != ("similarity" in route):
            raise RuntimeError(f"route {rid} chose {route}, not tenant a")
        seen[rid] = route
    return seen


def measure(url: str, requests: int) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    import httpx

    targets = ["a", *ROUTES]
    samples: dict[str, dict[str, list[float]]] = {t: {"ttft": [], "total": []} for t in targets}
    with httpx.Client() as http:
        routes = check(http, url)
        for _ in range(10):  # warm connections, workers and embedders
            for t in targets:
                request(http, url, t)
        deadline = time.monotonic() + 600
        for i in range(requests):
            if time.monotonic() > deadline:
                break
            for t in targets[i % len(targets):] + targets[: i % len(targets)]:
                ttft, total = request(http, url, t)
                samples[t]["ttft"].append(ttft)
                samples[t]["total"].append(total)
    return samples, routes


def rows_of(samples: dict[str, dict[str, list[float]]], decided: dict[str, dict[str, float]], health: dict[str, Any]) -> list[dict[str, Any]]:
    n = len(samples["a"]["ttft"])
    worst = max(decided, key=lambda kind: decided[kind]["decision_s"])
    hostile = [{"name": f"route decision for a 1 MiB message (parse, rules, choice; worst of {len(decided)} kinds: {worst})",
             "ours_s": decided[worst]["decision_s"], "peer": "json.loads of the same body", "peer_s": decided[worst]["json_loads_s"],
             "ratio": decided[worst]["decision_s"] / decided[worst]["json_loads_s"], "goal": "linear in the message (former rules: hours)"},
            {"name": f"slowest /health while {len(HOSTILE)} hostile 1 MiB messages go through a route", "ours_s": health["max_s"],
             "peer": "/health when idle, p50", "peer_s": health["idle_p50_s"], "ratio": health["max_s"] / health["idle_p50_s"],
             "goal": "< 1 s (no message holds the loop)"}]  # fmt: skip
    rows = []
    for what, key in (("time to first token", "ttft"), ("total latency", "total")):
        peer = statistics.median(samples["a"][key])
        for t in ROUTES:
            ours = statistics.median(samples[t][key])
            rows.append({"name": f"{what}, p50 ({n} each): {NAMES[t]}", "ours_s": ours, "peer": f"{NAMES['a']} (model: a)", "peer_s": peer,
                         "ratio": ours / peer, "goal": f"- (here {1000 * (ours - peer):+.2f} ms)"})  # fmt: skip
    return rows + hostile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--requests", type=int, default=100, help="iterations; each sends the request once to every target")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-routing-"))
    started = time.monotonic()
    try:
        index = build(work)
        r = Resident(work, index)
        try:
            r.wait_ready()
            samples, routes = measure(r.url, args.requests)
            health = health_under_hostile(r.url)
        finally:
            r.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    decided = decision()
    rows = rows_of(samples, decided, health)
    print(table(rows))
    p90 = {t: {k: statistics.quantiles(xs, n=10)[-1] for k, xs in s.items()} for t, s in samples.items()}
    for t, q in p90.items():
        print(f"  p90 {NAMES[t]}: first token {seconds(q['ttft'])}, total {seconds(q['total'])}")
    print(f"({seconds(time.monotonic() - started)} in all, {os.cpu_count()} CPUs)")
    if args.json:
        measured = {"routes": routes, "p90_s": p90, "samples_s": samples, "hostile_decision": decided, "hostile_health": health}
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "measured": measured, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
