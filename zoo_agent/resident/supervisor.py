"""The resident's main process: runs the router and one worker process per loaded tenant, talks to systemd (issues #5, #20, #32).

One loop, ticking a few times a second: read worker events, ping workers, replace dead or hung
ones with backoff, let the pager load what requests wait for and evict what the memory budget
cannot keep, let the reloader follow ``current``, feed the watchdog only from observed progress,
and dispatch the flags that signal handlers set (they do nothing else).

The supervisor owns the processes (``WorkerProcess``: spawned by the ``Launcher``, heard from
through their events) and the loop; the ``Pager`` and the ``Reloader`` decide, and are handed
only its narrow ``Crew`` face. The router (``router/``) runs on its own thread and event loop in
this process: it owns the public socket and forwards each request to its tenant's worker over a
private unix socket. It and this loop share only the ``SlotTable``.
"""

from __future__ import annotations

import errno
import logging
import selectors
import signal
import socket
import time

from zoo_agent.errors import UsageError, ZooError
from zoo_agent.index.load import load_index
from zoo_agent.index.model import Index
from zoo_agent.plan import host_id
from zoo_agent.resident.config import ResidentConfig, WorkerConfig
from zoo_agent.resident.launch import Launcher
from zoo_agent.resident.listener import listen_socket, read_keys
from zoo_agent.resident.pager import Pager
from zoo_agent.resident.reload import Reloader
from zoo_agent.resident.reports import Outlook, Reports
from zoo_agent.resident.router.app import Keys, Router
from zoo_agent.resident.slots import Slot, SlotTable, Worker
from zoo_agent.resident.wire import control as p
from zoo_agent.resident.waker import WAKE, Waker
from zoo_agent.resident.workers import Workers
from zoo_agent.store.zoo import Zoo
from zoo_agent.systemd.notify import Notifier, watchdog_usec

__all__ = ["Supervisor"]

log = logging.getLogger("zoo_agent.resident")


