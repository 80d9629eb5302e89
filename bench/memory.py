"""Memory benchmark (issue #34): a worker's peak usage under long prompts vs its estimate and its limit.

    .venv/bin/python bench/memory.py [--shape tiny|qwen2-0.5b] [--context 512] [--batch 2] [--json bench/memory.json]

About 5 minutes on a busy 2-core machine with the defaults (the Qwen2-0.5B shape, random weights: 494M
parameters, float32 for transformers; llama.cpp serves the same model converted to GGUF and
quantized, ``--quant``). Without a llama.cpp build (``bash .ci/llama-cpp``) only the
transformers tenant is measured, saying so.

For each tenant, one resident (``bench/common.Resident``) serving it alone, no budget:

1. idle: after READY and one short request, the worker's RSS and its high-water mark so far
   (``VmHWM``: the load's peak) from ``/proc/PID/status``;
2. then prompts of increasing length, ``--batch`` (the tenant's ``max_batch``) concurrent
   requests of distinct prompts each: short, half and nearly all of ``max_context`` (the
   prompt plus ``--tokens`` generated); before each, the high-water mark is reset
   (``clear_refs``), so each length's peak is its own; a thread also samples ``RssAnon``
   every 20 ms (anonymous memory: what a cgroup limit cannot take back as it can the pages
   of a mapped file). Where the worker runs in a cgroup of its own (under systemd with
   ``Delegate=``), its ``memory.peak`` is read too.

Each peak is compared with the estimate (``index/fit``'s footprint, what the budget counts
before a load), the footprint ``/metrics`` shows once loaded (``zoo:model_footprint_bytes``,
the larger of estimate and measurement) and the limit a cgroup gives the worker at its first
start (``cgroups.limit_for`` of the footprint then, the estimate: estimate x (1 + SLACK_FRACTION)
+ RUNTIME_SLACK; a restart's limit counts what its loads measured too, never less): "held" when
the peak RSS, of the load and of every length, stays under it. docs/paging.md shows the figures.

Everything is on 127.0.0.1 and unix sockets; every wait is bounded; residents get SIGTERM,
then SIGKILL of their process group, in ``finally`` blocks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import AGENT, MB, REQUEST_TIMEOUT, Resident, seconds, table  # noqa: E402

from tests.support.llamacpp import LlamaCpp, find_llama_cpp  # noqa: E402
from zoo_agent.resident.cgroups import RUNTIME_SLACK, SLACK_FRACTION, limit_for  # noqa: E402

#: The prompt lengths, as fractions of what a sequence may hold (``max_context`` less the tokens generated and a margin).
LENGTHS = (("short", 0.0), ("half", 0.5), ("near-full", 1.0))
SHORT = 16
MARGIN = 16  # tokens kept free: a prompt's text tokenized again may come out a few tokens longer
SAMPLE_SECONDS = 0.02


def status(pid: int) -> dict[str, int]:
    """The ``Vm*``/``Rss*`` lines of /proc/PID/status, in bytes (empty: gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def reset_peak(pid: int) -> bool:
    """Reset the process's ``VmHWM`` to its RSS now (``clear_refs`` 5, Linux 4.0+)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def own_cgroup(pid: int) -> Path | None:
    """The worker's own cgroup (v2, ``worker-*`` under a delegated unit: cgroups.WorkerCgroups), or None."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            path = Path("/sys/fs/cgroup") / line[3:].strip().lstrip("/")
            if path.name.startswith("worker-") and (path / "memory.peak").is_file():
                return path
    return None


def cgroup_peak(path: Path | None) -> int | None:
    try:
        return int((path / "memory.peak").read_text().strip()) if path is not None else None
    except (OSError, ValueError):
        return None


class AnonSampler:
    """``RssAnon`` of one process every ``SAMPLE_SECONDS``, its peak since the last ``take``, on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 3600
        while not self.stop.wait(SAMPLE_SECONDS) and time.monotonic() < deadline:
            self.peak = max(self.peak, status(self.pid).get("RssAnon", 0))

    def take(self) -> int:
        peak, self.peak = self.peak, status(self.pid).get("RssAnon", 0)
        return max(peak, self.peak)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def metric(page: str, name: str, tenant: str, kind: str | None = None) -> int | None:
    """One sample of ``/metrics`` for ``tenant`` (and ``kind``), or None."""
    for line in page.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rfind("}")]))
        if labels.get("tenant") == tenant and (kind is None or labels.get("kind") == kind):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


class Prompts:
    """Prompts of a given number of tokens, distinct from their first token on (no shared cached beginning)."""

    def __init__(self, tokenizer_json: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tokenizer_json))
        text = "The zoo keeps every model pinned by its digest, and each tenant answers with its own adapters. "
        self.ids = self.tok.encode(text * 400, add_special_tokens=False).ids

    def make(self, n: int, k: int) -> str:
        prefix = self.tok.encode(f"Request {k}: ", add_special_tokens=False).ids
        body = self.ids[k * 7 % 50 :] * (n // len(self.ids) + 1)  # a context beyond the text: it repeats
        return str(self.tok.decode((prefix + body)[:n]))


def ask(http: Any, url: str, tenant: str, prompt: str, tokens: int) -> int:
    """One completion; the prompt tokens its answer counted."""
    resp = http.post(url + "/v1/completions", json={"model": tenant, "prompt": prompt, "max_tokens": tokens, "temperature": 0},
                     timeout=REQUEST_TIMEOUT)  # fmt: skip
    if resp.status_code != 200:
        raise RuntimeError(f"{tenant}: {resp.status_code} {resp.text[:300]}")
    return int((resp.json().get("usage") or {}).get("prompt_tokens") or 0)


def burst(url: str, tenant: str, prompts: list[str], tokens: int) -> list[int]:
    """All the prompts at once, one thread each; the prompt tokens of each answer."""
    import httpx

    got: list[int | Exception] = [0] * len(prompts)

    def one(i: int) -> None:
        try:
            with httpx.Client() as http:
                got[i] = ask(http, url, tenant, prompts[i], tokens)
        except Exception as exc:  # noqa: BLE001 - raised below, in the caller's thread
            got[i] = exc

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=REQUEST_TIMEOUT + 30)
    for g in got:
        if isinstance(g, Exception):
            raise g
    return [int(g) for g in got]  # type: ignore[arg-type]


def measure(work: Path, index: Path, tenant: str, backend: str, estimate: int, prompts: Prompts, args: argparse.Namespace,
            extra: list[str]) -> dict[str, Any]:  # fmt: skip
    """One resident serving ``tenant``: its worker idle, then under each prompt length."""
    import httpx

    out: dict[str, Any] = {"tenant": tenant, "backend": backend, "estimate": estimate, "lengths": {}}
    r = Resident(work, index, *extra)
    sampler = None
    try:
        r.wait_ready()
        with httpx.Client() as http:
            ask(http, r.url, tenant, "Hello", 2)
            time.sleep(1.0)
            info = json.loads((work / "zoo" / "resident" / "tenants" / tenant / "model-info.json").read_text())
            pid = int(info["pid"])
            sampler = AnonSampler(pid)
            cgroup = own_cgroup(pid)
            idle = status(pid)
            out.update(pid=pid, model_info_footprint=info["footprint"], idle_rss=idle.get("VmRSS", 0), load_hwm=idle.get("VmHWM", 0),
                       idle_anon=idle.get("RssAnon", 0), cgroup=str(cgroup) if cgroup else None, cgroup_peak_load=cgroup_peak(cgroup))  # fmt: skip
            sampler.take()
            room = args.context - args.tokens - MARGIN
            for name, fraction in LENGTHS:
                n = SHORT if fraction == 0 else int(room * fraction)
                batch = [prompts.make(n, k) for k in range(args.batch)]
                reset_ok = reset_peak(pid)
                sampler.take()
                t0 = time.monotonic()
                used = burst(r.url, tenant, batch, args.tokens)
                wall = time.monotonic() - t0
                now = status(pid)
                page = http.get(r.url + "/metrics", timeout=30).text
                # Not reset (an old kernel): the high-water mark since the worker started, an upper bound of this length's.
                got: dict[str, Any] = {"tokens": n, "prompt_tokens": used, "seconds": wall, "peak_rss": now.get("VmHWM", 0), "peak_reset": reset_ok,
                       "rss_after": now.get("VmRSS", 0), "peak_anon": sampler.take(), "cgroup_peak": cgroup_peak(cgroup),
                       "metrics_ram": metric(page, "zoo:model_memory_bytes", tenant, "ram"),
                       "metrics_footprint": metric(page, "zoo:model_footprint_bytes", tenant)}  # fmt: skip
                out["lengths"][name] = got
                print(f"    {tenant} ({backend}) {name}: {args.batch} x {used} prompt tokens in {wall:.1f} s; peak RSS "
                      f"{(got['peak_rss'] or 0) / MB:.0f} MB, peak anon {got['peak_anon'] / MB:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
            out["footprint"] = max(estimate, *(g["metrics_footprint"] or 0 for g in out["lengths"].values()))
    finally:
        if sampler is not None:
            sampler.close()
        r.stop()
    return out


def build(work: Path, shape: str, quant: str, llama: LlamaCpp | None) -> tuple[Path, Path | None]:
    """The transformers model and (with a llama.cpp build) its GGUF, quantized to ``quant``."""
    from zoo_agent.demo.tiny import QWEN2_05B_SHAPE, build_tiny_model

    hf = build_tiny_model(work / "src" / "hf", **(QWEN2_05B_SHAPE if shape == "qwen2-0.5b" else {}))  # type: ignore[arg-type]
    if llama is None:
        return hf, None
    gguf_dir = work / "src" / "gguf"
    gguf_dir.mkdir(parents=True)
    f32 = llama.convert(hf, gguf_dir / "m-f32.gguf", "f32")
    if quant == "f32":
        return hf, f32
    out = llama.quantize(f32, gguf_dir / f"m-{quant}.gguf", quant)
    f32.unlink()
    return hf, out


def model_entry(src: Path, fmt: str | None) -> dict[str, Any]:
    files = [{"path": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size} for p in sorted(src.iterdir())]
    return {"version": "v1", "source": {"type": "file", "path": str(src)}, "license": "MIT", "files": files, **({"format": fmt} if fmt else {})}


def rows_of(results: list[dict[str, Any]], label: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for m in results:
        limit = limit_for(m["estimate"])
        for name, got in m["lengths"].items():
            peak = got["peak_rss"] or 0
            row = {"name": f"peak RSS vs the worker's limit: {m['backend']}, {args.batch} x {name} prompt ({got['tokens']} tokens) [{label}]",
                   "ours_mb": peak / MB, "peer": "limit: estimate x 1.25 + 1 GiB", "peer_mb": limit / MB, "ratio": peak / limit, "goal": "<= 1.0 (held)",
                   "notes": f"estimate {m['estimate'] / MB:.0f} MB, footprint {m['footprint'] / MB:.0f} MB, idle RSS {m['idle_rss'] / MB:.0f} MB, "
                            f"peak - estimate {(peak - m['estimate']) / MB:+.0f} MB, peak anon {got['peak_anon'] / MB:.0f} MB"}  # fmt: skip
            if peak > limit:
                row["notes"] = "goal missed: " + str(row["notes"])
            rows.append(row)
    return rows


def detail(results: list[dict[str, Any]]) -> str:
    """The table the issue asks for: per tenant its estimate, idle, peak per length, peak - estimate, and whether the limit held."""
    names = [n for n, _ in LENGTHS]
    head = f"{'tenant (backend)':<22} {'estimate':>9} {'footprint':>9} {'limit':>9} {'idle RSS':>9} {'load HWM':>9} " + \
           " ".join(f"{'peak ' + n:>15}" for n in names) + f" {'/metrics ram':>12} {'est+RUNTIME':>11} {'peak-est':>9} {'given':>7}  held"  # fmt: skip
    lines = [head, "-" * len(head)]
    for m in results:
        limit = limit_for(m["estimate"])
        peaks = [m["lengths"][n]["peak_rss"] or 0 for n in names]
        worst = max(peaks + [m["load_hwm"]])
        lines.append(f"{m['tenant'] + ' (' + m['backend'] + ')':<22} {m['estimate'] / MB:>7.0f}MB {m['footprint'] / MB:>7.0f}MB {limit / MB:>7.0f}MB "
                     f"{m['idle_rss'] / MB:>7.0f}MB {m['load_hwm'] / MB:>7.0f}MB " + " ".join(f"{p / MB:>13.0f}MB" for p in peaks) +
                     f" {max(g['metrics_ram'] or 0 for g in m['lengths'].values()) / MB:>10.0f}MB {(m['estimate'] + RUNTIME_SLACK) / MB:>9.0f}MB {(worst - m['estimate']) / MB:>+7.0f}MB {(limit - m['estimate']) / MB:>5.0f}MB  "
                     f"{'yes' if worst <= limit else 'NO'} ({(limit - worst) / MB:+.0f} MB)")  # fmt: skip
    lines.append(f"limit = estimate x {1 + SLACK_FRACTION:g} + {RUNTIME_SLACK / MB:.0f} MB (cgroups.limit_for of a first start's footprint, the smallest a "
                 "worker gets; a restart's counts what its loads measured too); footprint: /metrics zoo:model_footprint_bytes after the prompts; "
                 "peak-est: the largest peak RSS (the load's or a prompt length's) - the estimate, the slack used; given: limit - estimate; "
                 "est+RUNTIME: estimate + RUNTIME_SLACK; "
                 "/metrics ram: zoo:model_memory_bytes{kind=\"ram\"}, the pager's reading (every 5 s), the largest seen after a length; "
                 "held: the largest of the load's and the prompts' peak RSS stays under the limit (margin in brackets)")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shape", choices=["tiny", "qwen2-0.5b"], default="qwen2-0.5b", help="tiny: the tests' model (about 1 MB)")
    parser.add_argument("--context", type=int, default=512, help="the tenants' max_context (tokens)")
    parser.add_argument("--batch", type=int, default=2, help="the tenants' max_batch, and the requests sent at once")
    parser.add_argument("--tokens", type=int, default=4, help="tokens generated per request")
    parser.add_argument("--quant", choices=["f32", "q8_0", "q4_k_m"], default="q8_0", help="the llama.cpp tenant's GGUF")
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp build (bin/, convert/); default: .ci/llama.cpp-<pinned version>")
    parser.add_argument("--backends", default="transformers,llama.cpp", help="comma-separated: transformers, llama.cpp")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if set(backends) - {"transformers", "llama.cpp"} or not backends or args.context < 4 * SHORT + args.tokens + MARGIN or args.batch < 1:
        parser.error("--backends names transformers and/or llama.cpp; --context leaves room for a prompt; --batch >= 1")
    from zoo_agent.index.fit import read_config, tenant_footprint
    from zoo_agent.index.load import load_index

    label = "Qwen2-0.5B shape" if args.shape == "qwen2-0.5b" else "tiny model"
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-memory-"))
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    try:
        llama = (LlamaCpp(args.llama_cpp) if args.llama_cpp else find_llama_cpp()) if "llama.cpp" in backends else None
        if llama is not None and not os.access(llama.server, os.X_OK):
            raise SystemExit(f"--llama-cpp {args.llama_cpp}: no executable bin/llama-server in it")
        hf, gguf = build(work, args.shape, args.quant, llama)
        prompts = Prompts(hf / "tokenizer.json")
        resources = {"max_batch": args.batch, "max_context": args.context, "max_queue": 4 * args.batch}
        plan: list[tuple[str, str, Path, list[str]]] = [("transformers", "m", hf, [])]
        if "llama.cpp" in backends:
            if gguf is None or llama is None:
                print("    no llama.cpp build (bash .ci/llama-cpp): the llama.cpp tenant is left out", file=sys.stderr, flush=True)
            else:
                plan.append(("llama.cpp", "g", gguf.parent, ["--llama-server", str(llama.server)]))
        plan = [p for p in plan if p[0] in backends]
        for backend, model, src, extra in plan:
            tenant = "hf" if backend == "transformers" else "gguf"
            spec = {"model": model, "resources": resources, "generation": {"temperature": 0, "max_tokens": args.tokens},
                    **({"backend": "llama.cpp"} if backend == "llama.cpp" else {})}  # fmt: skip
            index = work / f"{tenant}.json"
            index.write_text(json.dumps({"models": {model: model_entry(src, "gguf" if backend == "llama.cpp" else None)}, "tenants": {tenant: spec}, "hosts": {"h": {"tenants": [tenant]}}}))
            done = subprocess.run([*AGENT, "apply", "--root", str(work / "zoo"), "--index", str(index), "--host", "h"], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"bench/memory.py: zoo-agent apply failed ({done.returncode}): {done.stderr.strip()[-500:]}")
            estimate = tenant_footprint(load_index(index, str(index)), tenant, read_config(src)).total
            print(f"==> {tenant} ({backend}, {label}): estimate {estimate / MB:.0f} MB, max_context {args.context}, max_batch {args.batch}",
                  file=sys.stderr, flush=True)  # fmt: skip
            results.append(measure(work, index, tenant, backend, estimate, prompts, args, extra))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = rows_of(results, label, args)
    print(detail(results))
    print()
    print(table(rows))
    for row in rows:
        if str(row.get("notes", "")).startswith("goal missed"):
            print(f"  {row['name']}: {row['notes']}")
    print(f"({seconds(time.monotonic() - started)} in all, {os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "shape": args.shape, "context": args.context, "batch": args.batch,
                                         "tokens": args.tokens, "quant": args.quant, "slack": {"fraction": SLACK_FRACTION, "runtime": RUNTIME_SLACK},
                                         "measured": results, "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
