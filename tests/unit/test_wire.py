"""The one map from our errors to OpenAI error bodies (issue #32): JSON and SSE, one rule for ``type``."""

from __future__ import annotations

import json

import pytest

from zoo_agent.resident.router.admission import QueueFull, Unavailable
from zoo_agent.resident.wire.http import ApiError, error, error_type


@pytest.mark.parametrize(("exc", "status", "kind", "param", "code"), [
    (QueueFull("tenant 'a' is at capacity"), 429, "server_error", None, "queue_full"),
    (Unavailable("tenant 'a' does not fit"), 503, "server_error", None, "model_unavailable"),
    (ApiError(400, "session: not an id", param="session"), 400, "invalid_request_error", "session", None),
    (ApiError(404, "model: no such tenant", param="model", code="model_not_found"), 404, "invalid_request_error", "model", "model_not_found"),
    (ApiError(401, "missing or wrong bearer token", code="invalid_api_key", kind="authentication_error"), 401, "authentication_error", None, "invalid_api_key"),
    (ApiError(502, "the worker failed mid-answer"), 502, "server_error", None, None),
])  # fmt: skip
def test_each_error_is_one_body_as_json_and_as_the_streams_last_event(exc: ApiError, status: int, kind: str, param: str | None, code: str | None) -> None:
    expected = {"message": str(exc), "type": kind, "param": param, "code": code}
    assert exc.status == status
    assert json.loads(exc.body()) == {"error": expected}
    event, done = exc.event({"route": {"tenant": "t"}}).decode().split("\n\n")[:2]
    assert json.loads(event.removeprefix("data: ")) == {"error": expected, "x_zoo": {"route": {"tenant": "t"}}}
    assert done == "data: [DONE]"


def test_a_429_is_the_same_type_from_the_router_as_from_a_worker() -> None:
    """The router's and the worker's bodies were built by two rules: a 429 was a server_error at one, an invalid_request_error at the other."""
    from zoo_agent.resident.worker.responses import error as worker_error  # the worker's

    worker = json.loads(bytes(worker_error(429, "busy").body))["error"]
    router = json.loads(error(429, "busy")[1])["error"]
    assert worker == router and worker["type"] == error_type(429) == "server_error"
    assert [error_type(s) for s in (400, 404, 413, 500, 503)] == ["invalid_request_error"] * 3 + ["server_error"] * 2
