"""Model management by hand: ``POST /models/load`` and ``POST /models/unload`` (issue #34).

The names and the body are llama-server's router mode (``{"model": "<name>"}``, the same paths),
what llama.cpp users already script against; llama-swap's users know ``/unload``, Ollama's
``ollama stop`` (``keep_alive: 0``). Here ``model`` names a tenant this host serves, and a load
may say ``"evict": true``.

The router does not load or unload anything itself: it puts an ``Order`` in the slot table and
waits for the supervisor's loop (the pager) to answer it, when it is done: a load once the
tenant's worker serves (or is refused), an unload once its worker drained (what was in flight
completed) and exited. A load that would page out idle tenants is refused naming them, unless it
says ``evict``. Both need the client key where one is set (``wire/gate.py``); a peer never asks.
"""

from __future__ import annotations

import asyncio
import json

from zoo_agent.jsonbound import loads
from zoo_agent.resident.slots import MAX_ORDERS, Order, Outcome, SlotTable
from zoo_agent.resident.wire.headers import PEER
from zoo_agent.resident.wire.http import MAX_BODY, Scope, Send, error, header, respond

__all__ = ["PATHS", "Manage"]

#: The paths this module answers, and the action each asks for.
PATHS = {"/models/load": "load", "/models/unload": "unload"}


class Manage:
    """Answers the two paths from the slot table's orders; ``wait`` bounds how long one request waits (seconds)."""

    def __init__(self, table: SlotTable, wait: float) -> None:
        self.table, self.wait = table, wait
        self.waiting = 0  # requests waiting for their order: at most MAX_ORDERS

    async def __call__(self, scope: Scope, body: bytes, send: Send) -> None:
        path = scope["path"]
        if scope["method"] != "POST":
            await respond(send, *error(405, f"{path}: use POST"), headers=[(b"allow", b"POST")])
            return
        if header(scope, PEER) is not None:
            await respond(send, *error(403, f"{path}: peers do not load or unload another host's tenants", code="peer_not_allowed"))
            return
        try:
            order = _order(PATHS[path], body)
        except _Bad as exc:
            await respond(send, *error(400, str(exc), param=exc.param))
            return
        if (slot := self.table.slots.get(order.tenant)) is not None and slot.remote:  # a server elsewhere answers it (issue #36)
            outcome = Outcome(200, f"{order.tenant} is remote ({slot.remote}): nothing is loaded here", slot.phase) if order.action == "load" else \
                Outcome(409, f"tenant '{order.tenant}' is remote ({slot.remote}): nothing is loaded here to unload", slot.phase, code="remote")
            await _answer(send, order, outcome)
            return
        if self.waiting >= MAX_ORDERS or not self.table.ask(order):
            await respond(send, *error(429, f"{MAX_ORDERS} loads and unloads are under way; retry later", code="too_many_orders"),
                          headers=[(b"retry-after", b"5")])  # fmt: skip
            return
        self.waiting += 1
        try:
            outcome = await asyncio.wait_for(asyncio.wrap_future(order.done), self.wait)
        except TimeoutError:  # the order was cancelled with the wait: the pager drops it if it had not started
            outcome = Outcome(503, f"{order.action} of {order.tenant} did not finish within {self.wait:.0f}s; it goes on "
                                   "(zoo-agent resident status shows it)", code="not_done_yet")  # fmt: skip
        finally:
            self.waiting -= 1
        await _answer(send, order, outcome)


class _Bad(ValueError):
    """A body that asks for nothing we can do: a 400 naming ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _order(action: str, body: bytes) -> Order:
    """The order a body asks for; ``_Bad`` naming the field otherwise."""
    try:
        document = loads(body, limit=MAX_BODY)
    except ValueError as exc:
        raise _Bad("body", f"not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise _Bad("body", 'expected a JSON object such as {"model": "<tenant>"}')
    allowed = ("model", "evict") if action == "load" else ("model",)
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        raise _Bad("body", f"unknown field {unknown[0][:64]!r} (expected {' and '.join(allowed)})")
    model = document.get("model")
    if not isinstance(model, str) or not model or len(model) > 200:
        raise _Bad("model", "expected the id of a tenant this host serves, a string")
    evict = document.get("evict", False)
    if not isinstance(evict, bool):
        raise _Bad("evict", "expected true or false")
    return Order("load" if action == "load" else "unload", model, evict=evict)


async def _answer(send: Send, order: Order, outcome: Outcome) -> None:
    if outcome.status == 200:
        body = {"success": True, "model": order.tenant, "state": outcome.state, "message": outcome.message,
                **({"evicted": list(outcome.evicted)} if outcome.evicted else {})}  # fmt: skip
        await respond(send, 200, json.dumps(body).encode())
        return
    status, raw = error(outcome.status, outcome.message, param="model" if outcome.status == 404 else None, code=outcome.code)
    if outcome.evicted:  # what a load would page out: a client asks again with evict, knowing what goes
        document = json.loads(raw)
        document["error"]["evict"] = list(outcome.evicted)
        raw = json.dumps(document).encode()
    await respond(send, status, raw, headers=[(b"retry-after", b"5")] if status in (429, 503) else None)
