"""One worker process: load → a real warm-up generation → serve → drain (issue #5).

Started by the supervisor with the listening socket and a control socket (JSON lines)
as inherited file descriptors. It reports loading progress, readiness and failures on
the control socket and answers pings there from its event loop: a worker counts as
alive only while that loop runs.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from zoo_agent.resident.wire import control as p
from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.memory import device_reserved

__all__ = ["main"]

log = logging.getLogger("zoo_agent.resident")


def _send(control: socket.socket, message: p.ToSupervisor) -> None:
    control.sendall(p.encode(message))


def _next(control: socket.socket, lines: p.Lines, pending: list[bytes]) -> p.ToWorker | None:
    """The next message before serving starts (blocking), or None when the supervisor closed the socket."""
    while not pending:
        chunk = control.recv(65536)
        if not chunk:
            return None
        pending += lines.feed(chunk)
    return p.to_worker(pending.pop(0))


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_supervisor(supervisor: int) -> None:
    """A worker must not outlive its supervisor (issue #17): re-parented to PID 1 it would keep
    the model in memory and the listening socket open, answering beside the next resident.

    The kernel kills us when the supervisor dies (prctl PR_SET_PDEATHSIG, Linux); a thread
    watching our parent pid covers the rest (another kernel, the supervisor dying before the
    prctl). The control socket closing also ends serving (see ``answer``).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor:
        os._exit(70)

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(0.5)
        os._exit(70)

    threading.Thread(target=watch, name="watch-supervisor", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zoo-agent-worker")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--supervisor-pid", type=int, default=None)
    args = parser.parse_args(argv)
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Spinning, they
    # starve the event loop that streams each token (measured on 2 cores: 32 tokens took 1.8 s
    # batched instead of 0.09 s). An operator's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _die_with_supervisor(args.supervisor_pid or os.getppid())
    control = socket.socket(fileno=args.control_fd)
    lines, pending = p.Lines(), list[bytes]()
    configure = _next(control, lines, pending)
    if not isinstance(configure, p.Configure):
        return 2  # the supervisor went away before it told us what to serve
    config = configure.config
    if config.kind == "embedding":  # an embedding tenant's worker (issue #36)
        from zoo_agent.resident.worker.embedding_main import run

        return run(config, control, lines, pending, args.listen_fd)
    if config.backend != "ollama":
        import zoo_agent.resident.worker.app  # noqa: F401 - the runtime (torch, transformers, the HTTP stack): no weights yet
        import zoo_agent.resident.worker.backend  # noqa: F401
    if not isinstance(_next(control, lines, pending), p.Proceed):
        return 2  # the supervisor went away (or evicted us) before the memory had room
    loaded = _load(config, control)
    if isinstance(loaded, int):
        return loaded
    backend, scheduler, load_seconds = loaded
    return asyncio.run(_serve(config, backend, scheduler, control, args.listen_fd, load_seconds))


def _load(config: WorkerConfig, control: socket.socket) -> tuple[Any, Any, float] | int:
    """The backend loaded and warmed up, with its scheduler and load time; 3 once a failure was reported."""
    last = -1

    def progress(done: int, total: int) -> None:
        nonlocal last
        pct = 100 * done // total if total else 100
        if pct != last:
            last = pct
            _send(control, p.Loading(pct=pct))

    backend: Any
    try:
        backend = _backend(config)
        backend.preread(progress)
        load_seconds = backend.load()
        if config.sessions_dir is not None and config.backend != "ollama":
            from zoo_agent.resident.sessions.store import Sessions

            from zoo_agent.resident.sessions.checkpoints import CheckpointPolicy

            backend.sessions = Sessions(config.sessions_dir, model_key=f"{config.model}@{config.version}", dtype=backend.dtype,
                                        template=str(backend.tokenizer.chat_template or ""), vocab_size=backend.vocab_size(),
                                        checkpoints=CheckpointPolicy(config.checkpoint_keep, config.checkpoint_every))  # fmt: skip
        from zoo_agent.resident.engine.warmup import warm_up
        from zoo_agent.resident.worker.daemon import away
        from zoo_agent.resident.worker.scheduling import scheduler_for

        scheduler = scheduler_for(backend, config.max_batch)
        if not away(backend):  # an Ollama daemon away at start: the tenant starts unavailable (worker/daemon.py)
            warm_up(scheduler)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported, then we exit
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        _send(control, p.Failed(error=reason))
        return 3
    return backend, scheduler, load_seconds


def _backend(config: WorkerConfig) -> Any:
    """The tenant's backend, not loaded yet: the Ollama daemon's, or transformers'."""
    if config.backend == "ollama":
        from zoo_agent.resident.worker.ollama_backend import OllamaBackend

        return OllamaBackend(config.ollama_model or config.model, os.environ.get("OLLAMA_HOST") or None, tenant=config.tenant,
                             retry_cap=config.health_interval, num_ctx=config.max_context)  # fmt: skip
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # bars belong on a terminal, not in the journal
    from zoo_agent.resident.worker.backend import TransformersBackend

    return TransformersBackend(config.version_dir, allow_pickle=config.allow_pickle, allow_code=config.allow_code,
                               device=config.device, dtype=config.dtype, worker=config)  # fmt: skip


def _route_sessions(config: WorkerConfig, backend: Any, state: Any) -> None:
    """The sessions of the routes this tenant answers for (issue #21), and their summarizers."""
    if backend.sessions is None:
        return
    from zoo_agent.resident.sessions.checkpoints import CheckpointPolicy
    from zoo_agent.resident.sessions.store import Sessions
    from zoo_agent.resident.sessions.summaries import Summarizer

    for rs in config.route_sessions:
        sessions = Sessions(rs.dir, model_key=backend.sessions.model_key, dtype=backend.dtype, template=str(backend.tokenizer.chat_template or ""),
                            vocab_size=backend.sessions.vocab_size, route=rs.route,
                            checkpoints=CheckpointPolicy(rs.checkpoint_keep, rs.checkpoint_every))  # fmt: skip
        sessions.stats = backend.sessions.stats  # one set of counters per worker
        state.route_sessions[rs.route] = sessions
        if rs.summarizer is not None and config.router_socket is not None:
            state.summarizers[rs.route] = Summarizer(config.router_socket, rs.summarizer, config.router_key)


def served_context(config: WorkerConfig, backend: Any) -> int:
    """Prompt plus completion tokens one request may hold (issue #33): the tenant's ``max_context`` as
    launch put it in the config (declared, else the model's own capped as ``fit.context``), bounded by
    the model's positions where they end sooner. The 400s, the session budget, the KV budget and the
    ``/v1/models`` card all use this one number."""
    from zoo_agent.index.fit import context

    declared = config.max_context
    if declared is None:  # a config written by hand (tests): the index's default for this model
        model = getattr(backend, "model", None)
        declared = context(model.config.to_dict() if model is not None and hasattr(model, "config") else {})
    own = backend.context_length()
    return min(declared, own) if own else declared


def _measured(config: WorkerConfig, backend: Any, max_context: int) -> tuple[int, int]:
    """The loaded model's own bytes (parameters and buffers at the dtype they were loaded in: a
    float16 file loaded as float32 takes twice its size) and its KV budget at that dtype for
    ``max_batch`` sequences of ``max_context`` tokens, as ``fit.estimate`` counts it at plan time.
    What the memory budget counts (issue #20); the interpreter and torch runtime of each
    worker process are the documented slack on top."""
    model = getattr(backend, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return 0, 0  # the ollama daemon holds its own models
    from zoo_agent.index.fit import kv_bytes

    tensors = [*model.parameters(), *model.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    dtype = str(next(iter(model.parameters())).dtype).removeprefix("torch.")
    return weights, kv_bytes(model.config.to_dict(), dtype=dtype, max_batch=config.max_batch, max_context=max_context)


class _Rate:
    """Completion tokens per second over the last ``window`` seconds (STATUS= shows now, not a lifetime average)."""

    def __init__(self, window: float = 10.0) -> None:
        self.window, self.samples = window, [(time.monotonic(), 0)]

    def __call__(self, tokens: int) -> float:
        t = time.monotonic()
        self.samples = [(ts, n) for ts, n in self.samples if t - ts <= self.window] + [(t, tokens)]
        (t0, n0) = self.samples[0]
        return (tokens - n0) / (t - t0) if t > t0 else 0.0


async def _serve(config: WorkerConfig, backend: Any, scheduler: Any, control: socket.socket, listen_fd: int, load_seconds: float) -> int:
    import uvicorn

    from zoo_agent.resident.engine.warmup import warm_up
    from zoo_agent.resident.worker.app import ServingState, create_app
    from zoo_agent.resident.worker.daemon import watch

    state = ServingState(config.tenant, config.model, config.version, backend, config.defaults, max_queue=config.max_queue,
                         max_batch=config.max_batch, api_key=config.api_key, scheduler=scheduler, priority=config.priority,
                         aging_seconds=config.aging_seconds, max_context=served_context(config, backend))  # fmt: skip
    _route_sessions(config, backend, state)
    state.metrics.swap_seconds.set(load_seconds)
    state.sync_metrics()
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=int(config.drain_seconds), access_log=False))
    listener = socket.socket(fileno=listen_fd)
    control.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=control)
    talk = _Control(config, backend, scheduler, state, server, reader, writer)
    task = asyncio.create_task(talk.answer())
    # The Ollama daemon away is this tenant's trouble, never the worker's end (issue #35): watched, retried with backoff.
    watcher = asyncio.create_task(watch(backend, functools.partial(warm_up, scheduler), config.health_interval,
                                        lambda: bool(server.should_exit))) if config.backend == "ollama" else None  # fmt: skip
    weights, kv = _measured(config, backend, state.max_context)
    writer.write(p.encode(p.Ready(pid=os.getpid(), load_seconds=load_seconds, device=str(backend.device), dtype=str(backend.dtype),
                                  weights_bytes=weights, kv_bytes=kv, max_context=state.max_context)))  # fmt: skip
    await writer.drain()
    await server.serve(sockets=[listener])
    task.cancel()
    if watcher is not None:
        watcher.cancel()
    return state.exit_code


