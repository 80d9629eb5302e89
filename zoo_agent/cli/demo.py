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
#: The index's host with a llama.cpp tenant besides the demo host's: the demo serves it where llama-server is available.
LLAMA_HOST = "demo-llama"
#: Where a llama-server comes from, said in one line when none is found.
GET_LLAMA = ("install llama.cpp (a release from https://github.com/ggml-org/llama.cpp/releases, your distribution's llama.cpp, "
             "`brew install llama.cpp` or `nix shell nixpkgs#llama-cpp`) and rerun, or pass --llama-server PATH")
#: For the index's route: a short question and a long one (its rule sends up to 8 words to demo-chat).
ROUTED = ("Which host serves this?", "Explain, step by step and with an example, how one index keeps a fleet of hosts in sync")


def _agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "zoo_agent", *args]


def build_sources(idx: Index, index_dir: Path, host: str) -> list[str]:
    """Build the host's file-sourced models and adapters where they are missing; check them against the pins.
    A safetensors model is the tiny model, a GGUF one the tiny model written as q8_0 GGUF (for a llama.cpp
    tenant), the first tenant's adapters tiny adapters of its model."""
    from zoo_agent.demo.tiny import build_tiny_adapter, build_tiny_model

    served = [idx.tenants[t] for t in idx.hosts[host].served()]
    tenant = served[0]
    built = []
    model_dir = index_dir / _file_source(idx, tenant.model).path
    jobs: list[tuple[str, Path, Any, list[Any]]] = [(tenant.model, model_dir, lambda d: build_tiny_model(d), list(idx.models[tenant.model].files))]
    for mid in dict.fromkeys(t.model for t in served[1:] if t.model and t.model != tenant.model):
        model = idx.models[mid]
        if model.format == "gguf" and len(model.files) == 1:
            jobs.append((mid, index_dir / _file_source(idx, mid).path, lambda d, name=model.files[0].path: _build_gguf(d / name), list(model.files)))
        elif model.format == "safetensors":
            jobs.append((mid, index_dir / _file_source(idx, mid).path, lambda d: build_tiny_model(d), list(model.files)))
        else:
            raise UsageError(f"the demo builds a tiny safetensors model or one GGUF file; model {mid} is {model.format}")
    for lid in tenant.loras:
        lora = idx.loras[lid]
        if isinstance(lora.source, FileSource):
            jobs.append((lid, index_dir / lora.source.path, lambda d: build_tiny_adapter(model_dir, d, seed=1, base_name=tenant.model),
                         list(lora.files)))  # fmt: skip
    for aid, directory, build, files in jobs:
        if all((directory / f.path).is_file() for f in files):
            continue
        directory.mkdir(parents=True, exist_ok=True)
        build(directory)
        built.append(aid)
        pins = {f.path: f.sha256 for f in files}
        have = {f["path"]: f["sha256"] for f in pin_directory(directory, Selection())}
        if have != pins:
            changed = sorted(p for p in pins.keys() | have.keys() if pins.get(p) != have.get(p))
            raise StoreError(f"{directory}: the demo build does not reproduce the index's pins ({', '.join(changed)}); "
                             "are torch, transformers, tokenizers and gguf the versions the index was pinned with?")  # fmt: skip
    return built


def _file_source(idx: Index, mid: str) -> FileSource:
    source = idx.models[mid].source
    if not isinstance(source, FileSource):
        raise UsageError(f"the demo builds file sources only; model {mid} comes from '{source.type}'")
    return source


def _build_gguf(out: Path) -> None:
    """The tiny model (built aside, as build_tiny_model always builds it) written as the q8_0 GGUF ``out``."""
    from zoo_agent.demo.gguf import build_tiny_gguf
    from zoo_agent.demo.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="zoo-demo-") as tmp:
        build_tiny_gguf(build_tiny_model(Path(tmp) / "model"), out, "q8_0")


def _free(listen: str) -> str:
    """``listen`` when its port is free; else (or for port 0) a free port the system picks."""
    host, _, port = listen.rpartition(":")
    with socket.socket() as s:
        try:
            s.bind((host, int(port)))
        except OSError:
            s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


def _llama_server(given: str | None, idx: Index, host: str | None) -> tuple[str | None, str]:
    """The llama-server to serve the demo's llama.cpp tenant with, and the host: ``given`` (checked: a bad one is
    the user's error, as a host named with ``--host``), else the one on PATH when it will do; else none, said in one
    line with how to get one, and the plain demo host."""
    from zoo_agent.resident.engines.llamacpp import find_server

    wanted = host or (LLAMA_HOST if LLAMA_HOST in idx.hosts else "demo")
    llamas = [t for t in idx.hosts[wanted].served() if idx.tenants[t].backend == "llama.cpp"] if wanted in idx.hosts else []
    if not llamas:
        return None, wanted
    try:
        server = find_server(given or "llama-server")
    except UsageError as exc:
        if given is not None or host is not None:
            raise
        why = "no llama-server on PATH" if "is not on PATH" in str(exc) else str(exc)
        click.echo(f"==> without a llama.cpp tenant ({why}): to see one too, {GET_LLAMA}")
        return None, "demo"
    click.echo(f"==> llama.cpp: {server.path} (version {server.version}) serves {', '.join(llamas)} (host {wanted})")
    return server.path, wanted


