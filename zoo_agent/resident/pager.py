"""What is loaded: paging under the memory budget, and fetch on first use (issues #20, #32).

Each tick the pager takes the tenants that requests wait for (and the pinned ones), in priority
order, and asks ``paging.decide`` (pure) whether each loads now, evicts the least recently used
to make room, waits for busy ones, or is refused. An on-demand tenant whose pinned version is
not on disk is fetched first, by the same verified fetch as ``apply``, on a thread beside the
loop. It also keeps the slot table following the index (each tenant's footprint, pins, priority).
The pager decides; the crew (the supervisor) starts and drains the processes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from zoo_agent.errors import ZooError
from zoo_agent.formats import parse_memory, parse_timespan
from zoo_agent.index.model import Index
from zoo_agent.resident.config import ResidentConfig
from zoo_agent.resident.crew import Crew
from zoo_agent.resident.fetcher import Fetcher
from zoo_agent.resident.launch import Launcher
from zoo_agent.resident.paging import Evict, Live, Load, Refuse, Wait, decide, expired
from zoo_agent.resident.reports import Reports
from zoo_agent.resident.router.app import Router
from zoo_agent.resident.slots import Order, Outcome, Slot, SlotTable, Worker
from zoo_agent.resident.wire.priority import CLASSES
from zoo_agent.store.zoo import Zoo
from zoo_agent.systemd.notify import Notifier

__all__ = ["Pager"]

log = logging.getLogger("zoo_agent.resident")


class Pager:
    def __init__(self, crew: Crew, table: SlotTable, config: ResidentConfig, zoo: Zoo, launcher: Launcher, router: Router,
                 reports: Reports, notify: Notifier) -> None:  # fmt: skip
        self.crew = crew
        self.table = table
        self.config = config
        self.zoo = zoo
        self.launcher = launcher
        self.router = router
        self.reports = reports
        self.notify = notify
        self.fetcher = Fetcher(crew, table, config, zoo, router, notify)
        self.pending: list[tuple[Order, Worker | None, tuple[str, ...]]] = []  # orders under way: the worker an unload drains, what a load evicts

    def take_index(self, idx: Index, host: str) -> None:
        """The slot table follows the index: new tenants paged out, gone ones drained."""
        served = list(idx.hosts[host].served())
        with self.table.lock:
            for tid in served:
                slot = self.table.slots.get(tid) or Slot(tid)
                self._take_tenant(idx, slot)
                self.table.slots[tid] = slot
                self.router.known(tid, on_demand=slot.fetch == "on-demand")
            for tid in [t for t in self.table.slots if t not in served]:
                slot = self.table.slots.pop(tid)
                for worker in slot.workers:
                    self.crew.drain(slot, worker, "removed")
                slot.path = None
                slot.refusal = f"tenant '{tid}' is no longer served by this host"
            self.table.order = served
            memory_budget = idx.hosts[host].memory_budget
            self.table.budget = parse_memory(memory_budget) if memory_budget else None
            self.table.max_loaded = idx.hosts[host].max_loaded

    def _take_tenant(self, idx: Index, slot: Slot) -> None:
        """A slot's settings and footprint under ``idx``; a failed fetch of other pins is forgotten
        (the index changed: the next request fetches anew)."""
        from zoo_agent.index.fit import read_config, tenant_footprint
        from zoo_agent.reconcile.ondemand import pins

        tenant = idx.tenants[slot.tenant]
        slot.pinned, slot.fetch = tenant.pinned, tenant.fetch
        slot.keep_alive = parse_timespan(tenant.keep_alive) if tenant.keep_alive is not None and not tenant.pinned else None
        slot.priority = CLASSES[tenant.priority]
        if tenant.remote is not None:  # answered by a server elsewhere: always loaded, no process, no memory (issue #36)
            from zoo_agent.resident.router.remote import take_remote_slot

            take_remote_slot(slot, tenant, self.crew)
            return
        slot.remote = ""
        slot.capacity = tenant.resources.max_batch + tenant.resources.max_queue
        version = self.zoo.read_link("models", tenant.model, "current")
        config = read_config(self.zoo.version_dir("models", tenant.model, version)) if version else None
        slot.estimate = tenant_footprint(idx, slot.tenant, config).total
        slot.measured = self.reports.measured(slot.tenant, f"{tenant.model}@{version}") if version else 0
        slot.pins = pins(idx, self.config.host, slot.tenant) if slot.fetch == "on-demand" else ""
        if slot.fetch_failed and slot.fetch_failed != slot.pins:
            slot.fetch_failed = slot.fetched = slot.error = ""
            if slot.phase == "failed":
                slot.phase, slot.refusal = "paged_out", None

    def live(self) -> list[Live]:
        """What holds memory now: loaded workers, workers being prepared, and drained ones until they exit."""
        live = []
        for slot in self.table.slots.values():
            for worker in slot.workers:
                if worker.standby:
                    continue  # its runtime only: the weights wait for the budget
                live.append(Live(slot.tenant, slot.footprint, slot.pinned, slot.busy, worker.state == "serving" and slot.incoming is None,
                                 slot.last_used, slot.loaded_at, keep_alive=slot.keep_alive))  # fmt: skip
            if not slot.workers and self.crew.preparing(slot):
                live.append(Live(slot.tenant, slot.footprint, slot.pinned, True, False, slot.last_used))  # loading: never evicted
        live += [Live(slot.tenant, slot.footprint, slot.pinned, True, False, draining=True) for slot, _ in self.crew.retiring]
        return live

    def _wanted(self, t: float) -> list[Slot]:
        """What should be loaded, first first: pinned, then by priority, then least recently used."""
        with self.table.lock:
            wanted = [s for s in self.table.slots.values() if ((s.wanted or s.pinned) and s.phase in ("paged_out", "failed") and t >= s.restart_at)
                      or (s.serving is not None and s.serving.standby) or (s.incoming is not None and s.incoming.standby)]  # fmt: skip
        wanted = [s for s in wanted if not s.remote]  # a remote tenant (issue #36) is never loaded: a server elsewhere answers it
        wanted.sort(key=lambda s: (not s.pinned, s.priority, s.last_used))
        return wanted

    def page(self, t: float) -> None:
        """Unload what stayed idle past its keep_alive; load what is wanted, in priority order of what
        waits for it; evict least recently used to make room."""
        self.take_orders(t)
        self.unload_idle(t)
        for slot in self._wanted(t):
            if slot.phase == "failed":
                # A failed load or fetch is tried again by a new request, never in a loop: the router
                # clears the refusal only for a request that arrives after the failure. The request
                # that saw it fail may still be waiting to be told (it counts as queued till then).
                if slot.refusal is not None or not slot.queued:
                    continue
                slot.fetched = ""  # asked again
            if slot.tenant in self.reports.gap_from and any(s is slot for s, _ in self.crew.retiring):
                continue  # a stop-first reload: the new version loads once the old one has exited
            if slot.fetch == "on-demand" and not self.fetcher.ready(slot):
                continue
            with self.table.lock:
                decision = decide(self.table.budget, self.live(), slot.tenant, slot.footprint, self.config.paging_policy, self.table.max_loaded)
            if isinstance(decision, Load):
                self.load(slot)
            elif isinstance(decision, Evict):
                for victim in decision.victims:
                    self.evict(self.table.slots[victim], "budget")
                self.load(slot, standby=True)  # its runtime starts while they exit; its weights wait
                return  # their memory is in use until they exit: decide again then
            elif isinstance(decision, Refuse):
                if slot.incoming is not None and slot.incoming.standby:
                    # A reload's new version that no longer fits beside the old one (the index changed meanwhile):
                    # that reload fails, the old version keeps serving (the supervisor hears of its exit).
                    slot.incoming.error = decision.reason
                    slot.incoming.process.kill()
                    continue
                if slot.serving is not None and slot.serving.standby:
                    self.crew.drain(slot, slot.serving, "refused")  # on standby: it exits without loading anything
                    with self.table.lock:
                        slot.phase = "paged_out"
                self.refuse(slot, decision.reason)
            elif isinstance(decision, Wait):
                if slot.blocked != decision.reason:
                    log.info("%s", decision.reason)
                slot.blocked = decision.reason
                if slot.serving is None and any(w.draining for w in self.live()):
                    self.load(slot, standby=True)  # the memory comes back when they exit: start the runtime now
                return

    def room_beside(self, slot: Slot) -> tuple[str, ...]:
        """The idle tenants whose paging out lets a reload load ``slot``'s new version beside its old one
        (which keeps serving meanwhile, and is never its own victim); () when nothing would make room."""
        with self.table.lock:
            live = [replace(w, evictable=False) if w.tenant == slot.tenant else w for w in self.live()]
            decision = decide(self.table.budget, live, slot.tenant, slot.footprint, self.config.paging_policy, self.table.max_loaded)
        return decision.victims if isinstance(decision, Evict) else ()

    def unload_idle(self, t: float) -> None:
        """Workers that served nothing for their tenant's keep_alive are paged out (issue #34)."""
        with self.table.lock:
            idle = expired(self.live(), t)
        for tid in idle:
            self.evict(self.table.slots[tid], "idle")

    # -- an operator's load and unload (issue #34) ------------------------------------------------
    def take_orders(self, t: float) -> None:
        """The orders the router put in the table since the last tick are started; those under way
        are answered once done (a load: its worker serves or is refused; an unload: its worker exited)."""
        with self.table.lock:
            orders = list(self.table.orders)
            self.table.orders.clear()
        for order in orders:
            slot = self.table.slots.get(order.tenant)
            if slot is None:
                order.answer(Outcome(404, f"tenant '{order.tenant}' is not served by this host", code="model_not_found"))
            elif order.action == "load":
                self._order_load(order, slot, t)
            else:
                self._order_unload(order, slot)
        self.pending = [(order, worker, evicted) for order, worker, evicted in self.pending
                        if not order.done.done() and not self._finished(order, worker, evicted, t)]  # fmt: skip

    def _order_load(self, order: Order, slot: Slot, t: float) -> None:
        """Loaded already: said so (its keep_alive counts from now). Else it loads as for a request, once it
        fits; one that would page out idle tenants only with ``evict``, else the answer names them."""
        tid = slot.tenant
        with self.table.lock:
            if slot.serving is not None and slot.serving.state == "serving":
                slot.last_used = t
                order.answer(Outcome(200, f"{tid} is loaded", slot.phase))
                return
            if slot.phase in ("paged_out", "failed"):
                slot.refusal = None  # asked again, as a new request asks
                if slot.phase == "failed":
                    slot.phase, slot.fetched = "paged_out", ""
            evicted: tuple[str, ...] = ()
            if slot.phase == "paged_out" and not self.crew.preparing(slot):
                decision = decide(self.table.budget, self.live(), tid, slot.footprint, self.config.paging_policy, self.table.max_loaded)
                if isinstance(decision, Refuse):
                    order.answer(Outcome(409, decision.reason, slot.phase, code="does_not_fit"))
                    return
                if isinstance(decision, Evict):
                    if not order.evict:
                        order.answer(Outcome(409, f"loading {tid} would page out {', '.join(decision.victims)} to make room; "
                                                  "ask again with evict to do it", slot.phase, code="would_evict", evicted=decision.victims))  # fmt: skip
                        return
                    evicted = decision.victims
            slot.wanted, slot.last_used = True, t
        log.info("%s: load asked%s", tid, f" (evicting {', '.join(evicted)})" if evicted else "")
        self.pending.append((order, None, evicted))

    def _order_unload(self, order: Order, slot: Slot) -> None:
        """Its worker drains (what is in flight completes) and exits; a request that arrives after loads it again."""
        tid = slot.tenant
        if slot.pinned:
            order.answer(Outcome(409, f"tenant '{tid}' is pinned: it is never unloaded (unpin it in the index first)", slot.phase, code="pinned"))
            return
        if slot.phase in ("loading", "fetching") or slot.incoming is not None or self.crew.preparing(slot):
            what = "reloading" if slot.incoming is not None else slot.phase
            order.answer(Outcome(409, f"tenant '{tid}' is {what}: unload it once it serves", slot.phase, code="model_loading"))
            return
        worker = slot.serving
        if worker is None:
            retiring = [w for s, w in self.crew.retiring if s is slot]
            if not retiring:
                order.answer(Outcome(200, f"{tid} is not loaded", slot.phase))
                return
            worker = retiring[-1]  # paged out already, still exiting: answered once it has
        else:
            with self.table.lock:
                slot.wanted = slot.queued > 0  # requests waiting for a place load it again once it has exited
            self.evict(slot, "unload")
        self.pending.append((order, worker, ()))

    def _finished(self, order: Order, worker: Worker | None, evicted: tuple[str, ...], t: float) -> bool:
        """Answered if done: a load serves (or was refused, or the tenant is gone); an unload's worker exited."""
        slot = self.table.slots.get(order.tenant)
        took = f" in {t - order.asked:.1f}s"
        if slot is None:
            order.answer(Outcome(404, f"tenant '{order.tenant}' is no longer served by this host", code="model_not_found"))
        elif order.action == "unload":
            assert worker is not None
            if worker is slot.serving or any(w is worker for _, w in self.crew.retiring):
                return False
            order.answer(Outcome(200, f"{slot.tenant} unloaded{took}", slot.phase))
        elif slot.serving is not None and slot.serving.state == "serving":
            order.answer(Outcome(200, f"{slot.tenant} loaded{took}" + (f", paging out {', '.join(evicted)}" if evicted else ""),
                                 slot.phase, evicted=evicted))  # fmt: skip
        elif slot.refusal is not None:
            order.answer(Outcome(503, slot.refusal, slot.phase, code="model_unavailable"))
        else:
            return False
        return True

    # -- load, evict, refuse -------------------------------------------------------------------
    def load(self, slot: Slot, standby: bool = False) -> None:
        """Start the tenant's worker (``standby``: its runtime only, until ``Proceed``); a worker
        already on standby is told to load its weights now."""
        worker = slot.incoming if slot.incoming is not None and slot.incoming.standby else slot.serving
        if worker is not None and worker.standby:
            if not standby:
                worker.standby = False
                worker.process.proceed()
                log.info("%s: the budget has room; loading its weights%s", slot.tenant, " (its new version)" if worker is slot.incoming else "")
            return
        assert self.crew.idx is not None
        try:
            config = self.launcher.worker_config(self.crew.idx, slot.tenant)
        except ZooError as exc:
            self.refuse(slot, str(exc), failed=True)
            return
        with self.table.lock:
            slot.phase, slot.refusal, slot.error, slot.blocked = "loading", None, "", ""
        slot.incoming = None
        self.crew.start(slot, config, standby=standby)
        self.notify.status(f"loading {slot.tenant}; " + self.crew.status_line())

    def evict(self, slot: Slot, reason: str) -> None:
        log.info("%s: paged out (%s; idle %.0fs)", slot.tenant, reason, time.monotonic() - max(slot.last_used, slot.loaded_at))
        slot.evictions += 1
        self.router.evicted(slot.tenant, reason)
        worker = slot.serving
        with self.table.lock:
            slot.serving, slot.path, slot.phase = None, None, "draining"
            idle = slot.inflight == 0
        if worker is not None:
            self.reports.paged("page-out", slot, f"{worker.config.model}@{worker.config.version}", reason=reason)
            self.crew.drain(slot, worker, reason)
            if idle:
                # Its idle keep-alive connections would hold the drain for 2 s (the worker waits that long
                # for a client to send on an open connection); nothing is in flight, so close them now.
                self.router.forget(worker.path)

    def refuse(self, slot: Slot, reason: str, failed: bool = False) -> None:
        with self.table.lock:
            if failed:
                slot.phase = "failed"
            slot.refusal, slot.wanted, slot.error = reason, False, reason if failed else slot.error
        log.error("%s: %s", slot.tenant, reason)
        self.router.poke(slot.tenant)
