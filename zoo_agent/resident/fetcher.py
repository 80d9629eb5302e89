"""Fetch on first use: an on-demand tenant's pinned version made current before it loads (issue #20).

The same verified fetch as ``apply --tenant`` (``reconcile/ondemand.py``), on a thread beside the
supervisor's loop, once per ask: a fetch that failed stays failed (shown, counted) until a new
request or an index change asks again, so nothing downloads gigabytes in a loop.
"""

from __future__ import annotations

import logging
import threading

from zoo_agent.errors import UsageError
from zoo_agent.index.model import Index
from zoo_agent.resident.config import ResidentConfig
from zoo_agent.resident.crew import Crew
from zoo_agent.resident.router.app import Router
from zoo_agent.resident.slots import Slot, SlotTable
from zoo_agent.store.zoo import Zoo
from zoo_agent.systemd.notify import Notifier

__all__ = ["Fetcher"]

log = logging.getLogger("zoo_agent.resident")


class Fetcher:
    def __init__(self, crew: Crew, table: SlotTable, config: ResidentConfig, zoo: Zoo, router: Router, notify: Notifier) -> None:
        self.crew, self.table, self.config, self.zoo, self.router, self.notify = crew, table, config, zoo, router, notify

    def ready(self, slot: Slot) -> bool:
        """An on-demand tenant's pinned version is on disk; if not, its fetch starts (once per ask)."""
        if not self._not_current(slot):
            slot.fetched = ""  # there: a later fetch (the zoo changed) is a new one
            return True
        if slot.fetched == slot.pins:
            # Fetched already for this ask, and still not current: fetching again would only loop.
            self._fetch_failed(slot, f"fetching {slot.tenant} failed: {self._not_current(slot)} after its fetch")
        else:
            self._start_fetch(slot)
        return False

    def _not_current(self, slot: Slot, idx: Index | None = None) -> str:
        """Why the tenant's pinned model version is not current in the zoo ("" when it is)."""
        idx = idx or self.crew.idx
        assert idx is not None
        model = idx.tenants[slot.tenant].model
        pinned = idx.models[model].version
        version = self.zoo.read_link("models", model, "current")
        if version == pinned and self.zoo.version_dir("models", model, version).is_dir():
            return ""
        return f"model {model}@{pinned} is not current in the zoo (current: {version or 'none'})"

    def _start_fetch(self, slot: Slot) -> None:
        """Fetch on first use: the same verified fetch as `apply`, for this tenant only, beside the loop.

        It fetches what the loaded index pins (the file may say otherwise until a reload), once
        per ask: ``slot.fetched`` holds those pins until they are on disk or a request asks again."""
        from zoo_agent.reconcile.ondemand import fetch_tenant

        assert self.crew.idx is not None
        idx, tid = self.crew.idx, slot.tenant
        slot.phase, slot.fetch_pct, slot.refusal, slot.fetched, slot.fetch_failed = "fetching", 0, None, slot.pins, ""
        log.info("%s: fetching on first use", tid)
        self.notify.status(f"fetching {tid}; " + self.crew.status_line())

        def progress(done: int, total: int) -> None:
            slot.fetch_pct = 100 * done // total if total else 100

        def run() -> None:
            try:
                fetch_tenant(self.config.index, self.config.root, self.config.host, tid, progress, idx=idx)
                if missing := self._not_current(slot, idx):
                    raise UsageError(f"{missing} after its fetch (another writer swapped it?)")
            except Exception as exc:  # noqa: BLE001 - reported to the waiting requests and the journal
                self._fetch_failed(slot, f"fetching {tid} failed: {exc}")
            else:
                log.info("%s: fetched", tid)
                self.router.fetched(tid, "ok")
                with self.table.lock:
                    slot.phase = "paged_out"
                self.crew.reindex()  # the footprint: its config.json is on disk now
            self.crew.wake()

        threading.Thread(target=run, name=f"fetch-{tid}", daemon=True).start()

    def _fetch_failed(self, slot: Slot, message: str) -> None:
        """Failed, and so it stays (shown in /health and Status:, counted) until a new request
        or an index change asks again; the requests waiting for it are told why."""
        error = " ".join(message.split())[:400]
        log.error("%s", error)
        self.router.fetched(slot.tenant, "failed")
        with self.table.lock:
            slot.phase, slot.refusal, slot.error, slot.wanted, slot.fetch_failed = "failed", error, error, False, slot.fetched
        self.router.poke(slot.tenant)
