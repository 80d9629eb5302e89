"""`zoo-agent chat`: a conversation with the host's resident in the terminal (issue #9).

Streams tokens as they arrive and keeps the conversation as a session on the server, so
`--session ID` resumes it later, even after a restart of the resident. `--model` may name a
tenant, an adapter or a route (issue #36: a route's session follows the conversation from
model to model). Standard library HTTP, like any other client of the OpenAI-compatible API;
what it reads (``/v1/models``, ``x_zoo``) through the typed documents of ``resident/wire/documents.py``.
"""

from __future__ import annotations

import json
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import quote
from pathlib import Path
from typing import Any

import click

from zoo_agent.errors import SourceError, UsageError
from zoo_agent.jsonbound import loads
from zoo_agent.keyfile import read_key_file
from zoo_agent.resident.wire.documents import AnswerZoo, Card, Malformed, ModelList, validate

__all__ = ["chat_cmd", "run_chat"]

_MAX_ANSWER = 4 << 20  # a model list, a session or one streamed chunk is far smaller
HELP = "/adapter NAME (or /adapter off, /adapter auto), /new, /quit"


class Client:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"content-type": "application/json", **({"authorization": f"Bearer {api_key}"} if api_key else {})}

    def _open(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 600) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data, self.headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = loads(exc.read(_MAX_ANSWER + 1), limit=_MAX_ANSWER)["error"]["message"]
            except (ValueError, KeyError, TypeError, OSError):
                message = exc.reason
            raise UsageError(f"{self.url}{path}: HTTP {exc.code}: {message}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise SourceError(f"{self.url}: the resident does not answer ({getattr(exc, 'reason', exc)}); is zoo-agent resident running?") from exc

    def get(self, path: str) -> Any:
        with self._open("GET", path, timeout=30) as response:
            return self._document(response.read(_MAX_ANSWER + 1), path)

    def stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._open("POST", "/v1/chat/completions", {**body, "stream": True}) as response:
            while raw := response.readline(_MAX_ANSWER + 1):  # one SSE line, bounded: never a whole body in memory
                if len(raw) > _MAX_ANSWER:
                    raise SourceError(f"{self.url}/v1/chat/completions: not a resident's answer (a line longer than {_MAX_ANSWER} bytes)")
                line = raw.decode("utf-8", "replace").strip()
                if line.startswith("data: {"):
                    chunk = self._document(line[6:], "/v1/chat/completions")
                    if isinstance(chunk, dict):
                        yield chunk

    def models(self) -> dict[str, Card]:
        """``/v1/models`` by id (tenants, adapters, routes); an answer of another shape is one line naming the field."""
        data = self.get("/v1/models")
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list):
            raise SourceError(f"{self.url}/v1/models: not a resident's answer (no 'data' list)")
        try:
            return validate(ModelList, data).by_id()
        except Malformed as exc:
            raise SourceError(f"{self.url}/v1/models: not a resident's answer ({exc})") from None

    def _document(self, raw: bytes | str, path: str) -> Any:
        """The bounded reader (zoo_agent.jsonbound) for every answer: deep or huge JSON is one line, not a traceback."""
        try:
            return loads(raw, limit=_MAX_ANSWER)
        except ValueError as exc:
            raise SourceError(f"{self.url}{path}: not a resident's answer ({exc})") from None


def _content(chunk: dict[str, Any]) -> str:
    """The text a streamed chunk adds; nothing for a chunk of another shape."""
    choices = chunk.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    delta = first.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _described(card: Card) -> str:
    """What a card serves, for the banner: a tenant's model@version, or a route's tenants."""
    if card.x_zoo is not None and card.x_zoo.kind == "route":
        return "a route over " + ", ".join(card.x_zoo.tenants or [])
    return str(card.root)


def _answered(zoo: AnswerZoo, fingerprint: Any, session: str) -> str:
    """The line after an answer: which model@version (and adapter, route tenant) answered, and the session's cache."""
    adapter = f" · adapter {zoo.adapter}" if zoo.adapter else ""
    via = f" · {zoo.route.tenant} by {zoo.route.rule}" if zoo.route is not None else ""
    if zoo.remote is not None:  # a remote tenant: its server answered, and no session was kept (issue #36)
        return f"[{fingerprint or '-'}{via} · remote {zoo.remote}]"
    cache = zoo.session.cache if zoo.session is not None else "-"
    return f"[{fingerprint}{adapter}{via} · session {session} · cache {cache}]"


