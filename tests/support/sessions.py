"""Sessions helpers (issue #9): a loaded backend with a session store, turns sent through the
worker's app in-process (ASGI), the text of a reply."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any


def backend(model_dir: Path, sessions_dir: Path, model_key: str = "m@1") -> Any:
    from zoo_agent.resident.worker.backend import TransformersBackend
    from zoo_agent.resident.sessions.store import Sessions

    b = TransformersBackend(model_dir, allow_pickle=False, allow_code=False, device="cpu")
    b.load()
    b.sessions = Sessions(sessions_dir, model_key=model_key, dtype=b.dtype, template=str(b.tokenizer.chat_template), vocab_size=b.vocab_size())
    return b


async def _talk(b: Any, bodies: list[dict[str, Any]], max_context: int = 4096) -> list[tuple[int, Any]]:
    import httpx

    from zoo_agent.resident.worker.app import ServingState, create_app

    state = ServingState("t", "m", "1", b, {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0}, max_context=max_context)
    out = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://zoo", timeout=60) as client:
        for body in bodies:
            method, path = body.pop("_method", "POST"), body.pop("_path", "/v1/chat/completions")
            r = await client.request(method, path, json=body or None)
            out.append((r.status_code, r.json()))
        out.append((200, (await client.get("/metrics")).text))
    return out


def talk(b: Any, bodies: list[dict[str, Any]], **kw: Any) -> list[tuple[int, Any]]:
    return asyncio.run(_talk(b, [dict(x) for x in bodies], **kw))


def turn(text: str, session: str = "s", **kw: Any) -> dict[str, Any]:
    return {"model": "t", "session": session, "messages": [{"role": "user", "content": text}], "max_tokens": 12, "ignore_eos": True, **kw}


def reply(result: tuple[int, Any]) -> str:
    assert result[0] == 200, result
    return str(result[1]["choices"][0]["message"]["content"])
