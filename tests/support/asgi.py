"""Requests to the worker's app in-process (ASGI, no socket): ``ask`` and a valid chat body."""

from __future__ import annotations

import json
from typing import Any


def ask(app: Any, *requests: tuple[str, Any]) -> list[Any]:
    """Requests in-process (ASGI); a body of bytes is sent as it is (for what json= would not write)."""
    import asyncio

    import httpx

    async def run() -> list[Any]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zoo", timeout=120) as client:
            out = []
            for path, body in requests:
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                out.append(await client.post(path, content=raw, headers={"content-type": "application/json"}))
            return out

    return asyncio.run(run())


CHAT = {"model": "t", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, "ignore_eos": True}
