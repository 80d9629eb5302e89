"""Similarity rules of routes (`when: {"similar_to": ...}`), measured in the router (issue #21).

Where the embedding runs: in the router's process (the supervisor's), on one thread of its
own, never on the event loop. The decision has to be made before a tenant is chosen, so
the tenants' workers cannot do it (the one that would embed may be paged out, and waiting
for it to load defeats the routing); a worker of its own would add a process to supervise
and a socket hop per request for a model that is small and read-only. The cost is torch
imported in the supervisor's process, and only on a host whose routes have a similarity
rule: nothing is imported or loaded otherwise. Loading starts when the index is taken (in
the background: READY does not wait for it); a request that comes before it waits on the
same thread, behind the load. Only a version `current` names, whose bytes match its
manifest, is loaded (as for adapters); otherwise the route's similarity rules do not match
and answers say why.

The numbers go to the pure decision (routing.py) as features; the embedder is
selection.py's `Embedder`, the same one `<tenant>:auto` uses.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo_agent.reconcile.verify import verify

if TYPE_CHECKING:
    from zoo_agent.index.model import Index
    from zoo_agent.resident.embedder import Embedder
    from zoo_agent.store.zoo import Zoo

__all__ = ["RouteTasks", "Similarity", "route_tasks"]

log = logging.getLogger("zoo_agent.resident")


@dataclass(frozen=True)
class RouteTasks:
    """One route's described tasks and the embedding model (at its current version) that measures them."""

    route: str
    model: str
    version: str | None  # None: not in the zoo
    tasks: tuple[str, ...]


def route_tasks(zoo: Zoo, idx: Index, host_id: str) -> tuple[RouteTasks, ...]:
    """The host's routes that have similarity rules: the only ones that cost an embedder."""
    out = []
    for rid in idx.hosts[host_id].routes:
        route = idx.routes.get(rid)
        tasks = tuple(dict.fromkeys(r.when.similar_to for r in route.rules if r.when.similar_to is not None)) if route else ()
        if route is not None and tasks and route.embedding_model is not None:
            out.append(RouteTasks(rid, route.embedding_model, zoo.read_link("models", route.embedding_model, "current"), tasks))
    return tuple(out)


class Similarity:
    """Every route's task vectors and their embedders. All state lives on the embedding thread:
    ``take`` and ``scores`` both run there, in order, so nothing is shared and nothing locks."""

    def __init__(self, zoo: Zoo) -> None:
        self.zoo = zoo
        self.executor: ThreadPoolExecutor | None = None
        self.embedders: dict[str, Embedder] = {}  # "model@version" -> loaded
        self.vectors: dict[str, tuple[Embedder, tuple[str, ...], Any]] = {}  # route -> (embedder, tasks, their vectors)
        self.unavailable: dict[str, str] = {}  # route -> why its similarity rules cannot be measured

    def take(self, wanted: tuple[RouteTasks, ...]) -> None:
        """From the supervisor's thread: load what the routes need, in the background; drop the rest."""
        if not wanted and self.executor is None:
            return  # no similarity rule here: no thread, no torch
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="route-embedding")
        self.executor.submit(self._take, wanted)

    async def scores(self, route: str, text: str) -> tuple[dict[str, float], str | None]:
        """({task: cosine similarity of ``text``}, None), or ({}, why) when the route cannot measure."""
        if self.executor is None:
            return {}, "no embedding model is loaded for this route"
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self._scores, route, text)
        except Exception as exc:  # noqa: BLE001 - an embedder that fails (or shut down at stop) means: no similarity, not a 500
            return {}, f"embedding failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    # -- the embedding thread --------------------------------------------------------------------
    def _take(self, wanted: tuple[RouteTasks, ...]) -> None:
        vectors: dict[str, tuple[Embedder, tuple[str, ...], Any]] = {}
        unavailable: dict[str, str] = {}
        keep: set[str] = set()
        for want in wanted:
            label = f"{want.model}@{want.version}"
            try:
                embedder = self._embedder(want)
                old = self.vectors.get(want.route)
                if old is None or old[0] is not embedder or old[1] != want.tasks:
                    old = (embedder, want.tasks, embedder.embed(list(want.tasks)))
                vectors[want.route] = old
                keep.add(label)
            except _Unavailable as exc:
                unavailable[want.route] = str(exc)
            except Exception as exc:  # a model that does not load is the route's problem, not the router's
                unavailable[want.route] = f"{label}: failed to load: {type(exc).__name__}: {exc}"
        for route, why in unavailable.items():
            if self.unavailable.get(route) != why:
                log.warning("route %s: similarity rules do not match (%s)", route, why)
        self.vectors, self.unavailable = vectors, unavailable
        self.embedders = {k: v for k, v in self.embedders.items() if k in keep}

    def _embedder(self, want: RouteTasks) -> Embedder:
        from zoo_agent.resident.embedder import Embedder

        if want.version is None or not self.zoo.version_dir("models", want.model, want.version).is_dir():
            raise _Unavailable(f"{want.model}: not in the zoo at {self.zoo.root}; run: zoo-agent apply")
        label = f"{want.model}@{want.version}"
        if label not in self.embedders:
            import torch

            # Process-wide, and this process runs no other torch: one short message needs no
            # parallelism, and the cores belong to the workers (two threads under their load
            # were up to 8x slower here than one).
            torch.set_num_threads(1)
            report = verify(self.zoo, [("models", want.model, want.version)], jobs=2)
            if report.findings:
                raise _Unavailable(f"{label}: failed verification: {report.findings[0].line(self.zoo)}")
            self.embedders[label] = Embedder(Path(self.zoo.version_dir("models", want.model, want.version)))
            log.info("route embedding model %s loaded", label)
        return self.embedders[label]

    def _scores(self, route: str, text: str) -> tuple[dict[str, float], str | None]:
        loaded = self.vectors.get(route)
        if loaded is None:
            return {}, self.unavailable.get(route, "no embedding model is loaded for this route")
        embedder, tasks, vectors = loaded
        row = (embedder.embed([text]) @ vectors.T)[0]
        return {task: float(score) for task, score in zip(tasks, row.tolist(), strict=True)}, None


class _Unavailable(Exception):
    """The route's embedding model is not in the zoo or fails verification."""
