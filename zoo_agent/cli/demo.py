"""`zoo-agent demo`: the quick start's main job on the embedded default (issue #12).

Builds the tiny model and adapter that the top-level index.json pins (reproducibly, so
the pins match), reconciles them into a zoo under the working directory with `apply`,
starts the resident on loopback under a notify socket of our own (systemd's protocol, so
we see what `systemctl status` would), asks one question through the OpenAI-compatible
API, prints the answer, `zoo-agent status` and the status line, then stops the resident
cleanly (or leaves it running with --keep-running and says how to stop it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from zoo_agent.errors import StoreError, UsageError
from zoo_agent.index.load import load_index
from zoo_agent.index.model import FileSource, Index
from zoo_agent.pin import Selection, pin_directory
from zoo_agent.resident.wire.documents import AnswerZoo, ModelList, validate

__all__ = ["build_sources", "demo_cmd"]

QUESTION = "What is a model zoo?"
#: For the index's route: a short question and a long one (its rule sends up to 8 words to demo-chat).
ROUTED = ("Which host serves this?", "Explain, step by step and with an example, how one index keeps a fleet of hosts in sync")


def _agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "zoo_agent", *args]


def build_sources(idx: Index, index_dir: Path, host: str) -> list[str]:
    """Build the tenant's file-sourced model and adapters where they are missing; check them against the pins."""
    from zoo_agent.demo.tiny import build_tiny_adapter, build_tiny_model

    tenant = idx.tenants[idx.hosts[host].served()[0]]
    model = idx.models[tenant.model]
    if not isinstance(model.source, FileSource):
        raise UsageError(f"the demo builds file sources only; model {tenant.model} comes from '{model.source.type}'")
    built = []
    model_dir = index_dir / model.source.path
    jobs: list[tuple[str, Path, Any, list[Any]]] = [(tenant.model, model_dir, lambda d: build_tiny_model(d), list(model.files))]
    for lid in tenant.loras:
        lora = idx.loras[lid]
        if isinstance(lora.source, FileSource):
            jobs.append((lid, index_dir / lora.source.path, lambda d: build_tiny_adapter(model_dir, d, seed=1, base_name=tenant.model),
                         list(lora.files)))  # fmt: skip
    for aid, directory, build, files in jobs:
        if all((directory / f.path).is_file() for f in files):
            continue
        build(directory)
        built.append(aid)
        pins = {f.path: f.sha256 for f in files}
        have = {f["path"]: f["sha256"] for f in pin_directory(directory, Selection())}
        if have != pins:
            changed = sorted(p for p in pins.keys() | have.keys() if pins.get(p) != have.get(p))
            raise StoreError(f"{directory}: the demo build does not reproduce the index's pins ({', '.join(changed)}); "
                             "are torch, transformers and tokenizers the versions the index was pinned with?")  # fmt: skip
    return built


def _free(listen: str) -> str:
    """``listen`` when its port is free; else (or for port 0) a free port the system picks."""
    host, _, port = listen.rpartition(":")
    with socket.socket() as s:
        try:
            s.bind((host, int(port)))
        except OSError:
            s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


def _ask(listen: str, tenant: str, routes: Iterable[str]) -> int:
    """Show what the resident serves, ask the tenant one question and each route its short and long one; how many were asked."""
    models = validate(ModelList, json.load(urllib.request.urlopen(f"http://{listen}/v1/models", timeout=30))).data
    click.echo("    serving: " + ", ".join(f"{m.id} ({'a route' if m.x_zoo and m.x_zoo.kind == 'route' else m.root})" for m in models))
    body = json.dumps({"model": tenant, "messages": [{"role": "user", "content": QUESTION}]}).encode()
    request = urllib.request.Request(f"http://{listen}/v1/chat/completions", body, {"content-type": "application/json"})
    answer = json.load(urllib.request.urlopen(request, timeout=120))
    click.echo(f"==> asked {tenant}: {QUESTION}")
    click.echo(f"    answer ({answer['system_fingerprint']}, random tiny weights, so not much sense): {answer['choices'][0]['message']['content']!r}")
    asked = 1
    for route in routes:
        for question in ROUTED:
            body = json.dumps({"model": route, "messages": [{"role": "user", "content": question}]}).encode()
            request = urllib.request.Request(f"http://{listen}/v1/chat/completions", body, {"content-type": "application/json"})
            answer = json.load(urllib.request.urlopen(request, timeout=300))  # the first request for a tenant loads it
            taken = validate(AnswerZoo, answer.get("x_zoo", {}), "x_zoo").route
            click.echo(f"==> asked {route} (a route): {question}")
            click.echo(f"    answered by {taken.tenant if taken else None} (rule {taken.rule if taken else None}): "
                       f"{answer['choices'][0]['message']['content'][:60]!r}")  # fmt: skip
            asked += 1
    return asked


