"""Soak benchmark (issue #36): hours of changing load on a multi-tenant resident, checked for growth.

    .venv/bin/python bench/soak.py --minutes 60 [--json bench/soak.json] [--plot docs/plots/soak.png]
    .venv/bin/python bench/soak.py --minutes 2 --interval 10 --warmup 30 --clients 2 --reload-minutes 0.75 --generous  # CI
    .venv/bin/python bench/soak.py --plot-only                                      # the plot of bench/soak.json

One resident on the tests' tiny model: three tenants (a, b, c) with a memory budget for two,
so they page in and out, and a route (``assistant``: short requests to a, the rest to b,
falling back to c). ``--clients`` threads send a mix that changes every minute (PHASES):
completions, streams, streams cancelled after their first token, sessions (each client's
own, deleted after a few turns), route requests (with and without a route session), and requests
to c, which page a or b out (most requests go to a and b). Every ``--reload-minutes`` a's and b's settings change
in the index and ``zoo-agent resident reload`` swaps the workers of those loaded while the
clients go on.

Every ``--interval`` seconds the resident's process tree (the supervisor and its workers) is
sampled: RSS, open file descriptors (/proc/<pid>/fd) and threads (/proc/<pid>/status), per
process and summed; /metrics's queue gauges (``zoo:router_requests_waiting``, in-flight);
/health; requests and errors since the last sample.

It fails (exit 1) on any failed request (an HTTP error, an SSE error event, a dropped
connection we did not close on purpose, a failed reload), on a worker that crashed, on a
resident that died, or on growth: after the ``--warmup``, the median of the last third of
the samples above the first third's times a ratio plus an absolute slack (TOLERANCES).
Unhandled exceptions in the resident's log (its stderr, as journald keeps it) are counted
and shown, not failed on: they are the resident's to fix, and no request failed with them.
``--generous`` multiplies each tolerance by 4: a 2-minute run on a busy 2-core machine is
about zero failed requests and no crash, not about a trend.

Only public surfaces of the resident are used (its HTTP API, /health, /metrics, the CLI), so
that it measures whatever the resident is made of. Everything is on 127.0.0.1; every loop is
bounded by a count and the deadline; the resident is stopped (SIGTERM, then SIGKILL of its
process group) in a ``finally`` block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]
from common import AGENT, MB, Resident, seconds, table  # noqa: E402

TENANTS = ["a", "b", "c"]
SERVED = ["a", "b"]  # what most requests ask for (the budget holds two); c comes in with "page" requests and route fallbacks
ROUTE = "assistant"
PHASES = [  # one a minute, in turn: the weights of each kind of request (a "page" costs two worker starts)
    {"complete": 3, "stream": 2, "cancel": 1, "session": 2, "route": 1, "page": 1},  # a bit of everything
    {"stream": 3, "cancel": 3, "complete": 1},  # streams, half of them cancelled after the first token
    {"session": 3, "route": 3, "route_session": 2, "complete": 1},  # conversations, by tenant and through the route
    {"page": 1, "complete": 2, "stream": 1, "cancel": 1},  # short requests, and c paging in
]
TOLERANCES: dict[str, tuple[float, float]] = {  # series -> (ratio, absolute slack): last third's median <= first's * ratio + slack
    "router_rss": (1.10, 24 * MB),  # the supervisor (router): allocator noise, no trend
    "router_fds": (1.0, 8),  # sockets of requests in flight come and go
    "router_threads": (1.0, 4),
    "worker_rss": (1.15, 48 * MB),  # the largest worker (a serving one: a worker still loading is smaller)
    "worker_fds": (1.0, 8),
    "worker_threads": (1.0, 4),
    "tree_rss": (1.25, 96 * MB),  # everything: how many workers are loaded when the sample is taken varies (paging, reloads)
    "processes": (1.0, 2),
}
GENEROUS = 4.0
WORDS = ["zoo", "model", "host", "tenant", "adapter", "digest", "version", "answer", "question", "pinned", "serves", "keeps", "changes"]
SESSION_TURNS = 4  # a session is deleted after this many turns: the disk stays bounded
MAX_REQUESTS = 1_000_000  # per client: a bound besides the deadline


def tiny_model(directory: Path) -> Path:
    """The tests' tiny model (random weights), built as `zoo-agent demo` builds it."""
    from zoo_agent.demo.tiny import build_tiny_model

    return Path(build_tiny_model(directory))


