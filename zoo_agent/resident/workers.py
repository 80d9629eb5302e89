"""The worker processes the supervisor runs: started, heard from, probed, drained, reaped (issue #32).

Each is a ``WorkerProcess`` (our Python worker, or an engine's own server) inside a ``Worker``
(what the supervisor knows of it). ``Workers`` starts them (verified first under ``--strict``,
on a thread: the loop never hashes gigabytes), waits for their events on the supervisor's
selector (or looks every tick for a process that has nothing to wait on), pings the serving ones,
and hands every event and every exit to the supervisor, which decides what they mean.
"""

from __future__ import annotations

import logging
import queue
import selectors
import subprocess
import threading
import time
from collections.abc import Callable

from zoo_agent.index.model import Index
from zoo_agent.resident.config import ResidentConfig, WorkerConfig
from zoo_agent.formats import human_bytes
from zoo_agent.resident.cgroups import WorkerCgroups, limit_for
from zoo_agent.resident.launch import Launcher
from zoo_agent.resident.memory import DeviceReader, RamReader, process_ram, reported
from zoo_agent.resident.process import Unintelligible
from zoo_agent.resident.slots import Slot, Worker
from zoo_agent.resident.wire import control as p

__all__ = ["Prepared", "Workers"]

log = logging.getLogger("zoo_agent.resident")

Prepared = tuple[Slot, WorkerConfig, bool, bool, str]  # slot, config, standby, incoming, why it failed ("" if verified)


