"""`zoo-agent chat`: a conversation with the host's resident in the terminal (issue #9).

Streams tokens as they arrive and keeps the conversation as a session on the server, so
`--session ID` resumes it later, even after a restart of the resident. Standard library
only: it talks to the OpenAI-compatible API over HTTP like any other client.
"""

from __future__ import annotations

import json
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from zoo_agent.errors import SourceError, UsageError

__all__ = ["chat_cmd", "run_chat"]

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
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise UsageError(f"{self.url}{path}: HTTP {exc.code}: {message}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise SourceError(f"{self.url}: the resident does not answer ({getattr(exc, 'reason', exc)}); is zoo-agent resident running?") from exc

    def get(self, path: str) -> Any:
        with self._open("GET", path, timeout=30) as response:
            return json.load(response)

    def stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._open("POST", "/v1/chat/completions", {**body, "stream": True}) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    yield json.loads(line[6:])


def run_chat(client: Client, tenant: str, session: str, out: Any = sys.stdout) -> None:
    models = {m["id"]: m for m in client.get("/v1/models")["data"]}
    if tenant not in models:
        raise UsageError(f"--model {tenant}: not served at {client.url} (serving: {', '.join(models)})")
    model = tenant
    try:
        turns = len(client.get(f"/v1/sessions/{session}")["turns"])
        out.write(f"resuming session {session} ({turns} turns) with {tenant} ({models[tenant]['root']}); {HELP}\n")
    except UsageError:
        out.write(f"new session {session} with {tenant} ({models[tenant]['root']}); {HELP}\n")
    while True:
        out.write("you> ")
        out.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            out.write(f"\nbye; resume with: zoo-agent chat --session {session}\n")
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
            out.write(f"new session {session}\n")
            continue
        last: dict[str, Any] = {}
        for chunk in client.stream({"model": model, "session": session, "messages": [{"role": "user", "content": text}]}):
            delta = chunk["choices"][0].get("delta", {}).get("content")
            if delta:
                out.write(delta)
                out.flush()
            last = chunk
        zoo = last.get("x_zoo", {})
        info = zoo.get("session", {})
        adapter = f" · adapter {zoo['adapter']}" if zoo.get("adapter") else ""
        out.write(f"\n[{last.get('system_fingerprint')}{adapter} · session {session} · cache {info.get('cache', '-')}]\n")

@click.command("chat")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, envvar="ZOO_URL", help="The resident's address ($ZOO_URL).")
@click.option("--model", "tenant", default=None, help="Tenant id (default: the one the resident serves).")
@click.option("--session", default=None, help="Resume this session (default: a new one).")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None, help="Bearer token for a resident that needs one.")
def chat_cmd(url: str, tenant: str | None, session: str | None, api_key_file: Path | None) -> None:
    """Talk to the host's resident; the conversation is a session that survives restarts."""
    api_key = api_key_file.read_text().strip() if api_key_file else None
    client = Client(url, api_key)
    if tenant is None:
        tenant = next(m["id"] for m in client.get("/v1/models")["data"] if m.get("parent") is None)
    run_chat(client, tenant, session or f"chat-{secrets.token_hex(4)}")