def _wait(sock: socket.socket, proc: subprocess.Popen[bytes], until: Any, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StoreError(f"the resident exited ({proc.returncode}) before it was ready: {last.get('STATUS', '')}")
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            continue
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        last.update(fields)
        if until(fields):
            return last
    raise StoreError(f"the resident was not ready within {timeout:.0f}s: {last.get('STATUS', '')}")

@click.command("demo")
@click.option("--root", type=click.Path(path_type=Path), default=Path("zoo"), show_default=True, help="Where the zoo goes.")
@click.option("--index", type=click.Path(path_type=Path), default=Path("index.json"), show_default=True)
@click.option("--host", default="demo", show_default=True)
@click.option("--listen", default="127.0.0.1:8000", show_default=True, help="Loopback address (another port is taken if it is busy).")
@click.option("--keep-running", is_flag=True, help="Leave the resident running afterwards (default: stop it cleanly).")
def demo_cmd(root: Path, index: Path, host: str, listen: str, keep_running: bool) -> None:
    """Build the embedded default's model, apply it, serve it, ask it one question (and its routes a short and a long one)."""
    idx = load_index(index, str(index))
    if host not in idx.hosts or not idx.hosts[host].served():
        raise UsageError(f"{index}: host '{host}' has no resident tenant")
    tenant = idx.hosts[host].served()[0]
    click.echo(f"==> building the tiny model and adapter that {index} pins")
    built = build_sources(idx, index.resolve().parent, host)
    click.echo(f"    {'built ' + ', '.join(built) if built else 'already built'}")
    zoo = ["--root", str(root), "--index", str(index), "--host", host]
    click.echo(f"==> zoo-agent apply {' '.join(zoo)}")
    if subprocess.run(_agent("apply", *zoo), check=False).returncode != 0:
        raise StoreError("apply failed (see above)")
    listen = _free(listen)
    click.echo(f"==> zoo-agent resident {' '.join(zoo)} --listen {listen}")
    tmp = tempfile.mkdtemp(prefix="zoo-demo-")  # the notify socket and the resident's log
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(f"{tmp}/notify")
        notify.settimeout(0.5)
        log = open(f"{tmp}/resident.log", "wb")  # noqa: SIM115 - the resident's output, shown if it fails
        proc = subprocess.Popen(_agent("resident", *zoo, "--listen", listen), env={**os.environ, "NOTIFY_SOCKET": f"{tmp}/notify"},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=keep_running)  # fmt: skip
        try:
            ready = _wait(notify, proc, lambda f: "READY" in f, timeout=300)
            click.echo(f"    ready: {ready.get('STATUS', '')}")
            asked = _ask(listen, tenant, idx.hosts[host].routes)
            status = _wait(notify, proc, lambda f: f"{asked} requests" in f.get("STATUS", ""), timeout=15)
            click.echo(f"==> zoo-agent status {' '.join(zoo)}")
            subprocess.run(_agent("status", *zoo), check=False)
            click.echo("==> what `systemctl status model-zoo-resident` would show:")
            click.echo(f'     Status: "{status.get("STATUS", "")}"')
        except BaseException:
            log.flush()
            sys.stderr.write(Path(f"{tmp}/resident.log").read_text(errors="replace")[-3000:])
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            raise
        finally:
            log.close()
        if keep_running:
            click.echo(f"==> the resident keeps running (pid {proc.pid}) on http://{listen}, its log in {tmp}/resident.log; "
                       f"stop it with: kill {proc.pid}")  # fmt: skip
            return
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
    shutil.rmtree(tmp, ignore_errors=True)
    click.echo(f"==> stopped the resident cleanly (exit {code}); rerun with --keep-running to keep it serving")
