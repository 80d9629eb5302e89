"""Reloads: a HUP, or ``current`` moving under a loaded tenant (issues #5, #20, #32).

A reload reads the index again and swaps every loaded tenant whose version or settings changed:
the new version loads beside the old one when memory allows (no request waits), or when paging
out idle tenants makes room for both (under a memory budget), else the old one stops first and
requests wait in the router. A reload that fails keeps the old version serving
and says why (``last_error``, ``Status:``). Adapters whose ``current`` moved are swapped inside
the running worker, without a restart.
"""

from __future__ import annotations

import logging

from zoo_agent.errors import ZooError
from zoo_agent.formats import parse_memory
from zoo_agent.index.load import load_index
from zoo_agent.resident.config import ResidentConfig, WorkerConfig
from zoo_agent.resident.crew import Crew
from zoo_agent.resident.launch import Launcher
from zoo_agent.resident.memory import mem_available, rss
from zoo_agent.resident.pager import Pager
from zoo_agent.resident.reports import Reports
from zoo_agent.resident.slots import Slot, SlotTable, Worker
from zoo_agent.resident.tenant import adapters_for
from zoo_agent.store.zoo import Zoo
from zoo_agent.systemd.notify import Notifier

__all__ = ["Reloader"]

log = logging.getLogger("zoo_agent.resident")


