"""An embedding tenant's worker process (issue #36), from its ``Configure`` on: as a generating worker
(``main.py``) it waits for ``Proceed`` (the memory has room), loads, proves itself with a real forward
pass before ``Ready``, serves on the socket it inherited and speaks the same control protocol: pongs
from its event loop (none while its engine is stalled: it is replaced), drain on ``Drain``, the
reload counters. What it measures for the budget is its weights; it keeps no KV cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.memory import device_reserved
from zoo_agent.resident.wire import control as p

__all__ = ["input_cap", "run"]

log = logging.getLogger("zoo_agent.resident")


def run(config: WorkerConfig, control: socket.socket, lines: p.Lines, pending: list[bytes], listen_fd: int) -> int:
    """Serve ``config``'s embedding model: 2 when the supervisor went away before ``Proceed``, 3 when loading failed."""
    from zoo_agent.resident.worker import embedding_app  # noqa: F401 - the runtime (the HTTP stack, prometheus): no weights yet

    while not pending:  # the next message: Proceed, or the socket closed (evicted before the memory had room)
        chunk = control.recv(65536)
        if not chunk:
            return 2
        pending += lines.feed(chunk)
    if not isinstance(p.to_worker(pending.pop(0)), p.Proceed):
        return 2
    try:
        engine, load_seconds = _load(config, control)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported, then we exit
        control.sendall(p.encode(p.Failed(error=" ".join(f"{type(exc).__name__}: {exc}".split())[:400])))
        return 3
    return asyncio.run(_serve(config, engine, control, listen_fd, load_seconds))


def input_cap(config: WorkerConfig, own: int) -> int:
    """Tokens one input may hold (issue #33): the tenant's ``max_context`` as launch put it in the config
    (declared, else the model's ``max_position_embeddings`` capped as ``fit.context``), bounded by what the
    model's own files say it embeds (``own``: sentence-transformers' ``max_seq_length``, the tokenizer's
    ``model_max_length``, its positions). An input past it is a 400 naming ``input``."""
    return min(config.max_context, own) if config.max_context is not None else own


def _load(config: WorkerConfig, control: socket.socket) -> tuple[Any, float]:
    """The model on its engine's thread, proven by one real forward pass, and how long that took."""
    import torch
    from transformers.utils import logging as transformers_logging

    from zoo_agent.resident.embedder import Embedder
    from zoo_agent.resident.worker.embeddings import EmbeddingEngine, warm_up

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # bars belong on a terminal, not in the journal
    started = time.monotonic()
    control.sendall(p.encode(p.Loading(pct=0)))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    dtype = config.dtype if config.dtype != "auto" else ("float32" if device == "cpu" else "float16")
    embedder = Embedder(config.version_dir, device, dtype, strict=True)
    engine = EmbeddingEngine(embedder, max_rows=config.max_batch, max_tokens=input_cap(config, embedder.max_tokens), aging_seconds=config.aging_seconds)
    warm_up(engine)
    control.sendall(p.encode(p.Loading(pct=100)))
    log.info("%s: %s@%s embeds %d-dimensional vectors (%s), at most %d tokens a text", config.tenant, config.model, config.version,
             embedder.dimension, embedder.layout.describe(), engine.max_tokens)  # fmt: skip
    return engine, time.monotonic() - started


async def _serve(config: WorkerConfig, engine: Any, control: socket.socket, listen_fd: int, load_seconds: float) -> int:
    import uvicorn

    from zoo_agent.resident.worker.embedding_app import EmbeddingState, create_embedding_app

    state = EmbeddingState(config.tenant, config.model, config.version, engine, max_batch=config.max_batch, max_queue=config.max_queue,
                           priority=config.priority, api_key=config.api_key)  # fmt: skip
    engine.metrics.swap_seconds.set(load_seconds)
    server = uvicorn.Server(uvicorn.Config(create_embedding_app(state), log_level="warning", timeout_graceful_shutdown=int(config.drain_seconds),
                                           access_log=False, lifespan="off"))  # fmt: skip
    control.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=control)
    talking = asyncio.create_task(_answer(config, state, server, reader, writer))
    model = engine.embedder.model
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    dtype = str(next(iter(model.parameters())).dtype).removeprefix("torch.")
    writer.write(p.encode(p.Ready(pid=os.getpid(), load_seconds=load_seconds, device=str(engine.embedder.device), dtype=dtype,
                                  weights_bytes=weights, kv_bytes=0, max_context=engine.max_tokens)))  # fmt: skip
    await writer.drain()
    await server.serve(sockets=[socket.socket(fileno=listen_fd)])
    talking.cancel()
    engine.close()
    return 0


async def _answer(config: WorkerConfig, state: Any, server: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The supervisor's messages, until it closes the socket (then serving stops)."""
    engine, counted = state.engine, {"ok": 0, "failed": 0}
    while line := await reader.readline():
        message = p.to_worker(line)
        match message:
            case p.Ping():
                if engine.stalled(config.stall_seconds):
                    log.error("no forward pass finished in %.0fs with work waiting; not answering pings", config.stall_seconds)
                    continue  # the missing pong gets this worker replaced
                writer.write(p.encode(p.Pong(seq=message.seq, served=state.served, running=engine.running, waiting=engine.waiting,
                                             device_bytes=device_reserved(engine.embedder.model.device))))  # fmt: skip  # a torch.device
                await writer.drain()
            case p.Reloads():
                for result, total in (("ok", message.ok), ("failed", message.failed)):
                    engine.metrics.reloads.labels(result).inc(max(0, total - counted[result]))
                    counted[result] = total
            case p.Drain() if not state.draining:
                state.draining = True
                asyncio.create_task(_drain(config, state, server))
    server.should_exit = True


async def _drain(config: WorkerConfig, state: Any, server: Any) -> None:
    """Stop accepting, finish what is in flight, stop when the open connections are gone (at most ``drain_seconds``)."""
    for listening in getattr(server, "servers", []):
        listening.close()
    deadline, quiet_since = time.monotonic() + config.drain_seconds, time.monotonic()
    while time.monotonic() < deadline:
        if state.engine.jobs():
            quiet_since = time.monotonic()
        elif not server.server_state.connections or time.monotonic() - quiet_since > 2:
            break
        await asyncio.sleep(0.05)
    server.should_exit = True
