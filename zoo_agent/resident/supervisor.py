"""The resident's main process: runs the router and one worker per loaded tenant, talks to systemd (issues #5, #20).

One loop, ticking a few times a second: read worker messages, ping workers, replace dead
or hung ones with backoff, load what requests wait for and evict what the memory budget
cannot keep (``paging.decide``), feed the watchdog only from observed progress, follow
``current``, and dispatch the flags that signal handlers set (they do nothing else).

The router (``router.py``) runs on its own thread and event loop in this process: it owns
the public socket and forwards each request to its tenant's worker over a private unix
socket. It and this loop share the ``Slot`` table under ``Supervisor.lock``.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from zoo_agent.errors import UsageError, ZooError
from zoo_agent.formats import parse_memory
from zoo_agent.index.load import load_index
from zoo_agent.index.model import Index, OllamaSource
from zoo_agent.plan import host_id
from zoo_agent.resident import protocol as p
from zoo_agent.resident.config import ResidentConfig, RouteSessions, WorkerConfig
from zoo_agent.resident.listener import listen_socket, read_api_key
from zoo_agent.resident.memory import mem_available, rss
from zoo_agent.resident.paging import Evict, Live, Load, Refuse, Wait, decide
from zoo_agent.resident.priority import CLASSES
from zoo_agent.resident.reports import Reports
from zoo_agent.resident.slots import Slot, Worker
from zoo_agent.resident.tenant import adapters_for, base_names, selection_for, strict_check
from zoo_agent.store.zoo import Zoo
from zoo_agent.systemd.notify import Notifier

__all__ = ["Supervisor"]

log = logging.getLogger("zoo_agent.resident")

class Supervisor:
    def __init__(self, config: ResidentConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notify = notifier or Notifier()
        self.zoo = Zoo(config.root)
        self.api_key = read_api_key(config.api_key_file) if config.api_key_file else None
        self.fleet_key = read_api_key(config.fleet_key_file, "--fleet-key-file") if config.fleet_key_file else None
        self.priority_key = read_api_key(config.priority_key_file, "--priority-key-file") if config.priority_key_file else None
        if self.priority_key is not None and self.priority_key in (self.api_key, self.fleet_key):  # every client, or every peer, privileged
            raise UsageError(f"--priority-key-file {config.priority_key_file}: the same key as --{'api' if self.priority_key == self.api_key else 'fleet'}-key-file; "
                             "the privileged key must be a key of its own")  # fmt: skip
        self.selector = selectors.DefaultSelector()
        self.lock = threading.RLock()
        self.slots: dict[str, Slot] = {}
        self.order: list[str] = []  # the host's tenants, as the index lists them
        self.budget: int | None = None
        self.idx: Index | None = None
        self.host_id = self.config.host.lower()  # this host's id in the index: resolved by take_index
        self.retiring: list[tuple[Slot, Worker]] = []  # drained; reaped when they exit
        self.flags: set[str] = set()
        self.exit_code: int | None = None
        self.ready_sent = False
        self.reloads = 0
        self.reload_attempts = 0
        self.pending_reloads: set[str] = set()  # tenants of the reload in progress
        self.joined = 0  # reload requests that arrived while one was in progress (they share its outcome)
        self.swapped: list[str] = []  # what the last reload swapped: "code coder@2"
        self.last_error = ""
        self.watchdog_usec = self._watchdog_usec()
        self.last_watchdog = 0.0
        self.last_watch = 0.0
        self.last_status = ""
        self.last_status_at = 0.0
        self.listener: socket.socket | None = None
        self.sockets: Path | None = None  # the workers' private sockets: a directory of our own, made by run()
        self.spawned = 0
        self.reports = Reports(self)
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        from zoo_agent.resident.router import Router  # here: the router imports this module's types

        self.router = Router(self)

    # -- signals: record only --------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.flags.add("term"))
        signal.signal(signal.SIGINT, lambda *_: self.flags.add("term"))
        signal.signal(signal.SIGHUP, lambda *_: self.flags.add("hup"))

    @staticmethod
    def _watchdog_usec() -> int:
        pid = os.environ.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return 0
        return int(os.environ.get("WATCHDOG_USEC", "0") or 0)

    def wake(self) -> None:
        """From the router's thread: a request waits for a tenant; tick now, not in 0.2 s."""
        try:
            self.wake_w.send(b"!")
        except OSError:
            pass  # the buffer is full: a wake-up is pending anyway

    # -- what to serve ------------------------------------------------------------------
    def load_index(self) -> Index:
        idx: Index = load_index(self.config.index, str(self.config.index))
        host = idx.hosts.get(host_id(idx, self.config.host))
        if host is None or not host.served():
            raise UsageError(f"host '{self.config.host}' serves no tenant in {self.config.index}")
        return idx

    def take_index(self, idx: Index) -> None:
        """The slot table follows the index: new tenants paged out, gone ones drained."""
        from zoo_agent.index.fit import read_config, tenant_footprint

        self.host_id = host_id(idx, self.config.host)  # resolved once per index, as plan and apply resolve it
        host = idx.hosts[self.host_id]
        served = list(host.served())
        with self.lock:
            for tid in served:
                tenant = idx.tenants[tid]
                slot = self.slots.get(tid) or Slot(tid)
                slot.pinned, slot.fetch = tenant.pinned, tenant.fetch
                slot.priority = CLASSES[tenant.priority]
                slot.capacity = tenant.resources.max_batch + tenant.resources.max_queue
                version = self.zoo.read_link("models", tenant.model, "current")
                config = read_config(self.zoo.version_dir("models", tenant.model, version)) if version else None
                slot.estimate = tenant_footprint(idx, tid, config).total
                slot.measured = self.reports.measured(tid, f"{tenant.model}@{version}") if version else 0
                self._take_pins(idx, slot)
                self.slots[tid] = slot
                self.router.metrics.known(tid, on_demand=slot.fetch == "on-demand")
            for tid in [t for t in self.slots if t not in served]:
                slot = self.slots.pop(tid)
                for worker in slot.workers:
                    self._drain(slot, worker, "removed")
                slot.path = None
                slot.refusal = f"tenant '{tid}' is no longer served by this host"
            self.order = served
            self.budget = parse_memory(host.memory_budget) if host.memory_budget else None
            self.idx = idx
        self.router.take_index(idx)

    def _take_pins(self, idx: Index, slot: Slot) -> None:
        """What a fetch of an on-demand tenant makes current under ``idx``; a failed fetch of
        other pins is forgotten (the index changed: the next request fetches anew)."""
        from zoo_agent.reconcile.ondemand import pins

        slot.pins = pins(idx, self.config.host, slot.tenant) if slot.fetch == "on-demand" else ""
        if slot.fetch_failed and slot.fetch_failed != slot.pins:
            slot.fetch_failed = slot.fetched = slot.error = ""
            if slot.phase == "failed":
                slot.phase, slot.refusal = "paged_out", None

    def worker_config(self, idx: Index, tid: str) -> WorkerConfig:
        tenant = idx.tenants[tid]
        model = idx.models[tenant.model]
        if self.config.strict:
            strict_check(self.zoo, idx, tid)
        version = self.zoo.read_link("models", tenant.model, "current")
        if version is None or not self.zoo.version_dir("models", tenant.model, version).is_dir():
            raise UsageError(f"model {tenant.model} is not in the zoo at {self.config.root}; run: zoo-agent apply")
        adapters, refused = adapters_for(self.zoo, idx, tid)
        for why in refused.values():
            log.warning("adapter refused: %s", why)
        return WorkerConfig(
            tenant=tid, model=tenant.model, version=version,
            version_dir=self.zoo.version_dir("models", tenant.model, version),
            allow_pickle=model.allow_pickle, allow_code=model.allow_code,
            device=tenant.resources.device, dtype=tenant.resources.dtype,
            defaults=tenant.generation.model_dump(), max_queue=tenant.resources.max_queue, max_batch=tenant.resources.max_batch,
            api_key=None, drain_seconds=self.config.drain_seconds, memory_max=tenant.resources.memory_max,
            adapters=adapters, refused_adapters=refused, max_loras=tenant.resources.max_loras,
            base_names=base_names(idx, tid), selection=selection_for(self.zoo, idx, tid),
            sessions_dir=self.zoo.tenant_dir(tid), priority=CLASSES[tenant.priority], aging_seconds=self.config.aging_seconds,
            route_sessions=self.route_sessions(idx, tid), router_socket=self.sockets / "router.sock" if self.sockets else None,
            router_key=self.api_key,
            backend=tenant.backend, ollama_model=model.source.name if isinstance(model.source, OllamaSource) else None,
        )  # fmt: skip

    def _private_socket(self) -> socket.socket:
        """The router's socket for workers (a summarizer asked by another tenant's worker)."""
        assert self.sockets is not None
        private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        private.bind(str(self.sockets / "router.sock"))
        private.listen(128)
        return private

    def route_sessions(self, idx: Index, tid: str) -> tuple[RouteSessions, ...]:
        """The routes of this host that may send ``tid`` a session: where those sessions live."""
        host = idx.hosts[host_id(idx, self.config.host)]
        found = []
        for rid in host.routes:
            route = idx.routes.get(rid)
            if route is not None and tid in route.tenants():
                found.append(RouteSessions(route=rid, dir=self.zoo.route_dir(rid), summarizer=route.summarizer))
        return tuple(found)

    def spawn(self, slot: Slot, config: WorkerConfig, *, standby: bool = False) -> Worker:
        """A worker on a private socket of its own (the router is its only client)."""
        assert self.sockets is not None
        self.spawned += 1
        path = str(self.sockets / f"{self.spawned}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(128)
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "zoo_agent.resident.worker.main", "--listen-fd", str(listener.fileno()), "--control-fd", str(theirs.fileno()),
                 "--supervisor-pid", str(os.getpid())],
                pass_fds=(listener.fileno(), theirs.fileno()), env=env,
            )  # fmt: skip
        finally:
            theirs.close()
            listener.close()  # the worker holds it now; connections queue in its backlog
        ours.sendall(p.encode(p.Configure(config=config)) + (b"" if standby else p.encode(p.Proceed())))
        ours.setblocking(False)
        worker = Worker(proc, ours, config, path, standby=standby)
        self.selector.register(ours, selectors.EVENT_READ, (slot, worker))
        log.info("worker %d: loading %s (%s@%s)", proc.pid, config.tenant, config.model, config.version)
        return worker

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self.sockets = Path(tempfile.mkdtemp(prefix="zoo-resident-", dir=os.environ.get("RUNTIME_DIRECTORY") or None))
        try:
            return self._run()
        finally:
            self._close()

    def _run(self) -> int:
        try:
            idx = self.load_index()
            self.take_index(idx)
            self.listener = listen_socket(self.config.listen, self.api_key)
            first = [t for t in self.order if self.slots[t].pinned] or self.order[:1]
            for tid in first:  # pinned tenants (or the first listed) load now: READY waits for them
                self.worker_config(idx, tid)  # a tenant that cannot load is an error now, not at the first request
        except ZooError as exc:
            self.notify.failed(errno.EINVAL, f"cannot start: {exc}")
            raise
        for tid in first:
            self.slots[tid].wanted = True
        self.notify.extend_timeout(30, f"loading {', '.join(first)}")
        self.router.start(self.listener, self._private_socket())
        while self.exit_code is None:
            for key, _ in self.selector.select(timeout=0.2):
                if key.data == "wake":
                    try:
                        while self.wake_r.recv(4096):
                            pass
                    except (BlockingIOError, InterruptedError, OSError):
                        pass
                else:
                    slot, worker = key.data
                    self._read(slot, worker)
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
            self.handle_hup()
        if "reindex" in self.flags and self.idx is not None:
            self.flags.discard("reindex")
            self.take_index(self.idx)
        for slot in list(self.slots.values()):
            for worker in slot.workers:
                self._check(slot, worker, t)
        for slot, worker in list(self.retiring):
            if (code := worker.proc.poll()) is not None:
                self.retiring.remove((slot, worker))
                self._exited(slot, worker, code)
        if self.exit_code is not None:
            return
        self._page(t)
        if t - self.last_watch >= self.config.watch_interval and self.idx is not None:
            self.last_watch = t
            self._follow_current()
        self._feed_watchdog(t)
        if self.ready_sent and t - self.last_status_at >= 5:
            self.last_status_at = t
            if (line := self.status_line()) != self.last_status:
                self.last_status = line
                self.notify.status(line)  # what an operator reads in `systemctl status`
                self.reports.leases()

    # -- paging ------------------------------------------------------------------------------
    def _live(self) -> list[Live]:
        live = []
        for slot in self.slots.values():
            for worker in slot.workers:
                if worker.standby:
                    continue  # its runtime only: the weights wait for the budget
                live.append(Live(slot.tenant, slot.footprint, slot.pinned, slot.busy, worker.state == "serving" and slot.incoming is None,
                                 slot.last_used, slot.loaded_at))  # fmt: skip
        live += [Live(slot.tenant, slot.footprint, slot.pinned, True, False, draining=True) for slot, _ in self.retiring]
        return live

    def _page(self, t: float) -> None:
        """Load what is wanted, in priority order of what waits for it; evict least recently used to make room."""
        with self.lock:
            wanted = [s for s in self.slots.values() if ((s.wanted or s.pinned) and s.phase in ("paged_out", "failed") and t >= s.restart_at)
                      or (s.serving is not None and s.serving.standby)]  # fmt: skip
        wanted.sort(key=lambda s: (not s.pinned, s.priority, s.last_used))
        for slot in wanted:
            if slot.phase == "failed":
                # A failed load or fetch is tried again by a new request, never in a loop: the router
                # clears the refusal only for a request that arrives after the failure. The request
                # that saw it fail may still be waiting to be told (it counts as queued till then).
                if slot.refusal is not None or not slot.queued:
                    continue
                slot.fetched = ""  # asked again
            if slot.tenant in self.reports.gap_from and any(s is slot for s, _ in self.retiring):
                continue  # a stop-first reload: the new version loads once the old one has exited
            if slot.fetch == "on-demand":
                if not self._on_disk(slot):
                    if slot.fetched == slot.pins:
                        # Fetched already for this ask, and still not current: fetching again would only loop.
                        self._fetch_failed(slot, f"fetching {slot.tenant} failed: {self._not_current(slot)} after its fetch")
                    else:
                        self._start_fetch(slot)
                    continue
                slot.fetched = ""  # there: a later fetch (the zoo changed) is a new one
            with self.lock:
                decision = decide(self.budget, self._live(), slot.tenant, slot.footprint, self.config.paging_policy)
            if isinstance(decision, Load):
                self._load(slot)
            elif isinstance(decision, Evict):
                for victim in decision.victims:
                    self._evict(self.slots[victim], "budget")
                self._load(slot, standby=True)  # its runtime starts while they exit; its weights wait
                return  # their memory is in use until they exit: decide again then
            elif isinstance(decision, Refuse):
                if slot.serving is not None and slot.serving.standby:
                    self._drain(slot, slot.serving, "refused")  # on standby: it exits without loading anything
                    with self.lock:
                        slot.phase = "paged_out"
                self._refuse(slot, decision.reason)
            elif isinstance(decision, Wait):
                if slot.blocked != decision.reason:
                    log.info("%s", decision.reason)
                slot.blocked = decision.reason
                if slot.serving is None and any(w.draining for w in self._live()):
                    self._load(slot, standby=True)  # the memory comes back when they exit: start the runtime now
                return

    def _on_disk(self, slot: Slot, idx: Index | None = None) -> bool:
        """The model version the (loaded) index pins is the zoo's current one."""
        return not self._not_current(slot, idx)

    def _not_current(self, slot: Slot, idx: Index | None = None) -> str:
        """Why the tenant's pinned model version is not current in the zoo ("" when it is)."""
        idx = idx or self.idx
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

        assert self.idx is not None
        idx, tid = self.idx, slot.tenant
        slot.phase, slot.fetch_pct, slot.refusal, slot.fetched, slot.fetch_failed = "fetching", 0, None, slot.pins, ""
        log.info("%s: fetching on first use", tid)
        self.notify.status(f"fetching {tid}; " + self.status_line())

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
                self.router.metrics.fetches.labels(tid, "ok").inc()
                with self.lock:
                    slot.phase = "paged_out"
                self.flags.add("reindex")  # the footprint: its config.json is on disk now
            self.wake()

        threading.Thread(target=run, name=f"fetch-{tid}", daemon=True).start()

    def _fetch_failed(self, slot: Slot, message: str) -> None:
        """Failed, and so it stays (shown in /health and Status:, counted) until a new request
        or an index change asks again; the requests waiting for it are told why."""
        error = " ".join(message.split())[:400]
        log.error("%s", error)
        self.router.metrics.fetches.labels(slot.tenant, "failed").inc()
        with self.lock:
            slot.phase, slot.refusal, slot.error, slot.wanted, slot.fetch_failed = "failed", error, error, False, slot.fetched
        self.router.poke(slot.tenant)

    def _load(self, slot: Slot, standby: bool = False) -> None:
        """Spawn the tenant's worker (``standby``: its runtime only, until ``Proceed``); a worker
        already on standby is told to load its weights now."""
        worker = slot.serving
        if worker is not None and worker.standby:
            if not standby:
                worker.standby = False
                self._send(worker, p.Proceed())
                log.info("%s: the budget has room; loading its weights", slot.tenant)
            return
        assert self.idx is not None
        try:
            config = self.worker_config(self.idx, slot.tenant)
        except ZooError as exc:
            self._refuse(slot, str(exc), failed=True)
            return
        with self.lock:
            slot.phase, slot.refusal, slot.error, slot.blocked = "loading", None, "", ""
        slot.incoming = None
        slot.serving = self.spawn(slot, config, standby=standby)
        self.notify.status(f"loading {slot.tenant}; " + self.status_line())

    def _evict(self, slot: Slot, reason: str) -> None:
        log.info("%s: paged out (%s; idle %.0fs)", slot.tenant, reason, time.monotonic() - slot.last_used)
        slot.evictions += 1
        self.router.evicted(slot.tenant, reason)
        worker = slot.serving
        with self.lock:
            slot.serving, slot.path, slot.phase = None, None, "draining"
            idle = slot.inflight == 0
        if worker is not None:
            self.reports.paged("page-out", slot, f"{worker.config.model}@{worker.config.version}", reason=reason)
            self._drain(slot, worker, reason)
            if idle:
                # Its idle keep-alive connections would hold the drain for 2 s (the worker waits that long
                # for a client to send on an open connection); nothing is in flight, so close them now.
                self.router.forget(worker.path)

    def _refuse(self, slot: Slot, reason: str, failed: bool = False) -> None:
        with self.lock:
            if failed:
                slot.phase = "failed"
            slot.refusal, slot.wanted, slot.error = reason, False, reason if failed else slot.error
        log.error("%s: %s", slot.tenant, reason)
        self.router.poke(slot.tenant)

    # -- workers ------------------------------------------------------------------------------
    def _read(self, slot: Slot, worker: Worker) -> bool:
        """Handle what the worker sent; False once nothing more is there (for now, or ever)."""
        try:
            data = worker.control.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            try:
                self.selector.unregister(worker.control)
            except (KeyError, ValueError):
                pass
            return False
        for line in worker.lines.feed(data):
            try:
                message = p.to_supervisor(line)
            except ValidationError as exc:
                log.error("worker %d sent what the protocol does not know (%s); replacing it", worker.proc.pid, exc.errors()[0]["msg"])
                worker.proc.kill()
                return False
            self._message(slot, worker, message)
        return True

    def _message(self, slot: Slot, worker: Worker, message: p.ToSupervisor) -> None:
        worker.progressed = time.monotonic()
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
            worker.state = "serving"
            slot.serving, slot.incoming, slot.path = worker, None, worker.path
            slot.phase, slot.refusal, slot.loaded_at, slot.error, slot.wanted = "serving", None, time.monotonic(), "", False
            slot.measured = max(slot.measured, ready.weights_bytes + ready.kv_bytes)
        if old is not None:
            self._drain(slot, old, "reload")
            self.reports.swap(slot, old.config.version, worker)
        elif slot.tenant in self.pending_reloads:  # a stop-first reload
            self.reports.swap(slot, self.reports.gap_from.pop(slot.tenant, "?"), worker, "reload (stop first)")
        self.router.loaded(slot.tenant, time.monotonic() - worker.started)
        self.reports.paged("page-in", slot, f"{worker.config.model}@{worker.config.version}", seconds=time.monotonic() - worker.started)
        self.router.poke(slot.tenant)
        self.reports.model_info(slot, worker, ready)
        self._reload_done(slot.tenant, ok=True)
        self._tell_reloads(slot)
        log.info("worker %d: serving %s (%s@%s)", worker.proc.pid, slot.tenant, worker.config.model, worker.config.version)
        if all(s.phase == "serving" for s in self.slots.values() if self._essential(s)):
            if not self.ready_sent:
                self.ready_sent = True
                self.reports.state()
            self.notify.ready(self.status_line())

    def _essential(self, slot: Slot) -> bool:
        """What READY waited for (the pinned tenants, else the first listed): a host that cannot
        serve it fails the unit, saying why, instead of serving less than it promised."""
        pinned = [s for s in self.slots.values() if s.pinned]
        return slot.pinned or (not pinned and bool(self.order) and slot.tenant == self.order[0])

    def _check(self, slot: Slot, worker: Worker, t: float) -> None:
        code = worker.proc.poll()
        if code is not None:
            self._exited(slot, worker, code)
            return
        if worker.state != "serving":
            return
        if worker.ping_sent and t - worker.ping_sent > self.config.ping_timeout:
            log.error("worker %d (%s): no answer to a ping for %.0fs; replacing it", worker.proc.pid, slot.tenant, t - worker.ping_sent)
            worker.killed_for = "hang"
            worker.proc.kill()
            return
        if not worker.ping_sent and t - worker.progressed >= self.config.ping_interval:
            worker.ping_seq += 1
            worker.ping_sent = t
            self._send(worker, p.Ping(seq=worker.ping_seq))

    def _send(self, worker: Worker, message: p.ToWorker) -> bool:
        try:
            worker.control.sendall(p.encode(message))
            return True
        except OSError:
            return False

    def _exited(self, slot: Slot, worker: Worker, code: int) -> None:
        while self._read(slot, worker):  # a "failed" sent just before the exit decides what the exit means
            pass
        try:
            self.selector.unregister(worker.control)
        except (KeyError, ValueError):
            pass
        worker.control.close()
        self.router.forget(worker.path)
        Path(worker.path).unlink(missing_ok=True)
        slot.served_before += worker.stats.served
        slot.tokens_before += worker.stats.tokens
        if worker.state == "draining":
            log.info("worker %d (%s): drained and stopped (exit %d)", worker.proc.pid, slot.tenant, code)
            with self.lock:
                if slot.phase == "draining" and not slot.workers:
                    slot.phase = "paged_out"
            self.reports.state()
            self.wake()
            return
        reason = worker.error or f"exit status {code}"
        if worker is slot.incoming:
            slot.incoming = None
            self.last_error = f"reload of {slot.tenant} to {worker.config.model}@{worker.config.version} failed: {reason}"
            log.error("%s; still serving %s", self.last_error, slot.serving.config.version if slot.serving else "nothing")
            self._reload_done(slot.tenant, ok=False)
            self._tell_reloads(slot)
            self.notify.ready(f"{self.last_error}; " + self.status_line())
            return
        with self.lock:
            slot.serving, slot.path = None, None
            slot.phase = "paged_out"
        if worker.state == "loading" and worker.error:
            # Deterministic (weights that cannot load): retrying would only loop.
            message = f"cannot load {worker.config.model}@{worker.config.version}: {reason}"
            if slot.tenant in self.pending_reloads:
                self.last_error = f"reload of {slot.tenant} failed: {message}"
                self._reload_done(slot.tenant, ok=False)
            if self._essential(slot) or not self.ready_sent:
                self.notify.failed(errno.EIO, message)
                log.error("%s", message)
                self.exit_code = 1
                return
            self._refuse(slot, message, failed=True)
            return
        self.router.metrics.restarts.labels(slot.tenant, worker.killed_for or "crash").inc()
        t = time.monotonic()
        slot.crashes = [c for c in slot.crashes if t - c < self.config.crash_window] + [t]
        if len(slot.crashes) >= self.config.max_crashes:
            message = f"{slot.tenant}: worker crashed {len(slot.crashes)} times in {self.config.crash_window:.0f}s; last: {reason}"
            log.error("%s", message)
            if self._essential(slot):
                self.notify.failed(errno.ECHILD, message)
                self.exit_code = 1
                return
            slot.crashes.clear()
            self._refuse(slot, message, failed=True)
            return
        delay = min(2 ** (len(slot.crashes) - 1), 30)
        slot.restart_at = t + delay
        slot.wanted = slot.wanted or slot.busy or slot.pinned or worker.state == "serving"
        self.notify.status(f"{slot.tenant}: worker died ({reason}); restarting in {delay}s")
        log.error("worker %d (%s) died (%s); restarting in %ds", worker.proc.pid, slot.tenant, reason, delay)

    def _drain(self, slot: Slot, worker: Worker, why: str) -> None:
        worker.state = "draining"
        self.retiring.append((slot, worker))
        if slot.serving is worker:
            slot.serving = None
        if slot.incoming is worker:
            slot.incoming = None
        if not self._send(worker, p.Drain()):
            worker.proc.terminate()

    def _fits_beside(self, slot: Slot, config: WorkerConfig) -> bool:
        """Can the new version load while the old one still serves?"""
        if self.budget is not None:
            used = sum(w.footprint for w in self._live())
            return used + slot.footprint <= self.budget
        need = sum(f.stat().st_size for f in config.version_dir.rglob("*.safetensors")) * 1.2
        limit = parse_memory(config.memory_max) if config.memory_max else None
        if limit is not None:
            used = rss(slot.serving.proc.pid) if slot.serving else 0
            return used + need <= limit
        available = mem_available()
        if available is None:
            log.warning("MemAvailable is unreadable (/proc/meminfo hidden?); reloading stop-first, as if the new version did not fit")
            return False
        return need <= available

    def _feed_watchdog(self, t: float) -> None:
        """WATCHDOG=1 only while the router's loop turns and every worker that should answer did."""
        if not self.watchdog_usec:
            return
        interval = self.watchdog_usec / 2e6
        if t - self.last_watchdog < interval:
            return
        if not self.router.alive(interval * 2):
            return
        workers = [w for s in self.slots.values() for w in s.workers]
        # A hung worker is replaced by its ping timeout (the others keep serving); the watchdog
        # starves only when no worker at all progresses.
        if not workers or any(t - w.progressed < interval * 2 for w in workers):
            self.notify.watchdog()
            self.last_watchdog = t

    # -- reloads ------------------------------------------------------------------------------
    def _follow_current(self) -> None:
        for slot in list(self.slots.values()):
            worker = slot.serving
            if worker is None or slot.incoming is not None or worker.state != "serving":
                continue
            current = self.zoo.read_link("models", worker.config.model, "current")
            if current and current != worker.config.version:
                log.info("current of %s moved to %s: reloading %s", worker.config.model, current, slot.tenant)
                self.handle_hup()
                return
            self._follow_adapters(slot, worker)

    def handle_hup(self) -> None:
        """Read the index again; swap every loaded tenant whose version or settings changed."""
        if self.pending_reloads:
            # One is under way (`current` moved, or a HUP before): this one joins it, counted with it, so
            # `zoo-agent resident reload` waits for that swap instead of saying there is nothing to reload.
            self.reload_attempts += 1
            self.joined += 1
            self.reports.state()
            return
        self.reload_attempts += 1
        with self.lock:
            for slot in self.slots.values():
                # The index or the zoo may have changed: a request may try again. A failed fetch stays
                # failed (a reload must not download gigabytes that fail again): take_index forgets it
                # only when the tenant's pins changed, and a request asks again anyway.
                if slot.phase == "failed" and not slot.fetch_failed:
                    slot.phase, slot.refusal = "paged_out", None
        try:
            idx = self.load_index()
            self.take_index(idx)
            changes = {}
            for slot in self.slots.values():
                if slot.serving is not None and slot.serving.state == "serving" and slot.incoming is None:
                    config = self.worker_config(idx, slot.tenant)
                    if config != slot.serving.config:
                        changes[slot.tenant] = config
        except Exception as exc:  # noqa: BLE001 - a bad index or zoo keeps the old versions serving
            self.last_error = f"reload refused: {exc}"
            self.reports.state()
            self.notify.status(f"reload refused: {exc}; " + self.status_line())
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
        self.pending_reloads = set(changes)
        self.swapped = [f"{t} {c.model}@{c.version}" for t, c in changes.items()]
        for tid, config in changes.items():
            slot = self.slots[tid]
            if self._fits_beside(slot, config):
                slot.incoming = self.spawn(slot, config)
            else:
                # Two versions do not fit: stop the old one first; its requests wait in the router.
                old = slot.serving
                assert old is not None
                log.info("memory does not allow two versions of %s at once: stopping %s before loading %s", tid, old.config.version, config.version)
                self.reports.gap_from[tid] = old.config.version
                self._drain(slot, old, "reload")
                with self.lock:
                    slot.path, slot.phase, slot.wanted = None, "paged_out", True
        self.reports.state()

    def _reload_done(self, tid: str, ok: bool) -> None:
        if tid not in self.pending_reloads:
            return
        self.pending_reloads.discard(tid)
        if not self.pending_reloads:
            if ok and not self.last_error:
                self.reloads += 1 + self.joined
            self.joined = 0
            self.reports.state()

    def handle_term(self) -> None:
        self.notify.stopping(f"stopping; finishing in-flight requests (up to {self.config.drain_seconds:.0f}s)")
        self.router.stop()
        for slot in self.slots.values():
            for worker in slot.workers:
                self._drain(slot, worker, "stop")
        deadline = time.monotonic() + self.config.drain_seconds + 5
        for _, worker in self.retiring:
            try:
                worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
        self.router.join(timeout=max(0.1, deadline - time.monotonic()))
        self.exit_code = 0

    # -- reporting ------------------------------------------------------------------------------
    def status_line(self) -> str:
        return self.reports.status_line()

    def _follow_adapters(self, slot: Slot, worker: Worker) -> None:
        """An adapter's `current` moved (or a refused one arrived): the worker swaps it in place, no restart."""
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
        worker.config = config.model_copy(update={"adapters": adapters, "refused_adapters": refused})
        if adapters != config.adapters:
            log.info("%s: adapters now %s: swapping in place", slot.tenant, ", ".join(a.label for a in adapters) or "none")
            if not self._send(worker, p.Adapters(adapters=adapters)):
                log.warning("could not tell worker %d about new adapters", worker.proc.pid)
            if worker.ready is not None:
                self.reports.loaded(slot, worker, worker.ready)  # what gc must keep: the versions it serves now

    def _tell_reloads(self, slot: Slot) -> None:
        """zoo:reloads_total{result} lives in the worker's /metrics; only we know."""
        if slot.serving is not None:
            self._send(slot.serving, p.Reloads(ok=self.reloads, failed=self.reload_attempts - self.reloads))

    def _close(self) -> None:
        for slot in self.slots.values():
            for worker in slot.workers:
                if worker.proc.poll() is None:
                    worker.proc.kill()
                    worker.proc.wait()
        for _, worker in self.retiring:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
        if self.listener is not None:
            self.listener.close()
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)  # ours: made by mkdtemp in run(), holding only sockets
