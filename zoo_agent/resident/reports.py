"""What the resident leaves on disk for operators and other commands (issues #5, #20).

- ``resident/state.json``: what `zoo-agent resident reload` waits on, and what
  `zoo-agent status` shows of the resident (every tenant: loaded, paged out, fetching);
  ``wire/documents.ResidentState``, written by ``Reports.state`` and read by ``read_state``.
- ``resident/tenants/<tenant>/model-info.json``: the loaded version, the adapter versions its
  worker serves (gc never removes either: ``reconcile/observe.py`` reads this file), its
  measured footprint (kept: the next load of the same version starts from the larger of
  estimate and measurement).
- ``resident/tenants/<tenant>/lease.json``: since when, what it served, every swap; counted
  across residents (the previous resident's lease is read before the first one is written).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo_agent.errors import StoreError
from zoo_agent.jsonbound import loads
from zoo_agent.resident.wire.documents import ResidentState, StateTenant, dump, parse
from zoo_agent.store.durable import makedirs_durable, write_atomic
from zoo_agent.store.host import append_action
from zoo_agent.formats import human_bytes, now
from zoo_agent.store.zoo import declared_facts
from zoo_agent.systemd.notify import Notifier

if TYPE_CHECKING:
    from zoo_agent.resident.wire.control import Ready
    from zoo_agent.resident.slots import Slot, SlotTable, Worker
    from zoo_agent.store.zoo import Zoo

__all__ = ["Outlook", "Reports", "read_state", "resident_status"]

log = logging.getLogger("zoo_agent.resident")

#: The swaps a lease keeps (the newest): a lease carried over for years stays small.
MAX_SWAPS = 100
#: Our own files; one larger than this is not one we wrote.
MAX_REPORT_BYTES = 1 << 20


@dataclass(frozen=True)
class Outlook:
    """What the supervisor says of itself in ``state.json`` (issue #32: asked for, never read off the supervisor)."""

    attempts: int
    reloads: int
    last_error: str
    state: str  # reloading, ready or starting
    swapped: list[str]
    listen: str


class Reports:
    """The files above, written from the slot table; ``outlook`` and ``peers`` are the supervisor's and the router's word."""

    def __init__(self, table: SlotTable, zoo: Zoo, outlook: Callable[[], Outlook], peers: Callable[[], str]) -> None:
        self.table, self.zoo, self.outlook, self.peers = table, zoo, outlook, peers
        self.started_at = now()
        self.swaps: dict[str, list[dict[str, Any]]] = {}
        self.gap_from: dict[str, str] = {}  # tenant -> the version a stop-first reload stopped
        self.before: dict[str, dict[str, Any]] = {}  # tenant -> what the previous residents' leases counted
        self.loaded_since: dict[str, tuple[int, str]] = {}  # tenant -> (its worker's pid, when it became ready)
        self.last_status, self.last_status_at = "", 0.0

    def refresh(self, notify: Notifier, t: float) -> None:
        """At most every 5 s: STATUS= (what `systemctl status` shows) when its line changed, and the leases with it."""
        if t - self.last_status_at < 5:
            return
        self.last_status_at = t
        if (line := self.status_line()) != self.last_status:
            self.last_status = line
            notify.status(line)
            self.leases()

    def status_line(self) -> str:
        """`3 tenants: chat tiny@2 (8 running), code qwen@1 (idle 4m); paged out: summarize; 742 requests`."""
        table, t = self.table, time.monotonic()
        loaded, out = [], []
        served = 0
        for tid in table.order:
            slot = table.slots[tid]
            served += slot.served_before + sum(w.stats.served for w in slot.workers)
            if slot.remote:  # answered by a server elsewhere (issue #36): no worker, never paged out
                doing = f"unavailable: {slot.refusal.removeprefix(f'tenant {tid!r} is unavailable: ')}" if slot.refusal else (
                    "connecting" if slot.phase == "loading" else f"{slot.inflight} in flight" if slot.inflight else
                    f"idle {_ago(t - slot.last_used)}" if slot.last_used else "idle")  # fmt: skip
                loaded.append(f"{tid} {slot.remote} ({doing})")
                continue
            worker = slot.serving
            if worker is None or worker.state != "serving":
                failed = "fetch failed" if slot.fetch_failed else "failed"
                what = {"fetching": f"fetching {slot.fetch_pct}%", "loading": "loading", "failed": failed}.get(slot.phase)
                out.append(f"{tid} ({what})" if what else tid)
                continue
            s = worker.stats
            if s.unavailable:  # up, answering 503: its Ollama daemon is away (issue #35)
                loaded.append(f"{tid} {worker.config.model}@{worker.config.version} (unavailable: {s.unavailable})")
                continue
            busy = f"{s.running} running" + (f", {s.waiting + slot.queued} waiting" if s.waiting + slot.queued else "")
            if not (s.running or s.waiting or slot.queued):
                busy = f"idle {_ago(t - slot.last_used)}" if slot.last_used else "idle"
            extra = f", {s.tps:.1f} tok/s" if s.tps else ""
            if s.adapters:
                extra += f", adapters {','.join(s.adapters)}"
            if s.refused:
                extra += f", refused {','.join(sorted(s.refused))}"
            if s.sessions:
                extra += f", {s.sessions} session{'s' if s.sessions != 1 else ''}"
            if worker.live:  # issue #34: measured, beside the estimate
                extra += f", mem {human_bytes(worker.live)}, est. {human_bytes(slot.estimate)}"
            loaded.append(f"{tid} {worker.config.model}@{worker.config.version} ({busy}{extra})")
        head = f"{len(table.order)} tenant{'s' if len(table.order) != 1 else ''}: " + (", ".join(loaded) or "none loaded")
        peers = self.peers()
        return head + (f"; paged out: {', '.join(out)}" if out else "") + f"; {served} requests" + (f"; {peers}" if peers else "")

    def measured(self, tenant: str, label: str) -> int:
        """The footprint a previous load of this model@version measured, or 0."""
        info = _read(self.zoo.tenant_dir(tenant) / "model-info.json")
        if f"{info.get('model')}@{info.get('version')}" != label:
            return 0
        value = (info.get("footprint") or {}).get("measured", 0)
        return value if isinstance(value, int) and value >= 0 else 0

    def serving(self, slot: Slot) -> None:
        """A worker became ready (its model-info.json written already): its lease, the resident's state."""
        self.lease(slot)
        self.state()

    def loaded(self, slot: Slot, worker: Worker, ready: Ready) -> None:
        """model-info.json: what the tenant's worker loaded (written when it is ready, and again when its adapters swap in place)."""
        c = worker.config
        pid, since = self.loaded_since.get(c.tenant, (0, ""))
        if pid != ready.pid:
            since = now()
            self.loaded_since[c.tenant] = (ready.pid, since)
        info = {"tenant": c.tenant, "model": c.model, "version": c.version, "backend": c.backend, "device": ready.device, "dtype": ready.dtype,
                "load_seconds": ready.load_seconds, "pid": ready.pid, "socket": worker.path, "since": since,
                "adapters": {a.id: a.version for a in c.adapters},
                **({"embedding_model": c.selection.embedding_label} if c.selection is not None else {}),
                "footprint": {"estimate": slot.estimate, "measured": ready.weights_bytes + ready.kv_bytes, "weights": ready.weights_bytes,
                              "kv": ready.kv_bytes, "used": slot.footprint}}  # fmt: skip
        info.update(declared_facts(c.version_dir))  # what the index declares of it, beside what was measured (issue #35)
        base = self.zoo.tenant_dir(c.tenant)
        try:
            makedirs_durable(base)
            write_atomic(base / "model-info.json", (json.dumps(info, indent=2) + "\n").encode())
        except OSError as exc:  # a full or read-only disk: the tenant serves all the same
            log.warning("%s: model-info.json not written: %s", c.tenant, exc)

    def paged(self, action: str, slot: Slot, label: str, *, reason: str = "", seconds: float = 0.0) -> None:
        """``page-in`` / ``page-out`` in host/actions.jsonl (`zoo-agent log`): what was loaded and evicted, in order."""
        record = {"time": now(), "action": action, "kind": "tenants", "id": slot.tenant, "version": label, "result": "ok",
                  "duration_s": round(seconds, 4), **({"reason": reason} if reason else {})}  # fmt: skip
        try:
            append_action(self.zoo, record)
        except OSError as exc:  # the log must not fail serving
            log.warning("cannot append to %s: %s", self.zoo.actions_log, exc.strerror)

    def swap(self, slot: Slot, old_version: str, worker: Worker, reason: str = "reload") -> None:
        self.swaps.setdefault(slot.tenant, []).append({"time": now(), "from": old_version, "to": worker.config.version, "reason": reason,
                                                       "seconds": round(time.monotonic() - worker.started, 3)})  # fmt: skip

    def lease(self, slot: Slot) -> None:
        """Since when the host serves the tenant, what it served, and its swaps: the counts of the
        residents before this one (read once, before this one first writes) plus this one's."""
        base = self.zoo.tenant_dir(slot.tenant)
        if not base.is_dir():
            return
        if slot.tenant not in self.before:
            self.before[slot.tenant] = previous_lease(_read(base / "lease.json"))
        before = self.before[slot.tenant]
        served = slot.served_before + sum(w.stats.served for w in slot.workers)
        tokens = slot.tokens_before + sum(w.stats.tokens for w in slot.workers)
        lease = {"since": before["since"] or self.started_at, "resident_since": self.started_at, "supervisor_pid": os.getpid(),
                 "requests": before["requests"] + served, "tokens_generated": before["tokens_generated"] + tokens,
                 "swaps": [*before["swaps"], *self.swaps.get(slot.tenant, [])][-MAX_SWAPS:], "evictions": before["evictions"] + slot.evictions}  # fmt: skip
        write_atomic(base / "lease.json", (json.dumps(lease, indent=2) + "\n").encode())

    def leases(self) -> None:
        for slot in list(self.table.slots.values()):
            if slot.serving is not None:
                self.lease(slot)
        self.state()

    def state(self) -> None:
        table, said = self.table, self.outlook()
        tenants = {}
        first_version = None
        for tid in table.order:
            slot = table.slots.get(tid)
            if slot is None:
                continue
            worker = slot.serving
            version = worker.config.version if worker is not None else None
            first_version = first_version or version
            tenants[tid] = StateTenant(state=slot.phase, model=worker.config.model if worker else None, version=version,
                                       pid=worker.pid if worker else None, pinned=slot.pinned, footprint=slot.footprint,
                                       running=worker.stats.running if worker else 0, waiting=(worker.stats.waiting if worker else 0) + slot.queued,
                                       last_used=_wall(slot.last_used), error=slot.refusal or slot.error or "")  # fmt: skip
        state = ResidentState(pid=os.getpid(), attempts=said.attempts, reloads=said.reloads, last_error=said.last_error, state=said.state,
                              version=first_version, swapped=said.swapped, listen=said.listen, budget=table.budget, status=self.status_line(),
                              updated=now(), tenants=tenants)  # fmt: skip
        makedirs_durable(self.zoo.resident_dir)
        write_atomic(self.zoo.resident_state, (json.dumps(dump(state), indent=2) + "\n").encode())


def read_state(path: Path) -> ResidentState | None:
    """``state.json`` as the resident wrote it; None when there is none (no resident ever ran here);
    ``StoreError`` naming the file and the field when it is not one a resident wrote."""
    raw = _read_bytes(path)
    if raw is None:
        return None
    try:
        return parse(ResidentState, raw, limit=MAX_REPORT_BYTES)
    except ValueError as exc:  # JSONRefused, or Malformed naming the field
        raise StoreError(f"{path}: not a resident's state ({exc})") from None


def resident_status(zoo: Zoo) -> dict[str, Any] | None:
    """What the host's resident last reported (``resident/state.json``): every tenant, loaded or
    paged out. None when no resident ever ran here; ``running`` false when its process is gone."""
    state = read_state(zoo.resident_state)
    if state is None:
        return None
    running = False
    if state.pid is not None and state.pid > 0:
        try:
            os.kill(state.pid, 0)
            running = True
        except ProcessLookupError:
            running = False
        except PermissionError:
            running = True  # another user's process: alive
        except OverflowError:  # a pid no process can have
            running = False
    tenants = {tid: t.model_dump(mode="json") for tid, t in state.tenants.items()}
    return {"running": running, "pid": state.pid, "state": state.state if running else "stopped", "status": state.status,
            "updated": state.updated, "tenants": tenants if running else {}}  # fmt: skip


def _wall(monotonic: float) -> str | None:
    """A monotonic instant as wall-clock ISO time (what an operator reads)."""
    if not monotonic:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.monotonic() - monotonic)))