class Supervisor:
    def __init__(self, config: ResidentConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notify = notifier or Notifier()
        self.zoo = Zoo(config.root)
        self.api_key, self.fleet_key, self.priority_key = read_keys(config.api_key_file, config.fleet_key_file, config.priority_key_file)
        self.selector = selectors.DefaultSelector()
        self.waker = Waker(self.selector)
        self.table = SlotTable(wake=self.wake)  # what the router shares: the slots, their lock, order and budget
        self.slots, self.lock = self.table.slots, self.table.lock  # the table's own dict and lock, never replaced
        self.idx: Index | None = None
        self.host_id = self.config.host.lower()  # this host's id in the index: resolved by take_index
        self.flags: set[str] = set()
        self.exit_code: int | None = None
        self.ready_sent = False
        self.watchdog_usec = watchdog_usec()
        self.last_watchdog = 0.0
        self.last_watch = 0.0
        self.listener: socket.socket | None = None
        self.launcher = Launcher(config, self.zoo, self.api_key)
        self.workers = Workers(config, self.launcher, self.selector, self._event, self.wake)
        self.reports = Reports(self.table, self.zoo, self._outlook, lambda: self.router.federation.summary())
        self.router = Router(self.table, config, self.zoo, self.host_id, Keys(self.api_key, self.fleet_key, self.priority_key),
                             is_ready=lambda: self.ready_sent, status_line=self.status_line)  # fmt: skip
        self.pager = Pager(self, self.table, config, self.zoo, self.launcher, self.router, self.reports, self.notify)
        self.reload = Reloader(self, self.table, config, self.zoo, self.launcher, self.pager, self.reports, self.notify)

    @property
    def order(self) -> list[str]:
        """The host's tenants, as the index lists them (the table's)."""
        return self.table.order

    @property
    def retiring(self) -> list[tuple[Slot, Worker]]:
        return self.workers.retiring

    # -- signals: record only --------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.flags.add("term"))
        signal.signal(signal.SIGINT, lambda *_: self.flags.add("term"))
        signal.signal(signal.SIGHUP, lambda *_: self.flags.add("hup"))

    def wake(self) -> None:
        """From the router's thread (a request waits for a tenant) or a fetch's: tick now, not in 0.2 s."""
        self.waker.wake()

    def reindex(self) -> None:
        self.flags.add("reindex")

    # -- what to serve ------------------------------------------------------------------
    def load_index(self) -> Index:
        idx: Index = load_index(self.config.index, str(self.config.index))
        host = idx.hosts.get(host_id(idx, self.config.host))
        if host is None or not host.served():
            raise UsageError(f"host '{self.config.host}' serves no tenant in {self.config.index}")
        return idx

    def take_index(self, idx: Index) -> None:
        """The slot table follows the index (the pager's); the router learns its tenants and routes."""
        self.host_id = host_id(idx, self.config.host)  # resolved once per index, as plan and apply resolve it
        self.idx = idx
        self.pager.take_index(idx, self.host_id)
        self.router.take_index(idx, self.host_id)

    # -- the crew's face: what the pager and the reloader ask ---------------------------------
    def start(self, slot: Slot, config: WorkerConfig, *, standby: bool = False, incoming: bool = False) -> None:
        assert self.idx is not None
        self.workers.start(self.idx, slot, config, standby=standby, incoming=incoming)

    def preparing(self, slot: Slot) -> bool:
        return self.workers.preparing(slot)

    def drain(self, slot: Slot, worker: Worker, why: str) -> None:
        log.debug("worker %d (%s): draining (%s)", worker.pid, slot.tenant, why)
        self.workers.drain(slot, worker)

    def _take_prepared(self) -> None:
        """Workers verified beside the loop: started (by ``Workers``), or their failure told."""
        for slot, config, _, incoming, error in self.workers.prepared(lambda slot: self.slots.get(slot.tenant) is slot):
            if not error or self.slots.get(slot.tenant) is not slot:
                continue
            if incoming:
                self.reload.failed(slot, f"reload of {slot.tenant} to {config.model}@{config.version} failed: {error}")
            else:
                self.pager.refuse(slot, error, failed=True)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self.launcher.open()
        try:
            return self._run()
        finally:
            self._close()

    def _run(self) -> int:
        try:
            idx = self.load_index()
            self.take_index(idx)
            self.launcher.check_engines(idx)  # llama-server, where a tenant needs it: missing or too old is one line now
            self.listener = listen_socket(self.config.listen, self.api_key)
            first = [t for t in self.order if self.slots[t].pinned] or [t for t in self.order if not self.slots[t].remote][:1]
            for tid in first:  # pinned tenants (or the first listed) load now: READY waits for them
                self.launcher.verify(idx, tid, config=True)  # a tenant that cannot load is an error now, not at the first request
        except ZooError as exc:
            self.notify.failed(errno.EINVAL, f"cannot start: {exc}")
            raise
        for tid in first:
            self.slots[tid].wanted = True
        self.notify.extend_timeout(30, f"loading {', '.join(first)}")
        self.router.start(self.listener, self.launcher.private_socket())
        if not first:  # remote tenants only (issue #36): nothing loads here, the router serves now
            self.ready_sent = True
            self.reports.state()
            self.notify.ready(self.status_line())
        while self.exit_code is None:
            for key, _ in self.selector.select(timeout=0.2):
                if key.data == WAKE:
                    self.waker.drain()
                else:
                    slot, worker = key.data
                    self.workers.read(slot, worker)
            self.tick()
        return self.exit_code

    def tick(self) -> None:
        t = time.monotonic()
        if "term" in self.flags:
            self.flags.discard("term")
            self.handle_term()
            return
        if "hup" in self.flags:
            self.flags.discard("hup")
            self.reload.hup()
        if "reindex" in self.flags and self.idx is not None:
            self.flags.discard("reindex")
            self.take_index(self.idx)
        self._take_prepared()
        for slot in list(self.slots.values()):
            for worker in slot.workers:
                if (code := self.workers.check(slot, worker, t)) is not None:
                    self._exited(slot, worker, code)
        for slot, worker, code in self.workers.reap():
            self._exited(slot, worker, code)
        if self.exit_code is not None:
            return
        self.pager.page(t)
        if t - self.last_watch >= self.config.watch_interval and self.idx is not None:
            self.last_watch = t
            self.reload.follow_current()
        self._feed_watchdog(t)
        if self.ready_sent:
            self.reports.refresh(self.notify, t)

    # -- workers ------------------------------------------------------------------------------
    def _event(self, slot: Slot, worker: Worker, message: p.ToSupervisor) -> None:
        match message:
            case p.Pong():
                if message.seq == worker.ping_seq:
                    worker.ping_sent = 0.0
                worker.stats = message
            case p.Loading() if message.pct > worker.pct:
                worker.pct = message.pct
                if not self.ready_sent:  # only while loading progresses: a stalled load still times out
                    self.notify.extend_timeout(30, f"loading {worker.config.tenant} ({worker.config.model}@{worker.config.version}): {worker.pct}%")
            case p.Failed():
                worker.error = message.error
            case p.Ready():
                worker.ready = message
                self._became_ready(slot, worker, message)

    def _became_ready(self, slot: Slot, worker: Worker, ready: p.Ready) -> None:
        old = slot.serving if worker is slot.incoming else None
        with self.lock:
            slot.measured = max(slot.measured, ready.weights_bytes + ready.kv_bytes)
        self.reports.loaded(slot, worker, ready)  # model-info.json first: whoever the worker answers finds what it loaded
        with self.lock:
            worker.state = "serving"
            slot.serving, slot.incoming, slot.path = worker, None, worker.path
            slot.phase, slot.refusal, slot.loaded_at, slot.error, slot.wanted = "serving", None, time.monotonic(), "", False
        if old is not None:
            self.drain(slot, old, "reload")
            self.reports.swap(slot, old.config.version, worker)
        elif slot.tenant in self.reload.pending:  # a stop-first reload
            self.reports.swap(slot, self.reports.gap_from.pop(slot.tenant, "?"), worker, "reload (stop first)")
        self.router.loaded(slot.tenant, time.monotonic() - worker.started)
        self.reports.paged("page-in", slot, f"{worker.config.model}@{worker.config.version}", seconds=time.monotonic() - worker.started)
        self.router.poke(slot.tenant)
        if not self.reload.pending:
            self.reload.last_error = ""  # a reload's error stays until the reload ends
        self.reports.serving(slot)
        self.reload.done(slot.tenant, ok=True)
        self.reload.tell(slot)
        log.info("worker %d: serving %s (%s@%s)", worker.pid, slot.tenant, worker.config.model, worker.config.version)
        if all(s.phase == "serving" for s in self.slots.values() if self._essential(s)):
            if not self.ready_sent:
                self.ready_sent = True
                self.reports.state()
            self.notify.ready(self.status_line())

    def _essential(self, slot: Slot) -> bool:
        """What READY waited for (the pinned tenants, else the first listed): a host that cannot
        serve it fails the unit, saying why, instead of serving less than it promised."""
        pinned = [s for s in self.slots.values() if s.pinned]
        local = [t for t in self.order if not self.slots[t].remote]  # a remote tenant loads nothing here (issue #36)
        return slot.pinned or (not pinned and bool(local) and slot.tenant == local[0])

    def _exited(self, slot: Slot, worker: Worker, code: int) -> None:
        self.workers.closed(slot, worker)
        self.router.forget(worker.path)
        slot.served_before += worker.stats.served
        slot.tokens_before += worker.stats.tokens
        if worker.state == "draining":
            log.info("worker %d (%s): drained and stopped (exit %d)", worker.pid, slot.tenant, code)
            with self.lock:
                if slot.phase == "draining" and not slot.workers:
                    slot.phase = "paged_out"
            self.reports.state()
            self.wake()
            return
        reason = worker.error or f"exit status {code}"
        if worker is slot.incoming:
            slot.incoming = None
            self.reload.failed(slot, f"reload of {slot.tenant} to {worker.config.model}@{worker.config.version} failed: {reason}")
            return
        with self.lock:
            slot.serving, slot.path = None, None
            slot.phase = "paged_out"
        if worker.state == "loading" and worker.error:
            self._load_failed(slot, f"cannot load {worker.config.model}@{worker.config.version}: {reason}")
        else:
            self._crashed(slot, worker, reason)

    def _load_failed(self, slot: Slot, message: str) -> None:
        """Deterministic (weights that cannot load): retrying would only loop."""
        if slot.tenant in self.reload.pending:
            self.reload.last_error = f"reload of {slot.tenant} failed: {message}"
            self.reload.done(slot.tenant, ok=False)
        if self._essential(slot) or not self.ready_sent:
            self.notify.failed(errno.EIO, message)
            log.error("%s", message)
            self.exit_code = 1
            return
        self.pager.refuse(slot, message, failed=True)

    def _crashed(self, slot: Slot, worker: Worker, reason: str) -> None:
        """Restarted with backoff, up to ``max_crashes`` in ``crash_window``; then refused (or the unit fails)."""
        self.router.restarted(slot.tenant, worker.killed_for or "crash")
        delay = self.workers.backoff(slot, worker, time.monotonic())
        if delay is not None:
            self.notify.status(f"{slot.tenant}: worker died ({reason}); restarting in {delay}s")
            log.error("worker %d (%s) died (%s); restarting in %ds", worker.pid, slot.tenant, reason, delay)
            return
        message = f"{slot.tenant}: worker crashed {len(slot.crashes)} times in {self.config.crash_window:.0f}s; last: {reason}"
        log.error("%s", message)
        if self._essential(slot):
            self.notify.failed(errno.ECHILD, message)
            self.exit_code = 1
            return
        slot.crashes.clear()
        self.pager.refuse(slot, message, failed=True)

    def _feed_watchdog(self, t: float) -> None:
        """WATCHDOG=1 only while the router's loop turns and every worker that should answer did."""
        interval = self.watchdog_usec / 2e6
        if not self.watchdog_usec or t - self.last_watchdog < interval or not self.router.alive(interval * 2):
            return
        workers = [w for s in self.slots.values() for w in s.workers]
        # A hung worker is replaced by its ping timeout (the others keep serving); the watchdog
        # starves only when no worker at all progresses.
        if not workers or any(t - w.progressed < interval * 2 for w in workers):
            self.notify.watchdog()
            self.last_watchdog = t

    def handle_term(self) -> None:
        self.notify.stopping(f"stopping; finishing in-flight requests (up to {self.config.drain_seconds:.0f}s)")
        self.router.stop()
        for slot in self.slots.values():
            for worker in slot.workers:
                self.drain(slot, worker, "stop")
        deadline = time.monotonic() + self.config.drain_seconds + 5
        self.workers.wait_retiring(deadline)
        self.router.join(timeout=max(0.1, deadline - time.monotonic()))
        self.exit_code = 0

    # -- reporting ------------------------------------------------------------------------------
    def status_line(self) -> str:
        return self.reports.status_line()

    def _outlook(self) -> Outlook:
        """What ``state.json`` says of the supervisor: its reloads, and whether it is ready."""
        reload = self.reload
        state = "reloading" if reload.pending else ("ready" if self.ready_sent else "starting")
        return Outlook(reload.attempts, reload.reloads, reload.last_error, state, list(reload.swapped), self.config.listen)

    def _close(self) -> None:
        self.workers.kill_all([w for s in self.slots.values() for w in s.workers])
        if self.listener is not None:
            self.listener.close()
        self.launcher.close()
        self.waker.close()
