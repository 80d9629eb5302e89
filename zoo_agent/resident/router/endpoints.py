"""What the router answers itself: ``/health``, ``/v1/models``, ``/metrics`` (issues #20, #22, #32, #36).

Each reads the slot table under its lock and the router's own state (admission's queues, the
peers); ``/metrics`` adds every loaded worker's own, each sample labelled with its tenant.
``/health`` and ``/v1/models`` are the typed documents of ``wire/documents.py``; a card's
version digest and context are read from the zoo once per published version (``VersionFacts``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from zoo_agent.plan import Kind
from zoo_agent.resident.context import model_context, served_context
from zoo_agent.resident.router.admission import Admission
from zoo_agent.resident.router.federation import Federation
from zoo_agent.resident.router.peers import pinned, tenant_digest
from zoo_agent.resident.router.remote import Remotes
from zoo_agent.resident.router.upstream import Clients
from zoo_agent.resident.slots import Slot, SlotTable, Worker
from zoo_agent.resident.wire.documents import Card, CardZoo, Health, HealthTenant, PeerReport, dump
from zoo_agent.store.zoo import manifest_digest, read_manifest

if TYPE_CHECKING:
    from zoo_agent.index.model import Index, RouteEntry
    from zoo_agent.store.zoo import Zoo

__all__ = ["LATENCY_BUCKETS", "Endpoints", "Metrics"]

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The router's own metrics (the workers' are scraped and relabelled by ``Endpoints.metrics``)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.loaded = Gauge("zoo:model_loaded", "1 while the tenant's model is loaded and serving.", ["tenant"], registry=r)
        self.load_seconds = Histogram("zoo:model_load_seconds", "Seconds from spawning a tenant's worker to its first real generation.",
                                      ["tenant"], registry=r, buckets=LATENCY_BUCKETS)  # fmt: skip
        self.evictions = Counter("zoo:model_evictions", "Tenants paged out, by reason (budget: to make room; idle: keep_alive; unload: asked).",
                                 ["tenant", "reason"], registry=r)  # fmt: skip
        self.footprint = Gauge("zoo:model_footprint_bytes", "Memory the budget counts for the tenant (the larger of estimate and measurement).",
                               ["tenant"], registry=r)  # fmt: skip
        self.budget = Gauge("zoo:memory_budget_bytes", "The host's memory budget (absent: none).", registry=r)
        self.memory = Gauge("zoo:model_memory_bytes", "Memory the tenant's worker holds, read live: RAM (its cgroup's working set, else RSS; "
                            "its runtime included) and device memory; 0 while not loaded or not read.", ["tenant", "kind"], registry=r)  # fmt: skip
        self.waiting = Gauge("zoo:router_requests_waiting", "Requests waiting in the router for their tenant to load, by priority class.",
                             ["tenant", "priority"], registry=r)  # fmt: skip
        self.inflight = Gauge("zoo:router_requests_inflight", "Requests forwarded to the tenant's worker and not finished.", ["tenant"], registry=r)
        self.requests = Counter("zoo:router_requests", "Requests the router answered, by tenant and status code.", ["tenant", "code"], registry=r)
        self.retries = Counter("zoo:router_retries", "Requests sent again after their worker failed before answering.", ["tenant"], registry=r)
        self.restarts = Counter("zoo:worker_restarts", "Workers the supervisor replaced, by why (crash: it exited; hang: it stopped answering pings; "
                                "oom: the kernel killed it past its memory limit).",
                                ["tenant", "reason"], registry=r)  # fmt: skip
        self.ready = Gauge("zoo:resident_ready", "1 once every pinned tenant (or the first listed) answered a real generation.", registry=r)
        self.started = Gauge("zoo:resident_start_time_seconds", "When this resident started (Unix time).", registry=r)
        self.started.set(time.time())
        self.routed = Counter("zoo:route_requests", "Requests for a route, by the rule that chose and the tenant that answered.",
                              ["route", "rule", "tenant"], registry=r)  # fmt: skip
        self.fallbacks = Counter("zoo:route_fallbacks", "Requests that went to the next candidate before their first token, by why.",
                                 ["route", "tenant", "reason"], registry=r)  # fmt: skip
        self.fetches = Counter("zoo:on_demand_fetches", "Fetches on first use of an on-demand tenant, by result (ok, failed).",
                               ["tenant", "result"], registry=r)  # fmt: skip

    def known(self, tenant: str, on_demand: bool = False) -> None:
        """A tenant's label sets, at zero, from the moment it is known: ``increase()`` and
        ``rate()`` see its first restart, load or fetch instead of a series born at 1."""
        self.load_seconds.labels(tenant)
        self.retries.labels(tenant)
        for reason in ("budget", "idle", "unload"):
            self.evictions.labels(tenant, reason)
        for reason in ("crash", "hang", "oom"):
            self.restarts.labels(tenant, reason)
        if on_demand:
            for result in ("ok", "failed"):
                self.fetches.labels(tenant, result)


class _Static:
    """A collector that yields metric families already gathered (the workers')."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families

    def describe(self) -> list[Metric]:
        return []

def _memory(slot: Slot) -> dict[str, int | None]:
    """A tenant's memory in /health (issue #34): the estimate and what was measured of its model (the larger
    of what its loads reported and what its worker holds now, ``Worker.live``; None before any), which the
    budget counts the larger of; and its worker's own readings (RAM, runtime included; device; None: unknown)."""
    worker = slot.serving
    measured = max([slot.measured, *(w.live for w in slot.workers)])
    return {"estimate": slot.estimate, "measured": measured or None, "ram": worker.ram if worker else None,
            "device": worker.device_bytes if worker else None}  # fmt: skip


def _context(worker: Worker | None, declared: int | None, backend: str, facts: Facts) -> int | None:
    """The ``max_context`` a card shows (issue #33): what the serving worker holds requests to (its
    ``Ready``, else its config: llama-server's slot size); before one serves, what the launcher will
    give it (``resident.context``); None when the version is not fetched and nothing is declared."""
    if worker is not None:
        told = worker.ready.max_context if worker.ready is not None else None
        return told or worker.config.max_context
    if facts.context is None:
        return declared
    return served_context(declared, facts.context, facts.own, backend)


@dataclass(frozen=True)
class Facts:
    """What a published version says of itself on disk: its whole-version digest (manifest.json,
    as apply recorded it: issue #35), its default context and its own bound (``resident.context.model_context``)."""

    digest: str | None = None
    context: int | None = None
    own: int | None = None


class VersionFacts:
    """``Facts`` per published version, read once from the zoo: a published version never changes."""

    #: Versions remembered; beyond this the cache starts again (indexes come and go over months).
    MOST = 1024

    def __init__(self, zoo: Zoo | None) -> None:
        self.zoo = zoo
        self.known: dict[tuple[str, str, str], Facts] = {}

    def of(self, kind: Kind, aid: str, version: str) -> Facts:
        if self.zoo is None:
            return Facts()
        key = (kind, aid, version)
        if (found := self.known.get(key)) is not None:
            return found
        version_dir = self.zoo.version_dir(kind, aid, version)
        manifest = read_manifest(version_dir)
        if manifest is None:
            return Facts()  # not fetched yet (an on-demand tenant): asked again next time
        try:
            digest = manifest.get("digest") or manifest_digest(manifest)
        except (KeyError, TypeError):
            digest = None
        default, own = model_context(version_dir) if kind == "models" else (None, None)
        facts = Facts(digest if isinstance(digest, str) else None, default, own)
        if len(self.known) >= self.MOST:
            self.known.clear()
        self.known[key] = facts
        return facts


class Endpoints:
    """The three documents, from the table and the router's parts; ``is_ready``, ``status_line`` and ``index`` are the supervisor's word."""

    def __init__(self, table: SlotTable, own: Metrics, admission: Admission, federation: Federation, clients: Clients, *,
                 is_ready: Callable[[], bool], status_line: Callable[[], str], index: Callable[[], Index | None],
                 routes: Callable[[], Mapping[str, RouteEntry]] = dict, zoo: Zoo | None = None, remotes: Remotes | None = None) -> None:  # fmt: skip
        self.table, self.own, self.admission, self.federation, self.clients = table, own, admission, federation, clients
        self.remotes = remotes  # the remote tenants (issue #36): no worker, their own health
        self.is_ready, self.status_line, self.index, self.routes = is_ready, status_line, index, routes
        self.facts = VersionFacts(zoo)

    def health(self) -> tuple[int, bytes]:
        tenants: dict[str, HealthTenant] = {}
        t = time.monotonic()
        with self.table.lock:
            for tid in self.table.order:
                slot = self.table.slots[tid]
                if slot.remote and self.remotes is not None:
                    tenants[tid] = self.remotes.health(slot, t)
                    continue
                worker = slot.serving
                away = worker.stats.unavailable if worker else ""  # its Ollama daemon is away: up, answering 503 (issue #35)
                tenants[tid] = HealthTenant.model_validate({
                    "state": "unavailable" if away else slot.phase, "pinned": slot.pinned, "model": worker.config.model if worker else None,
                    "version": worker.config.version if worker else None, "running": worker.stats.running if worker else 0,
                    "waiting": (worker.stats.waiting if worker else 0) + slot.queued, "inflight": slot.inflight,
                    "idle_seconds": round(t - slot.last_used, 1) if slot.last_used else None, "footprint": slot.footprint,
                    "memory": _memory(slot),  # issue #34
                    **({"fetch_pct": slot.fetch_pct} if slot.phase == "fetching" else {}),
                    **({"error": slot.refusal or slot.error or away} if slot.refusal or slot.error or away else {})})  # fmt: skip
        state = "stopping" if self.admission.stopping else ("ready" if self.is_ready() else "starting")
        peers = {"peers": {host: PeerReport(**entry) for host, entry in self.federation.report().items()}} if self.federation.table else {}
        body = Health(state=state, status=self.status_line(), budget=self.table.budget, tenants=tenants, **peers)
        return (200 if state == "ready" else 503), json.dumps(dump(body)).encode()

    def models(self) -> list[dict[str, Any]]:
        """Every tenant the host serves, loaded or not, with its adapters (as vLLM lists LoRA modules) and
        what it can do; then the host's routes, each with the tenants it may send a request to (issue #36)."""
        idx = self.index()
        if idx is None:
            return []
        data: list[Card] = []

        def card(mid: str, root: str, parent: str | None, x_zoo: CardZoo) -> Card:
            return Card(id=mid, object="model", created=0, owned_by="model-zoo", root=root, parent=parent, x_zoo=x_zoo)

        for tid in self.table.order:
            slot, tenant = self.table.slots[tid], idx.tenants[tid]
            if tenant.remote is not None and self.remotes is not None:
                data.append(self.remotes.card(tid, tenant, slot.phase))
                continue
            worker = slot.serving
            root = f"{worker.config.model}@{worker.config.version}" if worker else pinned(idx, tid)
            refused = worker.config.refused_adapters if worker else {}
            # What peers compare with their index (issue #22): the digest vouches only for
            # exactly the pinned set; mid-swap or with a refused adapter there is none.
            digest = tenant_digest(idx, tid) if root == pinned(idx, tid) and not refused else None
            adapters = [f"{tid}:{lid}" for lid in tenant.loras if lid not in refused]
            auto = [f"{tid}:auto"] if tenant.adapter_selection is not None and tenant.backend != "llama.cpp" else []  # not there yet (llamalora.py)
            version = worker.config.version if worker else idx.models[tenant.model].version
            facts = self.facts.of("models", tenant.model, version)
            own = card(tid, root, None, CardZoo(kind="tenant", state=slot.phase, model=root, digest=digest, version_digest=facts.digest,
                                                backend=tenant.backend, task="embed" if tenant.kind == "embedding" else "generate",
                                                max_context=_context(worker, tenant.resources.max_context, tenant.backend, facts),
                                                adapters=adapters + auto))  # fmt: skip
            data.append(own)
            for lid in tenant.loras:
                if lid not in refused:
                    label = f"{lid}@{idx.loras[lid].version}"
                    data.append(card(f"{tid}:{lid}", label, tid, CardZoo(kind="adapter", state=slot.phase,
                                                                          version_digest=self.facts.of("loras", lid, idx.loras[lid].version).digest)))
            if auto:
                data.append(card(auto[0], "chosen per request", tid, CardZoo(kind="adapter", state=slot.phase)))
        for rid, route in self.routes().items():
            data.append(card(rid, rid, None, CardZoo(kind="route", tenants=route.tenants(), description=route.description)))
        return [dump(c) for c in data]

    async def metrics(self) -> bytes:
        """The router's own metrics, then every loaded worker's, each sample labelled with its tenant."""
        m, table = self.own, self.table
        with table.lock:
            serving = {tid: s.path for tid, s in table.slots.items() if s.path is not None and not s.remote}  # a remote tenant has no /metrics here
            for tid, slot in table.slots.items():
                m.loaded.labels(tid).set(1 if slot.path is not None else 0)
                m.footprint.labels(tid).set(slot.footprint)
                worker = slot.serving  # issue #34: what it holds, measured
                m.memory.labels(tid, "ram").set((worker.ram if worker else None) or 0)
                m.memory.labels(tid, "device").set((worker.device_bytes if worker else None) or 0)
                m.inflight.labels(tid).set(slot.inflight)
                counts = self.admission.counts_by_class(tid)
                for name in ("system", "realtime", "default", "batch"):
                    m.waiting.labels(tid, name).set(counts.get(name, 0))
            if table.budget is not None:
                m.budget.set(table.budget)
            m.ready.set(1 if self.is_ready() and not self.admission.stopping else 0)

        async def scrape(tid: str, path: str) -> tuple[str, str]:
            try:
                response = await self.clients.to(path).get("/metrics", timeout=2.0)
                return tid, response.text if response.status_code == 200 else ""
            except (httpx.HTTPError, OSError):
                return tid, ""

        texts = await asyncio.gather(*(scrape(tid, path) for tid, path in serving.items()))
        families: dict[str, Metric] = {}
        for tid, text in texts:
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError:
                continue
            for family in parsed:
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
                for sample in family.samples:
                    merged.samples.append(sample._replace(labels={**sample.labels, "tenant": tid}))
        registry = CollectorRegistry()
        registry.register(_Static(list(families.values())))
        return generate_latest(m.registry) + generate_latest(registry)