class Workers:
    def __init__(self, config: ResidentConfig, launcher: Launcher, selector: selectors.BaseSelector,
                 on_event: Callable[[Slot, Worker, p.ToSupervisor], None], wake: Callable[[], None], *,
                 ram: RamReader = process_ram, device: DeviceReader = reported, cgroups: WorkerCgroups | None = None) -> None:  # fmt: skip
        self.config = config
        self.launcher = launcher
        self.selector = selector
        self.on_event = on_event
        self.wake = wake
        self.ram, self.device = ram, device  # how a worker's memory is read (a unit test's fakes)
        self._cgroups = cgroups  # one per worker, with a memory limit, where the unit delegates them (found at the first start)
        self.retiring: list[tuple[Slot, Worker]] = []  # drained; reaped when they exit
        self._preparing: set[str] = set()  # tenants whose worker is verified (--strict) beside the loop
        self._prepared: queue.SimpleQueue[Prepared] = queue.SimpleQueue()

    # -- starting -----------------------------------------------------------------------------
    def start(self, idx: Index, slot: Slot, config: WorkerConfig, *, standby: bool = False, incoming: bool = False) -> None:
        """A worker for ``slot``; under ``--strict`` its files are hashed first, beside the loop
        (minutes for a large model), while the slot counts as loading (``preparing``)."""
        if not self.config.strict:
            self._spawn(slot, config, standby, incoming)
            return
        self._preparing.add(slot.tenant)

        def verify() -> None:
            try:
                self.launcher.verify(idx, slot.tenant)
                error = ""
            except Exception as exc:  # noqa: BLE001 - reported as the load's failure
                error = str(exc)
            self._prepared.put((slot, config, standby, incoming, error))
            self.wake()

        threading.Thread(target=verify, name=f"verify-{slot.tenant}", daemon=True).start()

    def preparing(self, slot: Slot) -> bool:
        return slot.tenant in self._preparing

    def prepared(self, served: Callable[[Slot], bool]) -> list[Prepared]:
        """The verifications that ended since the last call; the verified ones of slots still
        ``served`` are started now."""
        done: list[Prepared] = []
        while True:
            try:
                item = self._prepared.get_nowait()
            except queue.Empty:
                return done
            slot, config, standby, incoming, error = item
            self._preparing.discard(slot.tenant)
            if not error and served(slot):
                self._spawn(slot, config, standby, incoming)
            done.append(item)

    @property
    def cgroups(self) -> WorkerCgroups:
        if self._cgroups is None:
            self._cgroups = WorkerCgroups.detect()
        return self._cgroups

    def _spawn(self, slot: Slot, config: WorkerConfig, standby: bool, incoming: bool) -> None:
        worker = Worker(self.launcher.spawn(config, standby=standby), config, standby=standby)
        # In a cgroup of its own before it loads anything (issue #34): it is still starting its interpreter.
        worker.cgroup = self.cgroups.place(worker.pid, slot.tenant, limit_for(slot.footprint))
        worker.fd = worker.process.fileno()
        if worker.fd is not None:
            self.selector.register(worker.fd, selectors.EVENT_READ, (slot, worker))
        log.info("worker %d: loading %s (%s@%s)", worker.pid, config.tenant, config.model, config.version)
        if incoming:
            slot.incoming = worker
        else:
            slot.serving = worker

    # -- hearing from them ----------------------------------------------------------------------
    def read(self, slot: Slot, worker: Worker) -> None:
        """Hand the events the worker's process has for us to the supervisor."""
        try:
            events = worker.process.read()
        except Unintelligible as exc:
            log.error("worker %d sent what the protocol does not know (%s); replacing it", worker.pid, exc)
            worker.process.kill()
            return
        if events is None:
            self._unregister(worker)
            return
        for event in events:
            worker.progressed = time.monotonic()
            self.on_event(slot, worker, event)

    def _unregister(self, worker: Worker) -> None:
        if worker.fd is not None:
            try:
                self.selector.unregister(worker.fd)
            except (KeyError, ValueError):
                pass
            worker.fd = None

    def check(self, slot: Slot, worker: Worker, t: float) -> int | None:
        """Its exit status if it exited; else a serving one is pinged, and killed if it hangs."""
        if worker.fd is None:
            self.read(slot, worker)  # a process with nothing to wait on: its events are looked for every tick
        code = worker.process.poll()
        if code is not None or worker.state != "serving":
            return code
        if t - worker.measured_at >= self.config.measure_interval:
            self.measure(worker, t)
        if worker.ping_sent and t - worker.ping_sent > self.config.ping_timeout:
            log.error("worker %d (%s): no answer to a ping for %.0fs; replacing it", worker.pid, slot.tenant, t - worker.ping_sent)
            worker.killed_for = "hang"
            worker.process.kill()
        elif not worker.ping_sent and t - worker.progressed >= self.config.ping_interval:
            worker.ping_seq += 1
            worker.ping_sent = t
            worker.process.ping(worker.ping_seq)
        return None

    def measure(self, worker: Worker, t: float) -> None:
        """What a serving worker holds now (issue #34): its RAM (the first reading is its baseline) and its
        device memory. The pager counts the larger of its estimate and ``Worker.live`` (``Slot.footprint``)."""
        worker.measured_at = t
        worker.ram = self.ram(worker.pid, worker.cgroup)
        if worker.baseline is None:
            worker.baseline = worker.ram
        worker.device_bytes = self.device(worker.pid, worker.stats.device_bytes)

    def closed(self, slot: Slot, worker: Worker) -> None:
        """It exited: its last events read (a "failed" just before the exit says what it means), released;
        killed by the kernel for its memory limit, it says so (the journal names the tenant and the limit)."""
        self.read(slot, worker)
        self._unregister(worker)
        worker.process.close()
        if worker.cgroup is not None:
            if self.cgroups.oom_kills(worker.cgroup) and worker.state != "draining":
                limit = self.cgroups.limit(worker.cgroup)
                worker.killed_for = "oom"
                worker.error = f"killed by the kernel: it outgrew its memory limit of {human_bytes(limit or 0)} (memory.max)"
                log.error("worker %d (%s): %s; the other workers and the supervisor are untouched", worker.pid, slot.tenant, worker.error)
            self.cgroups.remove(worker.cgroup)

    def backoff(self, slot: Slot, worker: Worker, t: float) -> int | None:
        """After ``worker`` crashed: seconds before ``slot`` starts again (doubling, at most 30), or None
        after ``max_crashes`` in ``crash_window`` (restarting again would only loop)."""
        slot.crashes = [c for c in slot.crashes if t - c < self.config.crash_window] + [t]
        if len(slot.crashes) >= self.config.max_crashes:
            return None
        delay: int = min(2 ** (len(slot.crashes) - 1), 30)
        slot.restart_at = t + delay
        slot.wanted = slot.wanted or slot.busy or slot.pinned or worker.state == "serving"
        return delay

    # -- stopping ---------------------------------------------------------------------------------
    def drain(self, slot: Slot, worker: Worker) -> None:
        worker.state = "draining"
        self.retiring.append((slot, worker))
        if slot.serving is worker:
            slot.serving = None
        if slot.incoming is worker:
            slot.incoming = None
        if not worker.process.drain():
            worker.process.terminate()

    def reap(self) -> list[tuple[Slot, Worker, int]]:
        """The drained workers that exited since the last call, with their exit status."""
        gone = []
        for slot, worker in list(self.retiring):
            if (code := worker.process.poll()) is not None:
                self.retiring.remove((slot, worker))
                gone.append((slot, worker, code))
        return gone

    def wait_retiring(self, deadline: float) -> None:
        """Give the drained ones until ``deadline`` (monotonic), then kill what is left."""
        for _, worker in self.retiring:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()

    def kill_all(self, workers: list[Worker]) -> None:
        for worker in workers + [w for _, w in self.retiring]:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
