"""The ``llama-server`` binary: found, checked once, and told what to serve (issue #33).

``find_server`` runs it twice at the resident's start (``--version``, ``--help``): a binary that is
missing, does not answer, or lacks what we pass it is one line naming the flag to fix, before any
tenant loads. Builds numbered before ``MIN_BUILD`` listen on no unix socket; a build from a source
tarball numbers itself 0 or 1, so what decides is whether its ``--help`` lists every flag we use.
``server_argv`` is a pure function of the tenant's settings: everything the engine does is said
on its command line, never in its environment (``engine_env`` drops llama.cpp's ``LLAMA_*``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from zoo_agent.errors import UsageError
from zoo_agent.resident.config import WorkerConfig

__all__ = ["MIN_BUILD", "REQUIRED", "LlamaServer", "engine_env", "find_server", "parse_version", "server_argv", "too_old"]

#: llama.cpp b5000 (April 2025): ``--host PATH.sock`` listens on a unix socket (PR #12613).
MIN_BUILD = 5000
#: Flags ``server_argv`` passes that not every llama-server has (the rest are years older).
REQUIRED = ("--no-webui", "--slot-save-path", "--metrics", "--cache-type-k", "--cache-type-v", "--parallel", "--alias")
_VERSION = re.compile(r"^version: (?P<shown>\S+)(?: \((?:build (?P<build>\d+), )?(?:commit )?(?P<commit>[^)]*)\))?", re.M)
_CHECK_SECONDS = 15.0


@dataclass(frozen=True)
class LlamaServer:
    """A checked binary: its path and the version it names."""

    path: str
    version: str


def parse_version(text: str) -> tuple[str, int | None] | None:
    """``version: 4567 (abc)`` -> ("4567 (abc)", 4567); ``version: 0.5.0-dev (build 1, commit abc)`` ->
    ("0.5.0-dev (build 1, commit abc)", 1); None when no such line. The build number is the source's
    commit count (0 or 1 for a build from a source tarball, which has no git history)."""
    match = _VERSION.search(text)
    if match is None:
        return None
    shown = match.group(0).removeprefix("version: ").strip()
    build = match.group("build") or (match.group("shown") if match.group("shown").isdigit() else None)
    return shown, int(build) if build is not None else None


def too_old(version: str, help_text: str) -> str | None:
    """Why this llama-server cannot serve a tenant (pure), or None: no unix sockets or a flag we pass missing."""
    parsed = parse_version(version)
    if parsed is None:
        return "it prints no 'version:' line: not llama.cpp's llama-server?"
    shown, build = parsed
    missing = [flag for flag in REQUIRED if not re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", help_text, re.M)]
    if "unix socket" not in help_text.lower():
        missing.insert(0, "--host PATH.sock (unix sockets)")
    if missing:
        return f"version {shown} lacks {', '.join(missing)}: llama.cpp b{MIN_BUILD} or later is needed"
    if build is not None and 1 < build < MIN_BUILD:
        return f"version {shown} is older than llama.cpp b{MIN_BUILD}"
    return None


def engine_env() -> dict[str, str]:
    """Our environment without llama.cpp's own variables (``LLAMA_ARG_*``, ``LLAMA_API_KEY``,
    ``LLAMA_SERVER_*``: a key there would lock the router out, a child mode would change what the
    process is), without hub tokens (it downloads nothing: it is given a file), and without systemd's
    notify and socket variables. ``GGML_*`` and the GPU runtimes' own (``CUDA_VISIBLE_DEVICES``) stay."""
    dropped = ("LLAMA_", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_")
    return {k: v for k, v in os.environ.items() if not k.startswith(dropped)}


def find_server(name: str) -> LlamaServer:
    """The binary ``--llama-server`` names (a path, or a name looked up on PATH), checked; ``UsageError`` otherwise."""
    path = shutil.which(name) if os.sep not in name else (name if os.access(name, os.X_OK) and Path(name).is_file() else None)
    if path is None:
        where = f"--llama-server: {name} is not an executable file" if os.sep in name else f"{name} is not on PATH"
        raise UsageError(f"{where}; a tenant of this host has backend 'llama.cpp' (install llama.cpp, or pass --llama-server PATH)")
    who = f"--llama-server {name}" if os.sep in name else f"{name} ({path})"
    outputs = []
    for arg in ("--version", "--help"):
        try:
            done = subprocess.run([path, arg], capture_output=True, timeout=_CHECK_SECONDS, env=engine_env(), check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            raise UsageError(f"{who}: {arg} failed: {type(exc).__name__}: {exc}") from None
        outputs.append((done.stdout + done.stderr).decode("utf-8", "replace"))
    why = too_old(outputs[0], outputs[1])
    if why is not None:
        raise UsageError(f"{who}: {why}")
    parsed = parse_version(outputs[0])
    return LlamaServer(path, parsed[0] if parsed else "?")


def server_argv(binary: str, config: WorkerConfig, model_file: Path, socket_path: str, slots_dir: Path) -> list[str]:
    """The command line for one tenant (pure): its verified GGUF file on a private socket, ``max_batch``
    slots of ``max_context`` tokens each (``--ctx-size`` is their sum; the cache is not unified, so no
    sequence takes more), continuous batching, metrics, the slot-save directory under the tenant's state,
    no web UI and no API key of its own (the router is its one client); the tenant's generation
    defaults as the server's defaults for what a request leaves out. ``--min-p 0`` and
    ``--repeat-penalty 1``: sampling is temperature, top-p and top-k only, as for every backend."""
    context = config.max_context or 4096
    defaults = config.defaults
    argv = [
        binary, "--model", str(model_file), "--host", socket_path,
        "--ctx-size", str(context * config.max_batch), "--parallel", str(config.max_batch), "--cont-batching",
        "--metrics", "--slot-save-path", str(slots_dir), "--no-webui", "--no-warmup", "--alias", config.tenant,
        "--n-gpu-layers", str(config.gpu_layers or 0),
        "--cache-type-k", config.kv_cache_type or "f16", "--cache-type-v", config.kv_cache_type or "f16",
        "--min-p", "0", "--repeat-penalty", "1",
    ]  # fmt: skip
    for flag, key in (("--n-predict", "max_tokens"), ("--temp", "temperature"), ("--top-p", "top_p"), ("--top-k", "top_k"), ("--seed", "seed")):
        value = defaults.get(key)
        if value is not None and not isinstance(value, bool):
            argv += [flag, str(value)]
    return argv
