"""schemathesis against the resident's own OpenAPI document: no request makes a 500 (issue #5).

The app runs in-process on a real tiny model (generation capped at a few tokens, so
thousands of generated requests stay quick).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

pytest.importorskip("torch", reason="the resident extra is not installed")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e .[test])")

pytestmark = pytest.mark.resident


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> object:
    from zoo_agent.demo.tiny import build_tiny_model
    from zoo_agent.resident.worker.app import ServingState, create_app
    from zoo_agent.resident.worker.backend import TransformersBackend

    model = build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")
    backend = TransformersBackend(Path(model), allow_pickle=False, allow_code=False)
    backend.load()
    defaults = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}
    return create_app(ServingState("t", "m", "v1", backend, defaults, max_context=32))


def test_no_request_makes_a_server_error(app: object) -> None:
    # Each operation's strategy driven by hypothesis directly (schemathesis' pytest
    # plugin does not load under pytest 9 here).
    from hypothesis import given

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
    seen: dict[str, set[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)  # the same cases every run: CI never flips
        def check(case: object) -> None:
            body = getattr(case, "body", None)
            if isinstance(body, dict) and "model" in body and hash(repr(sorted(body))) % 4:
                body["model"] = "t"  # most cases address the served tenant, so generation runs
                body.pop("x_zoo", None)  # and name no adapter set (its own fuzz: tests/unit/test_adapter_sets.py)
            response = case.call()  # type: ignore[attr-defined]
            seen.setdefault(operation.path, set()).add(response.status_code)
            assert response.status_code < 500, (case, response.status_code, response.text[:300])  # type: ignore[attr-defined]

        check()
    assert 200 in seen["/v1/chat/completions"] and 400 in seen["/v1/chat/completions"], seen  # valid and invalid bodies


def test_body_size_and_encoding_cases(app: object) -> None:
    """What schemathesis does not generate: bodies past the limit in either framing, bytes that are not UTF-8 or not text (issue #17)."""
    import asyncio
    import json
    from collections.abc import AsyncIterator

    import httpx

    async def chunked(total: int) -> AsyncIterator[bytes]:  # no Content-Length: httpx sends it chunked
        for _ in range(total // (64 << 10)):
            yield b" " * (64 << 10)

    json_header = {"content-type": "application/json"}
    ok = {"model": "t", "prompt": "Hi", "max_tokens": 2}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zoo", timeout=120) as client:  # type: ignore[arg-type]
            post = client.post
            return [
                await post("/v1/completions", content=chunked(5 << 20), headers=json_header),
                await post("/v1/chat/completions", content=b"{" + b" " * (2 << 20) + b"}", headers=json_header),
                await post("/v1/completions", content=b'{"model": "t", "prompt": "caf\xe9"}', headers=json_header),
                await post("/v1/completions", content=b'{"model": "t", "prompt": "\\ud800"}', headers=json_header),
                await post("/v1/completions", content=b'{"model": "t", "prompt": "Hi"', headers=json_header),
                await post("/v1/completions", content=b"\xef\xbb\xbf" + json.dumps(ok).encode(), headers=json_header),
                await post("/v1/completions", content=json.dumps(ok).encode(), headers=json_header),
            ]

    too_big_chunked, too_big, latin1, surrogate, truncated, bom, fine = asyncio.run(run())
    for r in (too_big_chunked, too_big):
        assert r.status_code == 413 and r.json()["error"]["param"] == "body", r.text[:200]
    for r, param in ((latin1, "body"), (surrogate, "prompt"), (truncated, "body")):
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (r.status_code, r.text[:200])
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert fine.status_code == 200 and bom.status_code == 200  # RFC 8259 lets a parser ignore a byte order mark