def _greet(client: Client, tenant: str, card: Any, session: str, out: Any) -> list[dict[str, str]] | None:
    """Say what the chat talks to; the conversation this chat holds itself (a remote tenant's), else None (the session's)."""
    # A remote tenant (issue #36) keeps no sessions: this chat holds the conversation and sends it whole.
    if card.x_zoo is not None and card.x_zoo.backend == "openai":
        out.write(f"talking to {tenant} ({_described(card)}, a remote tenant): the conversation is kept by this chat only, not saved; {HELP}\n")
        return []
    try:  # the session of this tenant or route (a route's sessions are its own, not its tenants')
        found = client.get(f"/v1/sessions/{quote(session, safe='')}?model={quote(tenant, safe='')}")
        turns = found.get("turns") if isinstance(found, dict) else None
        out.write(f"resuming session {session} ({len(turns) if isinstance(turns, list) else '?'} turns) with {tenant} ({_described(card)}); {HELP}\n")
    except UsageError:
        out.write(f"new session {session} with {tenant} ({_described(card)}); {HELP}\n")
    return None


def _turn(client: Client, model: str, session: str, text: str, history: list[dict[str, str]] | None, out: Any) -> None:
    """One turn: the answer streamed out as it comes, then who gave it."""
    last: dict[str, Any] = {}
    said: list[str] = []
    asked = {"role": "user", "content": text}
    body = {"model": model, "session": session, "messages": [asked]} if history is None else {"model": model, "messages": [*history, asked]}
    for chunk in client.stream(body):
        if delta := _content(chunk):
            said.append(delta)
            out.write(delta)
            out.flush()
        last = chunk
    if history is not None:
        history += [asked, {"role": "assistant", "content": "".join(said)}]
    try:
        zoo = validate(AnswerZoo, last["x_zoo"], "x_zoo") if isinstance(last.get("x_zoo"), dict) else AnswerZoo()
    except Malformed as exc:
        raise SourceError(f"{client.url}/v1/chat/completions: not a resident's answer ({exc})") from None
    out.write("\n" + _answered(zoo, last.get("system_fingerprint"), session) + "\n")


def run_chat(client: Client, tenant: str, session: str, out: Any = None) -> None:
    """``tenant`` is a tenant, ``tenant:adapter`` or a route (issue #36): whatever /v1/models lists.
    ``out``: standard output as it is when called (click's test runner replaces it)."""
    out = out if out is not None else sys.stdout
    models = client.models()
    if tenant not in models:
        raise UsageError(f"--model {tenant}: not served at {client.url} (serving: {', '.join(models)})")
    model = tenant
    card = models[tenant]
    history = _greet(client, tenant, card, session, out)
    while True:
        out.write("you> ")
        out.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            out.write("\nbye\n" if history is not None else f"\nbye; resume with: zoo-agent chat --session {session} --model {tenant}\n")
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/adapter"):
            name = text.removeprefix("/adapter").strip()
            wanted = tenant if name in ("", "off") else f"{tenant}:{name}"
            if wanted not in models:
                adapters = [m.split(":", 1)[1] for m in models if m.startswith(f"{tenant}:")]
                out.write(f"no adapter '{name}' here (adapters: {', '.join(adapters) or 'none'})\n")
            else:
                model = wanted
                out.write(f"now using {model}\n")
            continue
        if text == "/new":
            session = f"chat-{secrets.token_hex(4)}"
            if history is not None:
                history.clear()
            out.write(f"new session {session}\n")
            continue
        _turn(client, model, session, text, history, out)

@click.command("chat")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, envvar="ZOO_URL", help="The resident's address ($ZOO_URL).")
@click.option("--model", "tenant", default=None, help="Tenant, <tenant>:<adapter> or route (default: the first tenant the resident serves).")
@click.option("--session", default=None, help="Resume this session (default: a new one).")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None, help="Bearer token for a resident that needs one.")
def chat_cmd(url: str, tenant: str | None, session: str | None, api_key_file: Path | None) -> None:
    """Talk to the host's resident; the conversation is a session that survives restarts."""
    api_key = read_key_file(api_key_file, "--api-key-file") if api_key_file else None
    client = Client(url, api_key)
    if tenant is None:
        tenant = next((tid for tid, m in client.models().items() if m.parent is None), None)
        if tenant is None:
            raise UsageError(f"{client.url}: serves no tenant; pass --model")
    run_chat(client, tenant, session or f"chat-{secrets.token_hex(4)}")