class Reloader:
    """The reload in progress, and the counters ``state.json`` and ``/metrics`` show."""

    def __init__(self, crew: Crew, table: SlotTable, config: ResidentConfig, zoo: Zoo, launcher: Launcher, pager: Pager,
                 reports: Reports, notify: Notifier) -> None:  # fmt: skip
        self.crew = crew
        self.table = table
        self.config = config
        self.zoo = zoo
        self.launcher = launcher
        self.pager = pager
        self.reports = reports
        self.notify = notify
        self.reloads = 0
        self.attempts = 0
        self.pending: set[str] = set()  # tenants of the reload in progress
        self.joined = 0  # reload requests that arrived while one was in progress (they share its outcome)
        self.swapped: list[str] = []  # what the last reload swapped: "code coder@2"
        self.last_error = ""

    def hup(self) -> None:
        """Read the index again; swap every loaded tenant whose version or settings changed."""
        if self.pending:
            # One is under way (`current` moved, or a HUP before): this one joins it, counted with it, so
            # `zoo-agent resident reload` waits for that swap instead of saying there is nothing to reload.
            self.attempts += 1
            self.joined += 1
            self.reports.state()
            return
        self.attempts += 1
        with self.table.lock:
            for slot in self.table.slots.values():
                # The index or the zoo may have changed: a request may try again. A failed fetch stays
                # failed (a reload must not download gigabytes that fail again): take_index forgets it
                # only when the tenant's pins changed, and a request asks again anyway.
                if slot.phase == "failed" and not slot.fetch_failed:
                    slot.phase, slot.refusal = "paged_out", None
        try:
            changes = self._changes()
        except Exception as exc:  # noqa: BLE001 - a bad index or zoo keeps the old versions serving
            self.last_error = f"reload refused: {exc}"
            self.reports.state()
            self.notify.status(f"reload refused: {exc}; " + self.crew.status_line())
            log.error("reload refused: %s", exc)
            return
        if not changes:
            self.reloads += 1
            self.last_error = ""
            self.swapped = []
            self.reports.state()
            log.info("reload: every loaded tenant serves its current version already")
            return
        self.notify.reloading("reloading " + ", ".join(f"{t} to {c.model}@{c.version}" for t, c in changes.items()))
        self.pending = set(changes)
        self.swapped = [f"{t} {c.model}@{c.version}" for t, c in changes.items()]
        for tid, config in changes.items():
            slot = self.table.slots[tid]
            if slot.serving is None:
                # Paged out to make room for another tenant's new version (``_swap``): nothing of it to swap;
                # its next request loads what the index says now.
                self.pending.discard(tid)
                self.swapped = [s for s in self.swapped if not s.startswith(f"{tid} ")]
                continue
            self._swap(slot, config)  # the first always has one: changes are of serving tenants
        self.reports.state()

    def _changes(self) -> dict[str, WorkerConfig]:
        """The loaded tenants whose worker would start otherwise under the index and zoo of now."""
        idx = self.crew.load_index()
        self.crew.take_index(idx)
        changes = {}
        for slot in self.table.slots.values():
            if slot.serving is not None and slot.serving.state == "serving" and slot.incoming is None:
                config = self.launcher.worker_config(idx, slot.tenant)
                if config != slot.serving.config:
                    changes[slot.tenant] = config
        return changes

    def _swap(self, slot: Slot, config: WorkerConfig) -> None:
        if self._fits_beside(slot, config):
            self.crew.start(slot, config, incoming=True)
            return
        old = slot.serving
        assert old is not None
        if self.table.budget is not None and (victims := self.pager.room_beside(slot)):
            # Idle tenants make room (issue #34): the old version keeps serving; the new one's runtime starts now
            # and its weights load once their processes have exited (the pager proceeds it, as for any standby worker).
            log.info("memory does not allow two versions of %s at once: paging out %s to load %s beside %s",
                     slot.tenant, ", ".join(victims), config.version, old.config.version)  # fmt: skip
            for victim in victims:
                self.pager.evict(self.table.slots[victim], "budget")
            self.crew.start(slot, config, standby=True, incoming=True)
            return
        # Two versions do not fit: stop the old one first; its requests wait in the router.
        log.info("memory does not allow two versions of %s at once: stopping %s before loading %s", slot.tenant, old.config.version, config.version)
        self.reports.gap_from[slot.tenant] = old.config.version
        self.crew.drain(slot, old, "reload")
        with self.table.lock:
            slot.path, slot.phase, slot.wanted = None, "paged_out", True

    def done(self, tid: str, ok: bool) -> None:
        """``tid``'s part of the reload in progress ended (its new worker serves, or failed)."""
        if tid not in self.pending:
            return
        self.pending.discard(tid)
        if not self.pending:
            if ok and not self.last_error:
                self.reloads += 1 + self.joined
            self.joined = 0
            self.reports.state()

    def failed(self, slot: Slot, message: str) -> None:
        """A reload's new version of ``slot`` did not start: said why; the old one keeps serving."""
        self.last_error = message
        log.error("%s; still serving %s", message, slot.serving.config.version if slot.serving else "nothing")
        self.done(slot.tenant, ok=False)
        self.tell(slot)
        self.notify.ready(f"{message}; " + self.crew.status_line())

    def _fits_beside(self, slot: Slot, config: WorkerConfig) -> bool:
        """Can the new version load while the old one still serves?"""
        if self.table.budget is not None:
            used = sum(live.footprint for live in self.pager.live())
            return used + slot.footprint <= self.table.budget
        need = sum(f.stat().st_size for f in config.version_dir.rglob("*") if f.suffix in (".safetensors", ".gguf")) * 1.2
        limit = parse_memory(config.memory_max) if config.memory_max else None
        if limit is not None:
            used = rss(slot.serving.pid) if slot.serving else 0
            return used + need <= limit
        available = mem_available()
        if available is None:
            log.warning("MemAvailable is unreadable (/proc/meminfo hidden?); reloading stop-first, as if the new version did not fit")
            return False
        return need <= available

    def follow_current(self) -> None:
        """A loaded tenant's model ``current`` moved: reload; its adapters' moved: swap them in place."""
        for slot in list(self.table.slots.values()):
            worker = slot.serving
            if worker is None or slot.incoming is not None or worker.state != "serving":
                continue
            current = self.zoo.read_link("models", worker.config.model, "current")
            if current and current != worker.config.version:
                log.info("current of %s moved to %s: reloading %s", worker.config.model, current, slot.tenant)
                self.hup()
                return
            self.follow_adapters(slot, worker)

    def follow_adapters(self, slot: Slot, worker: Worker) -> None:
        """An adapter's `current` moved (or a refused one arrived): the worker swaps it in place, no restart
        (a llama.cpp tenant's ``llama-server`` cannot: a new one starts beside it, as for a new model version)."""
        config = worker.config
        ids = [a.id for a in config.adapters] + list(config.refused_adapters)
        serving = {a.id: a.version for a in config.adapters}
        if all(self.zoo.read_link("loras", aid, "current") == serving.get(aid) for aid in ids):
            return
        try:
            idx = load_index(self.config.index, str(self.config.index))
            adapters, refused = adapters_for(self.zoo, idx, config.tenant)
        except (ZooError, KeyError) as exc:
            log.warning("adapters not followed: %s", exc)
            return
        if config.backend == "llama.cpp" and (adapters, refused) != (config.adapters, config.refused_adapters):
            log.info("%s: adapters now %s: starting a new llama-server with them", slot.tenant, ", ".join(a.label for a in adapters) or "none")
            self.hup()  # llama-server loads its adapters at its start: a new set is a new worker (a swap, as for a new version)
            return
        worker.config = config.model_copy(update={"adapters": adapters, "refused_adapters": refused})
        if adapters != config.adapters:
            log.info("%s: adapters now %s: swapping in place", slot.tenant, ", ".join(a.label for a in adapters) or "none")
            if not worker.process.set_adapters(adapters):
                log.warning("could not tell worker %d about new adapters", worker.pid)
            if worker.ready is not None:
                self.reports.loaded(slot, worker, worker.ready)  # what gc must keep: the versions it serves now

    def tell(self, slot: Slot) -> None:
        """zoo:reloads_total{result} lives in the worker's /metrics; only we know."""
        if slot.serving is not None:
            slot.serving.process.tell_reloads(self.reloads, self.attempts - self.reloads)
