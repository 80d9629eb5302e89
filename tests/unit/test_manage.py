"""POST /models/load and /models/unload behind the gate, in-process (issue #34): no supervisor, a
fake pager answers the orders the router puts in the slot table."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from zoo_agent.resident.router.manage import Manage
from zoo_agent.resident.slots import MAX_ORDERS, Order, Outcome, SlotTable
from zoo_agent.resident.wire.gate import Gate
from zoo_agent.resident.wire.http import MAX_BODY, Receive, Scope, Send

KEY = "k" * 32


def _app(answer: Callable[[Order], Outcome | None], wait: float = 30) -> tuple[Any, SlotTable]:
    """The gate in front of ``Manage``; the table's wake-up answers every order taken (None: never)."""
    table = SlotTable()

    def wake() -> None:
        with table.lock:
            orders = list(table.orders)
            table.orders.clear()
        for order in orders:
            if (outcome := answer(order)) is not None:
                order.answer(outcome)

    table.wake = wake
    manage = Manage(table, wait)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        await manage(scope, message.get("body", b""), send)

    return Gate(app, max_body=MAX_BODY, api_key=KEY), table


def _post(front: Any, path: str, body: Any, *, key: str | None = KEY, method: str = "POST", **headers: str) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://zoo") as client:
            raw = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
            auth = {"authorization": f"Bearer {key}"} if key else {}
            return await client.request(method, path, content=raw, headers={**auth, **headers})

    return asyncio.run(run())


def test_a_load_is_answered_when_the_loop_says_it_is_done() -> None:
    asked: list[tuple[str, str, bool]] = []

    def answer(order: Order) -> Outcome:
        asked.append((order.action, order.tenant, order.evict))
        return Outcome(200, f"{order.tenant} loaded in 1.0s", "serving", evicted=("old",))

    app, _ = _app(answer)
    response = _post(app, "/models/load", {"model": "chat", "evict": True})
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True, "model": "chat", "state": "serving", "message": "chat loaded in 1.0s", "evicted": ["old"]}
    assert _post(app, "/models/unload", {"model": "chat"}).status_code == 200
    assert asked == [("load", "chat", True), ("unload", "chat", False)]


def test_a_refused_load_names_what_it_would_evict() -> None:
    app, _ = _app(lambda order: Outcome(409, "loading c would page out a, b to make room; ask again with evict to do it",
                                        "paged_out", code="would_evict", evicted=("a", "b")))  # fmt: skip
    response = _post(app, "/models/load", {"model": "c"})
    assert response.status_code == 409
    assert response.json()["error"] == {"message": "loading c would page out a, b to make room; ask again with evict to do it",
                                        "type": "invalid_request_error", "param": None, "code": "would_evict", "evict": ["a", "b"]}  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "param", "fragment"), [
    ("/models/load", b"", 400, "body", "body: not JSON"),
    ("/models/load", b"[1]", 400, "body", "expected a JSON object"),
    ("/models/load", {"model": 3}, 400, "model", "model: expected the id of a tenant"),
    ("/models/load", {"model": "a", "evict": "yes"}, 400, "evict", "evict: expected true or false"),
    ("/models/load", {"model": "a", "keep_alive": 0}, 400, "body", "unknown field 'keep_alive' (expected model and evict)"),
    ("/models/unload", {"model": "a", "evict": True}, 400, "body", "unknown field 'evict' (expected model)"),
    ("/models/load", {"model": "x" * 201}, 400, "model", "model: expected"),
])  # fmt: skip
def test_a_bad_body_is_a_400_naming_its_field_and_asks_nothing(path: str, body: Any, status: int, param: str, fragment: str) -> None:
    app, table = _app(lambda order: pytest.fail(f"asked {order}"))
    response = _post(app, path, body)
    assert response.status_code == status and response.json()["error"]["param"] == param
    assert fragment in response.json()["error"]["message"]


def test_the_key_is_required_peers_never_ask_and_only_post_is_answered() -> None:
    app, _ = _app(lambda order: pytest.fail(f"asked {order}"))
    assert _post(app, "/models/unload", {"model": "a"}, key=None).status_code == 401
    assert _post(app, "/models/unload", {"model": "a"}, key="wrong").status_code == 401
    assert _post(app, "/models/load", b"", method="GET").status_code == 405
    peer = Gate(app.app, max_body=MAX_BODY, api_key=KEY, fleet_key=KEY)
    assert _post(peer, "/models/unload", {"model": "a"}, **{"x-zoo-peer": "other"}).status_code == 403


def test_a_wait_past_its_bound_is_a_503_and_gives_the_order_up() -> None:
    taken: list[Order] = []
    app, _ = _app(lambda order: taken.append(order) or None, wait=0.2)  # type: ignore[func-returns-value]
    response = _post(app, "/models/load", {"model": "slow"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_done_yet"
    assert "load of slow did not finish within 0s; it goes on" in response.json()["error"]["message"]
    assert taken[0].done.cancelled()  # the pager drops it: nobody waits for its answer


def test_orders_past_the_bound_are_refused() -> None:
    app, table = _app(lambda order: None)
    table.wake = lambda: None  # nothing takes them
    table.orders.extend(Order("load", f"t{i}") for i in range(MAX_ORDERS))
    response = _post(app, "/models/load", {"model": "one-more"})
    assert response.status_code == 429 and response.headers["retry-after"] == "5"
    assert len(table.orders) == MAX_ORDERS
