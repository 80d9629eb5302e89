"""Priority classes and the waiting queue that serves them (issue #20).

A request's priority is an integer on vLLM's scale: lower is served first, and vLLM's
default 0 is our ``default`` class. ``X-Zoo-Priority`` names a class; vLLM's body field
``priority`` gives the integer itself. Waiting requests are served best first, FIFO within
a class, and a waiting request gains one class per ``aging_seconds`` waited, so ``batch``
is never starved: under any load it waits at most about (its class - the best class) x
``aging_seconds`` behind requests that arrived after it.

Priority is a privilege (issue #31): a class better than ``default`` (or than the tenant's
own, when that is better) needs the priority key (``--priority-key-file``), and no integer
ranks above ``system`` (the aging bound above holds only if ``system`` is the best there
is). A peer is asked for at most ``default``: the fleet key grants what a client key does,
and a client's privilege at one host is not the fleet's at another.

Pure (no torch, no threads): the engine's schedulers and the router lock around the queue.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from zoo_agent.resident.wire.headers import PRIORITY as HEADER

__all__ = ["CLASSES", "MAX_PRIORITY", "MIN_PRIORITY", "BadPriority", "PriorityNotAllowed", "PriorityQueue", "class_name", "for_peer",
           "grant", "parse_priority", "rank"]

#: The named classes on vLLM's integer scale (lower is served first).
CLASSES: dict[str, int] = {"system": -2, "realtime": -1, "default": 0, "batch": 1}
#: Bounds of the integer ``priority`` field: none better than ``system`` (issue #31: an integer
#: below every class was served before ``system``, and held ``batch`` back ~1000 classes), and
#: as far below ``batch`` as a client wants to put itself.
MIN_PRIORITY, MAX_PRIORITY = CLASSES["system"], 1000
#: The best a request may ask for without the priority key (or its tenant's own, when better).
UNPRIVILEGED = CLASSES["default"]

T = TypeVar("T")


class BadPriority(ValueError):
    """A priority the request may not have; ``param`` is what to name in the 400 (the header or the field)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class PriorityNotAllowed(BadPriority):
    """A priority this request's key does not grant: a 403."""


def parse_priority(header: str | None, field: int | None, default: int) -> int:
    """The request's priority: the ``X-Zoo-Priority`` header, else the body's ``priority``, else the tenant's default.

    The header wins: it is what a gateway in front of clients sets (and can override) without
    rewriting bodies, and what the router can read before it parses a body."""
    if header is not None:
        name = header.strip().lower()
        if name not in CLASSES:
            raise BadPriority(HEADER, f"{HEADER}: {header[:40]!r} is not a priority class; one of {', '.join(CLASSES)}")
        return CLASSES[name]
    if field is not None:
        if isinstance(field, bool) or not isinstance(field, int):
            raise BadPriority("priority", f"priority: {field!r} is not an integer")
        if not MIN_PRIORITY <= field <= MAX_PRIORITY:
            raise BadPriority("priority", f"priority: {field} is outside {MIN_PRIORITY}..{MAX_PRIORITY}")
        return field
    return default


def grant(header: str | None, field: int | None, default: int, privileged: bool, own: int | None = None) -> int:
    """``parse_priority``, then the privilege: without the priority key a request may ask for no
    better than ``default``, or its tenant's ``own`` priority (``default`` unless given: a
    route's worst candidate's) when that is better, which it gets by naming none anyway.
    ``PriorityNotAllowed`` names what it asked for otherwise."""
    priority = parse_priority(header, field, default)
    best = min(default if own is None else own, UNPRIVILEGED)
    if not privileged and (header is not None or field is not None) and priority < best:  # naming none is never refused
        param, asked = (HEADER, f"{HEADER}: {header.strip()[:40]!r}") if header is not None else ("priority", f"priority: {field}")
        raise PriorityNotAllowed(param, f"{asked} needs the priority key (--priority-key-file); this key may ask for {class_name(best)} or lower")
    return priority


def for_peer(priority: int | None) -> str | None:
    """The ``X-Zoo-Priority`` a delegated request carries: the class granted here, at most
    ``default`` (None: the request named none, and the peer gives its tenant's own)."""
    return None if priority is None else class_name(max(priority, UNPRIVILEGED))


def class_name(priority: int) -> str:
    """The named class nearest ``priority`` (clamped at both ends): a bounded label set for metrics and logs."""
    best = min(CLASSES.values())
    worst = max(CLASSES.values())
    clamped = min(max(priority, best), worst)
    return next(name for name, value in CLASSES.items() if value == clamped)


def rank(priority: int, waited: float, aging_seconds: float) -> float:
    """The effective priority after waiting ``waited`` seconds (lower first); ``aging_seconds <= 0`` disables aging."""
    return priority - waited / aging_seconds if aging_seconds > 0 else float(priority)


@dataclass(order=True)
class _Entry(Generic[T]):
    key: float  # rank at time 0: every entry ages at the same rate, so the order never changes while it waits
    arrival: float
    count: int  # FIFO between equal arrivals
    priority: int = field(compare=False)
    item: T = field(compare=False)


class PriorityQueue(Generic[T]):
    """Waiting items, served by least ``rank`` and then by arrival (FIFO within a class).

    Every waiting item's rank falls at the same rate (``1 / aging_seconds`` per second), so
    the order among waiting items is fixed at push time: ``rank`` at any ``now`` is the key
    ``priority + arrival / aging_seconds`` minus the same ``now / aging_seconds`` for all.
    That is why ``pop_best`` needs no clock, and a heap serves it. Not thread-safe: callers lock.
    """

    def __init__(self, aging_seconds: float = 10.0) -> None:
        self._aging = aging_seconds
        self._heap: list[_Entry[T]] = []
        self._count = itertools.count()

    @property
    def aging_seconds(self) -> float:
        return self._aging

    @aging_seconds.setter
    def aging_seconds(self, value: float) -> None:
        self._aging = value
        for entry in self._heap:
            entry.key = self._key(entry.priority, entry.arrival)
        heapq.heapify(self._heap)

    def _key(self, priority: int, arrival: float) -> float:
        return rank(priority, -arrival, self._aging)

    def push(self, item: T, priority: int, arrival: float) -> None:
        """``arrival`` on the monotonic clock; an item pushed back (deferred) with its own arrival keeps its place."""
        heapq.heappush(self._heap, _Entry(self._key(priority, arrival), arrival, next(self._count), priority, item))

    def pop_best(self) -> T:
        """The item to serve next (IndexError when empty)."""
        return heapq.heappop(self._heap).item

    def remove(self, item: T) -> bool:
        """Take ``item`` out (compared by identity); False when it is not waiting."""
        for i, entry in enumerate(self._heap):
            if entry.item is item:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return True
        return False

    def __iter__(self) -> Iterator[T]:
        """The waiting items in the order they would be served."""
        return iter([entry.item for entry in sorted(self._heap)])

    def __len__(self) -> int:
        return len(self._heap)

    def counts_by_class(self) -> dict[str, int]:
        """Waiting items per class name (each class present, 0 when none wait: stable metric labels)."""
        counts = dict.fromkeys(CLASSES, 0)
        for entry in self._heap:
            counts[class_name(entry.priority)] += 1
        return counts
