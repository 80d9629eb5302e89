"""The warm-up generation (issue #5): READY means the model answered through the engine."""

from __future__ import annotations

import threading
from typing import Any

from zoo_agent.resident.engine.base import Generated, Request, Scheduler

__all__ = ["warm_up"]


def warm_up(scheduler: Scheduler, timeout: float = 600.0) -> str:
    """A real one-token generation on the path requests take: READY means the model answers
    through it, not that files exist (issue #5)."""
    done, out = threading.Event(), list[Any]()

    def emit(item: Any) -> None:
        if isinstance(item, (BaseException, Generated)):
            out.append(item)
            done.set()

    scheduler.submit(Request(None, "Hello", 1, 0.0, 1.0), Generated(), threading.Event(), emit, stream=False)
    if not done.wait(timeout):
        raise TimeoutError(f"the warm-up generation did not finish in {timeout:.0f}s")
    if isinstance(out[0], BaseException):
        raise out[0]
    return str(out[0].text)