def previous_lease(document: dict[str, Any]) -> dict[str, Any]:
    """What a lease on disk counted, each field taken only if it is what we write (a damaged one counts nothing)."""

    def count(name: str) -> int:
        value = document.get(name)
        return value if type(value) is int and value >= 0 else 0

    since = document.get("since")
    swaps = document.get("swaps")
    return {"since": since if isinstance(since, str) and 0 < len(since) <= 64 else "", "requests": count("requests"),
            "tokens_generated": count("tokens_generated"), "evictions": count("evictions"),
            "swaps": [_swap(s) for s in swaps if isinstance(s, dict)][-MAX_SWAPS:] if isinstance(swaps, list) else []}  # fmt: skip


def _swap(record: dict[str, Any]) -> dict[str, Any]:
    """A swap as we write it: these keys, scalar values."""
    keep = ("time", "from", "to", "reason", "seconds")
    return {k: v for k in keep if isinstance(v := record.get(k), str | int | float) and not isinstance(v, bool) and len(str(v)) <= 200}


def _read(path: Path) -> dict[str, Any]:
    """One of our JSON files, or {} when it is missing, not a regular file, too large or not ours."""
    raw = _read_bytes(path)
    try:
        data = loads(raw, limit=MAX_REPORT_BYTES) if raw is not None else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _read_bytes(path: Path) -> bytes | None:
    """One of our files' bytes (at most one past ``MAX_REPORT_BYTES``), or None when it is missing or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_REPORT_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"