class Soak:
    """The zoo, the index (rewritten for each reload) and what the clients and the sampler counted."""

    def __init__(self, work: Path, src: Path, budget_footprints: float) -> None:
        self.work, self.root, self.index = work, work / "zoo", work / "index.json"
        files = [{"path": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size} for p in sorted(src.iterdir())]
        self.model = {"version": "v1", "source": {"type": "file", "path": str(src)}, "license": "MIT", "files": files}
        self.budget_footprints = budget_footprints
        self.budget: int | None = None
        self.reloads = 0
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.window: Counter[str] = Counter()  # since the last sample: "ok", "failed", "cancelled"
        self.errors: list[str] = []
        self.request_timeout = 300.0  # the most a client waits for the next bytes of an answer

    def document(self) -> dict[str, Any]:
        tenants = {t: {"model": "m", "generation": {"temperature": 0, "max_tokens": 8 + (t in SERVED) * (self.reloads % 2)},
                       "resources": {"max_batch": 4, "max_queue": 32}} for t in TENANTS}  # fmt: skip
        route = {"rules": [{"tenant": "a", "when": {"max_words": 6}, "name": "short"}], "default": "b", "fallback": ["c"]}
        host: dict[str, Any] = {"tenants": TENANTS, "routes": [ROUTE], **({"memory_budget": str(self.budget)} if self.budget else {})}
        return {"models": {"m": self.model}, "tenants": tenants, "routes": {ROUTE: route}, "hosts": {"h": host}}

    def write_index(self) -> None:
        tmp = self.index.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.document()))
        os.replace(tmp, self.index)

    def cli(self, group: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """``zoo-agent GROUP --root .. --index .. --host h ARGS`` (a group's options come before its command)."""
        return subprocess.run([*AGENT, group, "--root", str(self.root), "--index", str(self.index), "--host", "h", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip

    def size_budget(self) -> None:
        """Room for ``budget_footprints`` tenants. The budget counts the larger of the estimate and what
        a load measured, so a resident without a budget loads one tenant first and /metrics says
        what it counts (``zoo:model_footprint_bytes``)."""
        import httpx

        self.budget = None
        self.write_index()
        probe = Resident(self.work, self.index)
        try:
            probe.wait_ready()
            counted = metric_max(httpx.get(probe.url + "/metrics", timeout=30).text, "zoo:model_footprint_bytes")
        finally:
            probe.stop()
        if counted <= 0:
            raise RuntimeError("/metrics: no zoo:model_footprint_bytes of a loaded tenant")
        self.budget = int(counted * self.budget_footprints)
        self.write_index()

    def record(self, kind: str, outcome: str, error: str | None = None) -> None:
        with self.lock:
            self.requests[f"{kind}:{outcome}"] += 1
            self.window[outcome] += 1
            if error is not None and len(self.errors) < 50:
                self.errors.append(f"{time.strftime('%H:%M:%S')} {kind}: {error}"[:500])

    def take_window(self) -> Counter[str]:
        with self.lock:
            window, self.window = self.window, Counter()
            return window


# ---- the clients -------------------------------------------------------------------------


class Failed(Exception):
    """A request that did not succeed (what the soak counts and fails on)."""


def message(rng: random.Random, short: bool) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(2, 5) if short else rng.randint(8, 24)))


def check(resp: Any) -> dict[str, Any]:
    if resp.status_code != 200:
        raise Failed(f"HTTP {resp.status_code}: {resp.text[:200]}")
    body: dict[str, Any] = resp.json()
    if not body.get("choices"):
        raise Failed(f"no choices: {resp.text[:200]}")
    return body


def stream(http: Any, url: str, body: dict[str, Any], cancel: bool, seen: list[str] | None = None) -> str:
    """Reads the stream to its end ("ok"), or closes it after the first token ("cancelled"). ``seen``
    gets what came so far ("head", "comment", "data"), for the error line of a request that failed."""
    seen = [] if seen is None else seen
    with http.stream("POST", url, json={**body, "stream": True}) as resp:
        seen.append(f"head {resp.status_code}")
        if resp.status_code != 200:
            resp.read()
            raise Failed(f"HTTP {resp.status_code}: {resp.text[:200]}")
        done = False
        for line in resp.iter_lines():
            if line and (not seen or seen[-1] != line[:6]):
                seen.append(line[:6])
            if line.startswith("data: {"):
                if '"error"' in line:
                    raise Failed(f"error event: {line[:200]}")
                if cancel:
                    return "cancelled"  # leaving the block closes the connection mid-stream
            elif line.strip() == "data: [DONE]":
                done = True
        if not done:
            raise Failed("the stream ended without [DONE]")
    return "ok"


class Client(threading.Thread):
    """One client: a request of the current phase's mix at a time, until the deadline."""

    def __init__(self, soak: Soak, url: str, number: int, started: float, deadline: float, seed: int) -> None:
        super().__init__(daemon=True, name=f"soak-client-{number}")
        self.soak, self.url, self.number, self.started, self.deadline = soak, url, number, started, deadline
        self.rng = random.Random(seed * 1000 + number)
        self.sessions: dict[str, int] = {}  # session id -> turns, this client's own (one request at a time each)
        self.serial = 0
        self.seen: list[str] = []  # what the current request's stream showed so far (for its error line)
        self.tenant = ""

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=httpx.Timeout(self.soak.request_timeout, connect=10.0)) as http:
            for _ in range(MAX_REQUESTS):
                now = time.monotonic()
                if now >= self.deadline:
                    return
                phase = PHASES[int((now - self.started) // 60) % len(PHASES)]
                kind = self.rng.choices(list(phase), weights=list(phase.values()))[0]
                self.seen = []
                asked = time.strftime("%H:%M:%S")
                try:
                    outcome = self.one(http, kind)
                except Failed as e:
                    self.soak.record(kind, "failed", f"{e} (asked {asked} of {self.tenant}; seen {self.seen[:6]})")
                except (httpx.HTTPError, ValueError) as e:  # a dropped connection, a timeout, a body that is not JSON
                    self.soak.record(kind, "failed", f"{type(e).__name__}: {e} (asked {asked} of {self.tenant}; seen {self.seen[:6]})")
                else:
                    self.soak.record(kind, outcome)

    def one(self, http: Any, kind: str) -> str:
        tenant = self.tenant = self.rng.choice(SERVED)
        chat = self.url + "/v1/chat/completions"
        if kind == "complete":
            check(http.post(self.url + "/v1/completions", json={"model": tenant, "prompt": message(self.rng, False), "max_tokens": 8}))
        elif kind == "page":  # c, which pages one of a and b out (and the next request pages it back in)
            check(http.post(chat, json={"model": "c", "messages": [{"role": "user", "content": message(self.rng, True)}],
                                        "max_tokens": 4}))  # fmt: skip
        elif kind in ("stream", "cancel"):
            body = {"model": tenant, "messages": [{"role": "user", "content": message(self.rng, False)}], "max_tokens": 32 if kind == "cancel" else 8}
            if kind == "cancel":
                body["ignore_eos"] = True
            return stream(http, chat, body, cancel=kind == "cancel", seen=self.seen)
        elif kind in ("session", "route_session"):
            model = ROUTE if kind == "route_session" else tenant
            self.conversation(http, model, kind)
        elif kind == "route":
            body = {"model": ROUTE, "messages": [{"role": "user", "content": message(self.rng, self.rng.random() < 0.5)}], "max_tokens": 8}
            if self.rng.random() < 0.5:
                return stream(http, chat, body, cancel=False, seen=self.seen)
            answer = check(http.post(chat, json=body))
            if "route" not in answer.get("x_zoo", {}):
                raise Failed(f"no x_zoo.route in a route's answer: {json.dumps(answer)[:200]}")
        return "ok"

    def conversation(self, http: Any, model: str, kind: str) -> None:
        """A turn of one of this client's sessions (per model); deleted after SESSION_TURNS turns."""
        key = f"{kind}-{model}"
        sid = next((s for s in self.sessions if s.startswith(f"soak{self.number}-{key}-")), None)
        if sid is None:
            self.serial += 1
            sid = f"soak{self.number}-{key}-{self.serial}"
            self.sessions[sid] = 0
        body = {"model": model, "session": sid, "messages": [{"role": "user", "content": message(self.rng, True)}], "max_tokens": 6}
        check(http.post(self.url + "/v1/chat/completions", json=body))
        self.sessions[sid] += 1
        if self.sessions[sid] >= SESSION_TURNS:
            del self.sessions[sid]
            resp = http.delete(f"{self.url}/v1/sessions/{sid}", params={"model": model})
            if resp.status_code not in (200, 204):
                raise Failed(f"DELETE /v1/sessions/{sid}: HTTP {resp.status_code}: {resp.text[:200]}")


# ---- reloads and samples -----------------------------------------------------------------


def reloader(soak: Soak, every: float, started: float, deadline: float, stop: threading.Event, log: list[dict[str, Any]]) -> None:
    """Every ``every`` seconds: a's and b's settings change in the index, then ``zoo-agent resident reload``
    (which swaps the workers of those loaded at the time)."""
    for _ in range(10_000):
        if stop.wait(every) or time.monotonic() + 30 > deadline:
            return
        soak.reloads += 1
        soak.write_index()
        t0 = time.monotonic()
        try:
            out = soak.cli("resident", "reload", "--timeout", "300", timeout=330)
            ok, said = out.returncode == 0, (out.stdout + out.stderr).strip()
        except subprocess.TimeoutExpired:
            ok, said = False, "zoo-agent resident reload: no answer within 330 s"
        log.append({"at_s": round(t0 - started, 1), "seconds": round(time.monotonic() - t0, 2), "ok": ok, "said": said[-300:]})
        soak.record("reload", "ok" if ok else "failed", None if ok else said[-300:])


def proc_numbers(pid: int) -> dict[str, int]:
    """RSS (bytes), open file descriptors and threads of one process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(fields["Threads"])}


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of *name* (all label sets) in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total


def metric_max(text: str, name: str) -> float:
    """The largest sample of *name* (over its label sets) in a Prometheus text page; 0 without one."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + "{", name + " "))]
    return max(values, default=0.0)


def sample(soak: Soak, root_pid: int, url: str, http: Any, t: float) -> dict[str, Any]:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    procs: list[dict[str, Any]] = []
    root = psutil.Process(root_pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            numbers = proc_numbers(p.pid)
            cmd = " ".join(p.cmdline()[-4:])[:120]
        except (OSError, KeyError, psutil.Error):
            continue  # a worker that exited between the listing and the reading
        procs.append({"pid": p.pid, "role": "router" if p.pid == root_pid else "worker", "cmd": cmd, **numbers})
    workers = [p for p in procs if p["role"] == "worker"]
    router = next((p for p in procs if p["role"] == "router"), {"rss": 0, "fds": 0, "threads": 0})
    health = http.get(url + "/health")
    metrics = http.get(url + "/metrics").text
    window = soak.take_window()

    def largest(key: str) -> int:  # a serving worker's: one still loading has fewer threads, fds and bytes
        return max((p[key] for p in workers), default=0)

    return {"t_s": round(t, 1), "health": health.status_code, "processes": len(procs), "workers": len(workers),
            "router_rss": router["rss"], "router_fds": router["fds"], "router_threads": router["threads"],
            "worker_rss": largest("rss"), "worker_fds": largest("fds"), "worker_threads": largest("threads"),
            "tree_rss": sum(p["rss"] for p in procs), "tree_fds": sum(p["fds"] for p in procs), "tree_threads": sum(p["threads"] for p in procs),
            "waiting": metric_sum(metrics, "zoo:router_requests_waiting"), "inflight": metric_sum(metrics, "zoo:router_requests_inflight"),
            "restarts": metric_sum(metrics, "zoo:worker_restarts_total"), "ok": window["ok"], "cancelled": window["cancelled"],
            "failed": window["failed"], "per_process": procs}  # fmt: skip


def growth(samples: list[dict[str, Any]], warmup: float, scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """Per series in TOLERANCES: the first and last third's medians (samples after *warmup*
    seconds; workers' series over samples with a worker) and whether the last stays within
    ``first * ratio + slack``, both widened by *scale*. Fewer than 3 samples: not judged."""
    out: dict[str, dict[str, Any]] = {}
    kept = [s for s in samples if s["t_s"] >= warmup]
    for key, (ratio, slack) in TOLERANCES.items():
        series = [float(s[key]) for s in kept if not key.startswith("worker_") or s["workers"]]
        if len(series) < 3:
            out[key] = {"judged": False, "samples": len(series)}
            continue
        third = len(series) // 3
        first, last = statistics.median(series[:third]), statistics.median(series[-third:])
        times = [s["t_s"] / 3600 for s in kept if not key.startswith("worker_") or s["workers"]]
        slope = statistics.linear_regression(times, series).slope if len(set(times)) > 1 else 0.0  # per hour: shown, not judged
        limit = first * (1 + (ratio - 1) * scale) + slack * scale
        out[key] = {"judged": True, "samples": len(series), "first": first, "last": last, "limit": limit, "ok": last <= limit,
                    "ratio": ratio, "slack": slack, "scale": scale, "per_hour": slope}  # fmt: skip
    return out


def log_exceptions(log: str) -> list[str]:
    """Each unhandled exception the resident logged: its last line (the exception) and the line before
    its traceback (what it was doing). Reported, not failed on: no request failed with it."""
    lines = log.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            end = next((j for j in range(i + 1, min(i + 200, len(lines))) if lines[j] and not lines[j].startswith(" ")), i)
            found.append(f"{lines[i - 1][:200] if i else ''} -> {lines[end][:200]}")
    return found


def verdict(samples: list[dict[str, Any]], grown: dict[str, dict[str, Any]], failed: int, crashed: float) -> list[str]:
    """Why the run fails (empty: it passed)."""
    why = [f"{failed} failed request(s)"] if failed else []
    why += [f"{k} grew: {g['first']:.0f} -> {g['last']:.0f} (limit {g['limit']:.0f})" for k, g in grown.items() if g["judged"] and not g["ok"]]
    if crashed:
        why.append(f"{crashed:.0f} worker restart(s) (zoo:worker_restarts_total)")
    why += [f"/health answered {s['health']} at {s['t_s']:.0f} s" for s in samples if s["health"] != 200][:3]
    return why


# ---- the run, the table, the plot --------------------------------------------------------


def soak_run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    work = Path(tempfile.mkdtemp(prefix="zoo-bench-soak-"))
    samples: list[dict[str, Any]] = []
    reloads: list[dict[str, Any]] = []
    resident: Resident | None = None
    stop = threading.Event()
    try:
        soak = Soak(work, tiny_model(work / "src" / "v1"), args.budget)
        soak.request_timeout = args.request_timeout
        soak.write_index()
        out = soak.cli("apply", timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"zoo-agent apply: {out.stderr.strip()}")
        soak.size_budget()
        resident = Resident(work, soak.index)
        print(f"==> soak: {args.minutes} min, {args.clients} clients, budget {(soak.budget or 0) / MB:.1f} MB (room for {args.budget} tenants), "
              f"a reload every {args.reload_minutes} min; READY after {resident.wait_ready():.1f} s", file=sys.stderr, flush=True)  # fmt: skip
        started = time.monotonic()
        deadline = started + args.minutes * 60
        clients = [Client(soak, resident.url, i, started, deadline, args.seed) for i in range(args.clients)]
        for c in clients:
            c.start()
        reload_thread = threading.Thread(target=reloader, args=(soak, args.reload_minutes * 60, started, deadline, stop, reloads), daemon=True)
        reload_thread.start()
        with httpx.Client(timeout=30) as http:
            for i in range(100_000):
                t = time.monotonic() - started
                if resident.proc.poll() is not None:
                    raise RuntimeError(f"the resident exited ({resident.proc.returncode}) at {t:.0f} s; its log: {resident.log.name}")
                s = sample(soak, resident.proc.pid, resident.url, http, t)
                samples.append(s)
                print(f"    {t / 60:5.1f} min: {s['workers']} workers, tree {s['tree_rss'] / MB:.0f} MB, router {s['router_rss'] / MB:.0f} MB "
                      f"{s['router_fds']} fds {s['router_threads']} threads; waiting {s['waiting']:.0f}, in flight {s['inflight']:.0f}; "
                      f"{s['ok']} ok, {s['cancelled']} cancelled, {s['failed']} failed", file=sys.stderr, flush=True)  # fmt: skip
                if time.monotonic() >= deadline:
                    break
                time.sleep(max(0.0, min(args.interval * (i + 1) - (time.monotonic() - started), deadline - time.monotonic())))
        stop.set()
        for c in clients:
            c.join(timeout=330)
        reload_thread.join(timeout=340)
        alive = [c.name for c in clients if c.is_alive()] + (["reloader"] if reload_thread.is_alive() else [])
        if alive:
            soak.record("join", "failed", f"still running 330 s after the deadline: {', '.join(alive)}")
        final = sample(soak, resident.proc.pid, resident.url, httpx.Client(timeout=30), time.monotonic() - started)
        samples[-1]["failed"] += final["failed"]  # requests that ended after the last sample still count
        samples[-1]["ok"] += final["ok"]
        samples[-1]["cancelled"] += final["cancelled"]
    finally:
        stop.set()
        stopped = resident.stop() if resident is not None else None
        logged = log_exceptions(Path(resident.log.name).read_text(errors="replace")) if resident is not None else []
        if resident is not None and (soak.errors or sys.exc_info()[0] is not None):
            if args.json is not None:  # the whole log beside the result, for what came before the tail
                shutil.copyfile(resident.log.name, args.json.with_suffix(".log"))
            tail = Path(resident.log.name).read_text(errors="replace").splitlines()[-30:]
            print("  the resident's log, last lines:\n    " + "\n    ".join(tail), file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    grown = growth(samples, args.warmup, GENEROUS if args.generous else 1.0)
    failed = sum(s["failed"] for s in samples)
    why = verdict(samples, grown, failed, max((s["restarts"] for s in samples), default=0.0))
    return {"minutes": args.minutes, "interval_s": args.interval, "warmup_s": args.warmup, "clients": args.clients, "generous": args.generous,
            "budget_bytes": soak.budget, "stop_s": stopped, "requests": dict(soak.requests), "errors": soak.errors, "reloads": reloads,
            "growth": grown, "log_exceptions": logged, "samples": samples, "failed": bool(why), "why": why}  # fmt: skip


UNITS = {"router_rss": "router RSS", "worker_rss": "RSS of the largest worker", "tree_rss": "RSS of the process tree",
         "router_fds": "router open fds", "worker_fds": "open fds of the busiest worker", "router_threads": "router threads",
         "worker_threads": "threads of the busiest worker", "processes": "processes (router + workers)"}  # fmt: skip


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    req: dict[str, int] = result["requests"]
    ok = sum(n for k, n in req.items() if not k.endswith(":failed"))
    failed = sum(n for k, n in req.items() if k.endswith(":failed"))
    cancelled = sum(n for k, n in req.items() if k.endswith(":cancelled"))
    what = f"{result['minutes']:g}-minute soak, {result['clients']} clients"
    out: list[dict[str, Any]] = [
        {"name": f"{what}: requests served / failed ({len(result['reloads'])} reloads)", "ours_text": f"{ok} / {failed}",
         "peer": "-", "peer_text": f"{cancelled} cancelled", "ratio": None, "goal": "0 failed"},
    ]  # fmt: skip
    logged = result.get("log_exceptions", [])
    out.append({"name": f"{what}: unhandled exceptions in the resident's log", "ours_text": str(len(logged)), "peer": "-", "ratio": None,
                "goal": "0 (reported, not failed on)", **({"notes": "goal missed: " + "; ".join(logged[:3])} if logged else {})})
    for key, g in result["growth"].items():
        if not g["judged"]:
            continue
        size = key.endswith("_rss")
        row: dict[str, Any] = {"name": f"{what}: {UNITS[key]}, median of the last third vs the first", "peer": "first third",
                               "ratio": g["last"] / g["first"] if g["first"] else None,
                               "goal": f"<= {g['ratio']:g} x first + {g['slack'] / MB if size else g['slack']:g}{' MB' if size else ''}"
                                       + (f" (x{g['scale']:g}, --generous)" if g["scale"] != 1 else "")}  # fmt: skip
        if size:
            row.update(ours_mb=g["last"] / MB, peer_mb=g["first"] / MB)
        else:
            row.update(ours_text=f"{g['last']:.1f}", peer_text=f"{g['first']:.1f}")
        trend = f"least-squares trend {g.get('per_hour', 0.0) / (MB if size else 1):+.1f}{' MB' if size else ''} an hour"
        row["notes"] = f"goal missed: grew past {g['limit'] / MB if size else g['limit']:.1f}; {trend}" if not g["ok"] else trend
        out.append(row)
    return out


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Per-sample RSS, fds and threads, queue and requests: one PNG (None without matplotlib)."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("bench/soak.py: matplotlib is not installed, so no plot (pip install matplotlib; the table is unaffected)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    s = result["samples"]
    t = [x["t_s"] / 60 for x in s]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (mem, fds), (queue, reqs) = axes
    mem.plot(t, [x["tree_rss"] / MB for x in s], marker=".", label="process tree")
    mem.plot(t, [x["router_rss"] / MB for x in s], marker=".", label="router")
    mem.plot(t, [x["worker_rss"] / MB for x in s], marker=".", label="largest worker")
    mem.set(ylabel="RSS (MB)", title="memory")
    fds.plot(t, [x["router_fds"] for x in s], marker=".", label="router fds")
    fds.plot(t, [x["router_threads"] for x in s], marker=".", label="router threads")
    fds.plot(t, [x["worker_fds"] for x in s], marker=".", label="fds, busiest worker")
    fds.plot(t, [x["worker_threads"] for x in s], marker=".", label="threads, busiest worker")
    fds.set(ylabel="count", title="file descriptors and threads")
    queue.plot(t, [x["waiting"] for x in s], marker=".", label="waiting (router)")
    queue.plot(t, [x["inflight"] for x in s], marker=".", label="in flight")
    queue.plot(t, [x["workers"] for x in s], marker=".", label="workers")
    queue.set(xlabel="minutes", ylabel="count", title="queues and workers (at the sample)")
    reqs.plot(t, [x["ok"] for x in s], marker=".", label="ok")
    reqs.plot(t, [x["cancelled"] for x in s], marker=".", label="cancelled on purpose")
    reqs.plot(t, [x["failed"] for x in s], marker=".", label="failed", color="red")
    reqs.set(xlabel="minutes", ylabel="requests", title=f"requests per {result['interval_s']:g} s")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for r in result["reloads"]:
        for ax in axes.flat:
            ax.axvline(r["at_s"] / 60, color="grey", alpha=0.3, linestyle=":")
    fig.suptitle(f"{result['minutes']:g}-minute soak, tiny model, 3 tenants (room for 2), a route, {result['clients']} clients; dotted: reloads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="how long the load runs")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of samples left out of the growth check")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--reload-minutes", type=float, default=3.0, help="a reload this often")
    parser.add_argument("--budget", type=float, default=2.5, help="the memory budget, in tenant footprints")
    parser.add_argument("--seed", type=int, default=36)
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds a client waits for the next bytes of an answer")
    parser.add_argument("--generous", action="store_true", help=f"tolerances x{GENEROUS:g} (short runs on busy machines)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, default=None, help="the PNG (default: docs/plots/soak.png with --json bench/soak.json)")
    parser.add_argument("--plot-only", action="store_true", help="measure nothing: the plot of --json (default bench/soak.json)")
    args = parser.parse_args()
    if not (1 <= args.clients <= 32 and 0 < args.minutes <= 24 * 60 and 1 <= args.interval <= 3600 and args.reload_minutes > 0):
        parser.error("--clients 1..32, --minutes up to a day, --interval 1..3600 s, --reload-minutes > 0")
    default_json = HERE / "soak.json"
    plot_path = args.plot or (REPO / "docs" / "plots" / "soak.png" if (args.json or default_json).resolve() == default_json else None)
    if args.plot_only:
        result = json.loads((args.json or default_json).read_text())
        plot(result, plot_path or REPO / "docs" / "plots" / "soak.png")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SystemExit: the resident is stopped in soak_run's finally
    started = time.monotonic()
    result = soak_run(args)
    result["machine"] = {"cpus": os.cpu_count()}
    result["rows"] = rows(result)
    print(table(result["rows"]))
    for row in result["rows"]:
        if row.get("notes"):
            print(f"  {row['name']}: {row['notes']}")
    for e in result["errors"][:10]:
        print(f"  error: {e}")
    print(f"({seconds(time.monotonic() - started)} in all, {os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        if plot_path:
            plot(result, plot_path)
    if result["failed"]:
        print(f"bench/soak.py: FAILED: {'; '.join(result['why'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
