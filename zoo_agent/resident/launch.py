"""What a worker is started with, and starting it (issue #32).

A worker's ``WorkerConfig`` is read from the index and the zoo (the verified ``current``
version, its adapters, the routes whose sessions it may hold); ``verify`` is ``--strict``'s
re-hash of every file, slow on a large model, so the supervisor runs it beside its loop. Which
kind of ``WorkerProcess`` serves a tenant is decided here, from its backend: the one place an
engine's own server plugs in. A llama.cpp tenant gets ``llama-server`` (``engines/``), whose binary
is checked once (``check_engines`` at the start, for every llama.cpp tenant the host serves).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from zoo_agent.errors import UsageError
from zoo_agent.index.model import Index, OllamaSource
from zoo_agent.plan import host_id
from zoo_agent.resident.config import ResidentConfig, RouteSessions, WorkerConfig
from zoo_agent.resident.context import model_context, served_context
from zoo_agent.resident.engines.llamacpp import LlamaServer, find_server
from zoo_agent.resident.engines.llamaserver import LlamaServerProcess
from zoo_agent.resident.process import WorkerProcess, ZooWorkerProcess
from zoo_agent.resident.tenant import adapters_for, base_names, selection_for, strict_check
from zoo_agent.resident.wire.priority import CLASSES
from zoo_agent.store.zoo import Zoo

__all__ = ["Launcher"]

log = logging.getLogger("zoo_agent.resident")


class Launcher:
    """Configs for workers, and their private sockets in a directory of our own (``open``)."""

    def __init__(self, config: ResidentConfig, zoo: Zoo, api_key: str | None) -> None:
        self.config = config
        self.zoo = zoo
        self.api_key = api_key
        self.sockets: Path | None = None
        self.spawned = 0
        self._llama_server: LlamaServer | None = None

    def open(self) -> None:
        self.sockets = Path(tempfile.mkdtemp(prefix="zoo-resident-", dir=os.environ.get("RUNTIME_DIRECTORY") or None))

    def close(self) -> None:
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)  # ours: made by mkdtemp in open(), holding only sockets

    def verify(self, idx: Index, tid: str, *, config: bool = False) -> None:
        """``--strict``: every file of the tenant's versions hashed again; ``config``: its worker's
        config made too, as a load would (raises ``ZooError``)."""
        if config:
            self.worker_config(idx, tid)
        if self.config.strict:
            strict_check(self.zoo, idx, tid)

    def llama_server(self) -> LlamaServer:
        """The checked ``llama-server`` (``--llama-server``, else the one on PATH); ``UsageError`` naming what is wrong."""
        if self._llama_server is None:
            self._llama_server = find_server(self.config.llama_server)
            log.info("llama.cpp tenants: %s, version %s", self._llama_server.path, self._llama_server.version)
        return self._llama_server

    def check_engines(self, idx: Index) -> None:
        """At the start: the engines the host's tenants need are there (``UsageError``, one line, otherwise)."""
        host = idx.hosts[host_id(idx, self.config.host)]
        if any(idx.tenants[t].backend == "llama.cpp" for t in host.served() if t in idx.tenants):
            self.llama_server()

    def worker_config(self, idx: Index, tid: str) -> WorkerConfig:
        tenant = idx.tenants[tid]
        model = idx.models[tenant.model]
        version = self.zoo.read_link("models", tenant.model, "current")
        if version is None or not self.zoo.version_dir("models", tenant.model, version).is_dir():
            raise UsageError(f"model {tenant.model} is not in the zoo at {self.config.root}; run: zoo-agent apply")
        version_dir = self.zoo.version_dir("models", tenant.model, version)
        adapters, refused = adapters_for(self.zoo, idx, tid)
        if tenant.backend == "llama.cpp":
            self.llama_server()
        for why in refused.values():
            log.warning("adapter refused: %s", why)
        return WorkerConfig(
            tenant=tid, model=tenant.model, version=version,
            version_dir=version_dir,
            allow_pickle=model.allow_pickle, allow_code=model.allow_code,
            device=tenant.resources.device, dtype=tenant.resources.dtype,
            defaults=tenant.generation.model_dump(), max_queue=tenant.resources.max_queue, max_batch=tenant.resources.max_batch,
            api_key=None, drain_seconds=self.config.drain_seconds, memory_max=tenant.resources.memory_max,
            adapters=adapters, refused_adapters=refused, max_loras=tenant.resources.max_loras,
            base_names=base_names(idx, tid), selection=selection_for(self.zoo, idx, tid),
            sessions_dir=self.zoo.tenant_dir(tid), priority=CLASSES[tenant.priority], aging_seconds=self.config.aging_seconds,
            route_sessions=self.route_sessions(idx, tid), router_socket=self.sockets / "router.sock" if self.sockets else None,
            checkpoint_keep=tenant.sessions.checkpoints.keep, checkpoint_every=tenant.sessions.checkpoints.seconds,
            router_key=self.api_key,
            backend=tenant.backend, ollama_model=model.source.name if isinstance(model.source, OllamaSource) else None,
            kind=tenant.kind, max_context=served_context(tenant.resources.max_context, *model_context(version_dir), tenant.backend),
            gpu_layers=tenant.resources.gpu_layers, kv_cache_type=tenant.resources.kv_cache_type,
        )  # fmt: skip

    def route_sessions(self, idx: Index, tid: str) -> tuple[RouteSessions, ...]:
        """The routes of this host that may send ``tid`` a session: where those sessions live."""
        host = idx.hosts[host_id(idx, self.config.host)]
        found = []
        for rid in host.routes:
            route = idx.routes.get(rid)
            if route is not None and tid in route.tenants():
                policy = idx.tenants[route.default].sessions.checkpoints  # a route keeps as its default tenant does
                found.append(RouteSessions(route=rid, dir=self.zoo.route_dir(rid), summarizer=route.summarizer, checkpoint_keep=policy.keep,
                                           checkpoint_every=policy.seconds))  # fmt: skip
        return tuple(found)

    def private_socket(self) -> socket.socket:
        """The router's socket for workers (a summarizer asked by another tenant's worker)."""
        assert self.sockets is not None
        private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        private.bind(str(self.sockets / "router.sock"))
        private.listen(128)
        return private

    def spawn(self, config: WorkerConfig, *, standby: bool = False) -> WorkerProcess:
        """A worker on a private socket of its own (the router is its only client): our Python
        worker, or for a llama.cpp tenant ``llama-server`` behind its front."""
        assert self.sockets is not None
        self.spawned += 1
        path = str(self.sockets / f"{self.spawned}.sock")
        if config.backend == "llama.cpp":
            return LlamaServerProcess.spawn(config, path, self.llama_server(), standby=standby)
        return ZooWorkerProcess.spawn(config, path, standby=standby)