def _ask(listen: str, tenant: str, routes: Iterable[str], engines: Iterable[tuple[str, str]] = ()) -> int:
    """Show what the resident serves, ask the tenant (and each llama.cpp tenant) one question and each route its short
    and long one; how many were asked."""
    models = validate(ModelList, json.load(urllib.request.urlopen(f"http://{listen}/v1/models", timeout=30))).data
    click.echo("    serving: " + ", ".join(f"{m.id} ({'a route' if m.x_zoo and m.x_zoo.kind == 'route' else m.root})" for m in models))
    body = json.dumps({"model": tenant, "messages": [{"role": "user", "content": QUESTION}]}).encode()
    request = urllib.request.Request(f"http://{listen}/v1/chat/completions", body, {"content-type": "application/json"})
    answer = json.load(urllib.request.urlopen(request, timeout=120))
    click.echo(f"==> asked {tenant}: {QUESTION}")
    click.echo(f"    answer ({answer['system_fingerprint']}, random tiny weights, so not much sense): {answer['choices'][0]['message']['content']!r}")
    asked = 1
    for other, served in engines:  # (tenant, model@version): llama-server's answer names its own build as system_fingerprint
        body = json.dumps({"model": other, "messages": [{"role": "user", "content": QUESTION}]}).encode()
        request = urllib.request.Request(f"http://{listen}/v1/chat/completions", body, {"content-type": "application/json"})
        answer = json.load(urllib.request.urlopen(request, timeout=300))  # the first request for a tenant loads it
        click.echo(f"==> asked {other} (llama.cpp): {QUESTION}")
        click.echo(f"    answer ({served}, the same tiny weights in q8_0): {answer['choices'][0]['message']['content']!r}")
        asked += 1
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


def _wait(sock: socket.socket, proc: subprocess.Popen[bytes], until: Any, timeout: float, required: bool = True) -> dict[str, str]:
    """The notify fields once ``until`` holds (else, unless ``required``, the last ones within ``timeout``)."""
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
    if not required:
        return last
    raise StoreError(f"the resident was not ready within {timeout:.0f}s: {last.get('STATUS', '')}")

@click.command("demo")
@click.option("--root", type=click.Path(path_type=Path), default=Path("zoo"), show_default=True, help="Where the zoo goes.")
@click.option("--index", type=click.Path(path_type=Path), default=Path("index.json"), show_default=True)
@click.option("--host", default=None, help=f"The index's host (default: {LLAMA_HOST} where llama-server is available, else demo).")
@click.option("--listen", default="127.0.0.1:8000", show_default=True, help="Loopback address (another port is taken if it is busy).")
@click.option("--keep-running", is_flag=True, help="Leave the resident running afterwards (default: stop it cleanly).")
@click.option("--llama-server", "llama_server", default=None, envvar="ZOO_LLAMA_SERVER",
              help="llama.cpp's server for the llama.cpp tenant (default: the one on PATH; without one, the demo serves none).")
def demo_cmd(root: Path, index: Path, host: str | None, listen: str, keep_running: bool, llama_server: str | None) -> None:
    """Build the embedded default's model, apply it, serve it, ask it one question (and its routes a short and a long one)."""
    idx = load_index(index, str(index))
    engine, host = _llama_server(llama_server, idx, host)
    if host not in idx.hosts or not idx.hosts[host].served():
        raise UsageError(f"{index}: host '{host}' has no resident tenant")
    tenant = idx.hosts[host].served()[0]
    llamas = [t for t in idx.hosts[host].served() if idx.tenants[t].backend == "llama.cpp"]
    click.echo(f"==> building the tiny model{' (and its GGUF)' if llamas else ''} and adapter that {index} pins")
    built = build_sources(idx, index.resolve().parent, host)
    click.echo(f"    {'built ' + ', '.join(built) if built else 'already built'}")
    zoo = ["--root", str(root), "--index", str(index), "--host", host]
    click.echo(f"==> zoo-agent apply {' '.join(zoo)}")
    if subprocess.run(_agent("apply", *zoo), check=False).returncode != 0:
        raise StoreError("apply failed (see above)")
    listen = _free(listen)
    serve = [*zoo, "--listen", listen, *(["--llama-server", engine] if engine else [])]
    click.echo(f"==> zoo-agent resident {' '.join(serve)}")
    tmp = tempfile.mkdtemp(prefix="zoo-demo-")  # the notify socket and the resident's log
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(f"{tmp}/notify")
        notify.settimeout(0.5)
        log = open(f"{tmp}/resident.log", "wb")  # noqa: SIM115 - the resident's output, shown if it fails
        proc = subprocess.Popen(_agent("resident", *serve), env={**os.environ, "NOTIFY_SOCKET": f"{tmp}/notify"},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=keep_running)  # fmt: skip
        try:
            ready = _wait(notify, proc, lambda f: "READY" in f, timeout=300)
            click.echo(f"    ready: {ready.get('STATUS', '')}")
            engines = [(t, f"{idx.tenants[t].model}@{idx.models[idx.tenants[t].model].version}") for t in llamas]
            asked = _ask(listen, tenant, idx.hosts[host].routes, engines)
            # The Status: line once it counts our requests; a shown one either way (the count is not what the demo checks).
            status = _wait(notify, proc, lambda f: f"{asked} requests" in f.get("STATUS", ""), timeout=15, required=False)
            click.echo(f"==> zoo-agent status {' '.join(zoo)}")
            subprocess.run(_agent("status", *zoo), check=False)
            click.echo("==> what `systemctl status model-zoo-resident` would show:")
            click.echo(f'     Status: "{status.get("STATUS", ready.get("STATUS", ""))}"')
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
