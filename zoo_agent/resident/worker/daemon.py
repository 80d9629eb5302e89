"""Whether an Ollama tenant's daemon answers now (issue #35): its being away is transient, and
for that tenant only.

The daemon is another service (``ollama.service``), so its being stopped, timing out, answering
5xx or no longer holding the model (``ollama rm``: a 404) is no reason for this worker, let alone
the resident, to exit: the worker stays up and keeps answering pings, its requests are answered
503 with ``Retry-After`` and one line naming the tenant and the daemon's address, its pongs say
why (``/health`` and the ``Status:`` line show it), and it asks the daemon again with a bounded
backoff. When the daemon answers, the model is loaded again and a one-token warm-up runs through
the engine, as at start; then the tenant serves again.

``Availability`` is the state, shared by the request threads (a failed call marks it), the
watcher and the event loop (which reads it), under its own lock; ``backoff`` is the pure rule;
``watch`` is the watcher, a coroutine on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zoo_agent.errors import OllamaDown

__all__ = ["FIRST_RETRY", "TICK", "Availability", "Away", "away", "backoff", "mark", "unavailable", "watch"]

log = logging.getLogger("zoo_agent.resident")

#: Seconds before the first retry; each failure doubles it, up to the cap (the health interval).
FIRST_RETRY = 0.5
#: How often the watcher looks whether a check or a retry is due.
TICK = 0.25


def backoff(failures: int, cap: float) -> float:
    """Seconds until the next try after ``failures`` failures in a row: 0.5, 1, 2, 4, ... at most ``cap``."""
    return float(min(cap, FIRST_RETRY * 2 ** min(max(0, failures - 1), 30)))


class Away(OllamaDown):
    """A request the tenant cannot answer now: its daemon is away. Answered 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Availability:
    """The tenant's daemon: answering (``why`` empty), or away since ``failures`` tries, tried again at ``retry_at``."""

    tenant: str
    address: str
    cap: float = 5.0
    why: str = ""
    failures: int = 0
    retry_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def down(self, why: str, now: float | None = None) -> bool:
        """The daemon did not answer (``why``); True when it was answering until now."""
        now = time.monotonic() if now is None else now
        with self.lock:
            was = not self.why
            # One line of printable text: it reaches a 503's message, the journal and the Status: line
            # (a daemon's 5xx body is another process's words).
            self.why = " ".join("".join(c if c.isprintable() else " " for c in why).split())[:300]
            self.failures += 1
            self.retry_at = now + backoff(self.failures, self.cap)
        return was

    def up(self) -> bool:
        """It answers again; True when it was away until now."""
        with self.lock:
            was = bool(self.why)
            self.why, self.failures, self.retry_at = "", 0, 0.0
        return was

    def retry_after(self, now: float | None = None) -> int:
        """Whole seconds until the next try (at least 1): the answer's ``Retry-After``."""
        now = time.monotonic() if now is None else now
        with self.lock:
            return max(1, math.ceil(self.retry_at - now))

    def refusal(self, now: float | None = None) -> Away | None:
        """What a request is answered while the daemon is away (None while it answers)."""
        with self.lock:
            why = self.why
        if not why:
            return None
        after = self.retry_after(now)
        return Away(f"tenant '{self.tenant}' is unavailable: {why}; trying it again in {after}s", after)


def unavailable(backend: Any) -> Away | None:
    """Why ``backend`` cannot answer now (an Ollama backend whose daemon is away), or None."""
    availability: Availability | None = getattr(backend, "daemon", None)
    return availability.refusal() if availability is not None else None


def away(backend: Any) -> str:
    """Why ``backend``'s daemon is away ("" when it answers, or when there is no daemon): what pongs carry."""
    availability: Availability | None = getattr(backend, "daemon", None)
    return availability.why if availability is not None else ""


async def watch(backend: Any, warm_up: Callable[[], Any], interval: float, stopping: Callable[[], bool]) -> None:
    """While the worker serves: every ``interval`` s ask the daemon (``backend.healthy``); while it
    is away, try again when ``retry_at`` comes (``backend.load_now``, then ``warm_up``). A failed
    call marks the daemon away where it fails (the backend's one call path); this never raises for
    the daemon and never ends the worker. Each try runs on a thread, bounded by the client's timeouts."""
    availability: Availability = backend.daemon
    loop = asyncio.get_running_loop()
    next_check = time.monotonic() + interval
    while not stopping():
        await asyncio.sleep(TICK)
        now = time.monotonic()
        try:
            if availability.why:
                if now < availability.retry_at:
                    continue
                await loop.run_in_executor(None, _recover, backend, availability, warm_up)
                log.warning("%s: the Ollama daemon at %s answers again; serving", availability.tenant, availability.address)
            elif now >= next_check:
                next_check = now + interval
                await loop.run_in_executor(None, backend.healthy)
        except Exception as exc:  # noqa: BLE001 - the daemon's failures and a check's own: the tenant stays away, saying why
            if not isinstance(exc, OllamaDown) or not availability.why:
                mark(availability, f"checking the Ollama daemon at {availability.address} failed: {type(exc).__name__}: {exc}")


def mark(availability: Availability, why: str) -> None:
    """The daemon did not answer: away (logged once, when it goes), the next try later."""
    if availability.down(why):
        log.error("%s: unavailable: %s", availability.tenant, why)


def _recover(backend: Any, availability: Availability, warm_up: Callable[[], Any]) -> None:
    """Load the model again, let requests through, then warm up through the engine (a failure marks it away again)."""
    backend.load_now()
    availability.up()
    warm_up()