class _Control:
    """The serving worker's side of the control socket: pings, adapter updates, reload totals, drain."""

    def __init__(self, config: WorkerConfig, backend: Any, scheduler: Any, state: Any, server: Any, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:  # fmt: skip
        self.config, self.backend, self.scheduler, self.state, self.server = config, backend, scheduler, state, server
        self.reader, self.writer = reader, writer
        self.counted: dict[str, int] = {}
        self.rate, self.stalled = _Rate(), False

    async def answer(self) -> None:
        state = self.state
        while line := await self.reader.readline():
            message = p.to_worker(line)
            match message:
                case p.Ping():
                    pong = self._pong(message.seq)
                    if pong is not None:
                        self.writer.write(p.encode(pong))
                        await self.writer.drain()
                case p.Adapters():  # new adapter versions after an apply: swapped between generations
                    future = self.scheduler.call(self.backend.update_adapters, message.adapters)
                    asyncio.wrap_future(future).add_done_callback(lambda _: state.sync_metrics())
                case p.Reloads():  # totals, kept by the supervisor
                    for result, total in (("ok", message.ok), ("failed", message.failed)):
                        state.metrics.reloads.labels(result).inc(max(0, total - self.counted.get(result, 0)))
                        self.counted[result] = total
                case p.Drain() if not state.draining:
                    state.draining = True
                    asyncio.create_task(self.drain())
        self.server.should_exit = True  # the supervisor is gone: stop serving

    def _pong(self, seq: int) -> p.Pong | None:
        """The answer to a ping; None while the model hangs."""
        state, backend, stall = self.state, self.backend, self.config.stall_seconds
        if self.scheduler.stalled(stall):
            # No decode step finished for that long with work in flight: the model hangs. The
            # missing pong stops the watchdog and gets this worker replaced (issue #19).
            if not self.stalled:
                log.error("no generation step finished in %.0fs with %d running; not answering pings", stall, state.running)
            self.stalled = True
            return None
        self.stalled = False
        from zoo_agent.resident.worker.daemon import away

        adapters = backend.adapters
        return p.Pong(seq=seq, served=state.served, tokens=state.tokens, running=state.running, waiting=state.waiting, tps=self.rate(state.tokens),
                      adapters=[a.label for a in adapters.loaded.values()] if adapters else [], refused=adapters.refused if adapters else {},
                      sessions=backend.sessions.open_count() if backend.sessions else 0, unavailable=away(backend),
                      device_bytes=device_reserved(backend.device))  # fmt: skip

    async def drain(self) -> None:
        """Stop accepting (the shared socket's backlog goes to the new worker), answer what
        arrives on open connections with Connection: close, stop when they are gone."""
        server, state = self.server, self.state
        for listening in getattr(server, "servers", []):
            listening.close()
        deadline = time.monotonic() + self.config.drain_seconds
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            busy = state.running + state.waiting + state.preparing
            if busy:
                quiet_since = time.monotonic()
            elif not server.server_state.connections or time.monotonic() - quiet_since > 2:
                break  # idle keep-alive connections had 2 s to send and be told to close
            await asyncio.sleep(0.05)
        server.should_exit = True



if __name__ == "__main__":
    sys.exit(main())
