"""The router's event loop, told which of its callback errors are not errors (issue #36's soak).

anyio's unix-socket streams (httpx over a worker's socket) wait for readability with
``loop.add_reader(sock, future.set_result, None)`` and remove the reader from the future's done
callback. When a request is cancelled (its client left) in the same loop turn as its socket
becomes readable, the reader fires on the already-cancelled future: ``InvalidStateError`` is
logged as "Exception in callback" though nothing failed (the future was cancelled on purpose;
anyio 4.16 still waits this way). Only that exact case is quieted; every other callback error
is logged as before.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["quiet_cancelled_wakeups"]

log = logging.getLogger("zoo_agent.router")


def _cancelled_wakeup(context: dict[str, Any]) -> bool:
    """``set_result`` called by a loop callback on a future that was cancelled before it ran."""
    handle, exc = context.get("handle"), context.get("exception")
    if not isinstance(exc, asyncio.InvalidStateError) or handle is None:
        return False
    callback = getattr(handle, "_callback", None)
    future = getattr(callback, "__self__", None)
    return getattr(callback, "__name__", "") == "set_result" and isinstance(future, asyncio.Future) and future.cancelled()


def quiet_cancelled_wakeups(loop: asyncio.AbstractEventLoop) -> None:
    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if _cancelled_wakeup(context):
            log.debug("a socket became readable for a read that was cancelled: nothing to do")
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
