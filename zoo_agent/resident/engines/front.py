"""The router's side of an engine's own server: the worker boundary, where our API meets llama-server's (issue #33).

The router forwards to a worker's private socket and streams its answer back unparsed; llama-server
speaks the same OpenAI API, so almost everything passes through as bytes. The front stands on that
socket and translates only what llama-server would serve differently, so that nothing above the
worker knows which engine answers:

- a request it cannot serve as asked is refused here, in our error shape, never misserved: a model
  name other than the tenant's or one of its adapters' (llama-server would ignore the name and
  answer with the base model), a route's ``session`` (it would answer without the conversation; a
  tenant's sessions are kept here, by ``llamasessions``), our adapters' endpoints, and a body our API refuses from any tenant (``n`` above 1, a list of
  prompts: more sequences than the router admitted);
- an error answer is ours: its ``exceed_context_size_error`` is our 400 naming ``messages`` (or
  ``prompt``), the others keep their status and message in our shape (``wire.http.ApiError``);
- a generation of a tenant with adapters is sent with llama-server's ``lora`` field: the adapters
  its ``model`` (or ``x_zoo.adapters``) names, each other one at scale 0 (``llamalora.py``);
- a 200 passes byte for byte, as it comes (chunked events, ``usage``, llama.cpp's ``timings``).

One request per connection on both sides (``Connection: close``): the end of an answer is the end of
its connection, and a client that leaves (the router closes ours) closes the engine's, which cancels
the generation there. Each connection has a thread of its own that sleeps in ``poll`` between
chunks. Every read is bounded: a request's head (``HEAD_LIMIT``) and body (``BODY_LIMIT``), an error
answer (``ERROR_LIMIT``), the time a request takes to arrive (``READ_SECONDS``); at most
``MAX_CONNECTIONS`` at once (the router holds at most ``max_batch + max_queue`` per tenant).
"""

from __future__ import annotations

import http
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from zoo_agent.jsonbound import loads
from zoo_agent.resident.engines.llamalora import Loras, lora_field, with_lora
from zoo_agent.resident.wire.headers import SESSION_ROUTE
from zoo_agent.resident.wire.http import MAX_BODY, ApiError

__all__ = ["BODY_LIMIT", "ERROR_LIMIT", "HEAD_LIMIT", "MAX_CONNECTIONS", "Front", "Request", "check", "engine_error"]

log = logging.getLogger("zoo_agent.resident")

HEAD_LIMIT = 64 << 10
#: The router's body limit, and room for what a route's re-encoding adds.
BODY_LIMIT = 2 * MAX_BODY
ERROR_LIMIT = 1 << 20
READ_SECONDS = 30.0
CONNECT_SECONDS = 5.0
MAX_CONNECTIONS = 1024
GENERATE = ("/v1/chat/completions", "/v1/completions")


class _Closed(Exception):
    """The other side closed, or broke the framing: nothing more is said on this connection."""


@dataclass(frozen=True)
class Request:
    """One request as the router sent it: what the front looks at, and the body it forwards unchanged."""

    method: str
    path: str
    target: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; the first of each
    body: bytes = b""


def check(request: Request, names: tuple[str, ...], loras: Loras | None = None, sessions: bool = False) -> ApiError | None:
    """Why llama-server must not be asked this (pure), or None. ``names``: what ``model`` may say
    (the tenant, its model's id); ``loras``: the tenant's adapters (``<tenant>:<adapter>``). A
    generation's body is held to our API's rules (``worker/bodies``: the same 400 naming the same
    field as from any tenant; one completion of one prompt per request, which is what the router's
    admission counts), and then forwarded as it came (with ``lora`` for a tenant with adapters).
    ``sessions``: the front keeps the tenant's sessions (``llamasessions``), which take a chat turn that names one."""
    if request.path in GENERATE and request.method == "POST":
        try:
            document = loads(request.body, limit=BODY_LIMIT)
        except ValueError as exc:
            return ApiError(400, f"body: {exc}", "body")
        if not isinstance(document, dict):
            return ApiError(400, "body: must be a JSON object", "body")
        if (invalid := _invalid(document, chat=request.path == GENERATE[0])) is not None:
            return invalid
        if isinstance(lora := lora_field(document, names, loras), ApiError):  # its adapters (llamalora.py)
            return lora
        if (refused := _session_refused(request, document, sessions)) is not None:
            return refused
        if document.get("n_cmpl", 1) != 1:
            return ApiError(400, "n_cmpl: only 1 is supported; send the request again for another completion", "n_cmpl")
        return None
    if request.path == "/metrics" and request.method == "GET":
        return None
    if request.path.startswith("/v1/sessions/"):
        return None if sessions else ApiError(404, "session: a llama.cpp tenant keeps no sessions here", "session", "not_supported")
    if request.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        return ApiError(400, "lora_name: a llama.cpp tenant loads no adapters at runtime", "lora_name", "not_supported")
    return ApiError(404, f"{request.path[:100]}: not served by a llama.cpp tenant")


def _session_refused(request: Request, document: dict[str, Any], sessions: bool) -> ApiError | None:
    """A ``session`` the front cannot keep (pure): none kept here, a route's (its turns span tenants),
    or one on ``/v1/completions`` (a session is a chat)."""
    if SESSION_ROUTE.lower() in request.headers:
        return ApiError(400, "session: a route's session is not kept by a llama.cpp tenant yet; send the whole conversation", "session", "not_supported")
    if document.get("session") is None:
        return None
    if not sessions:
        return ApiError(400, "session: this llama.cpp tenant keeps no sessions; send the whole conversation", "session", "not_supported")
    if request.path != GENERATE[0]:
        return ApiError(400, f"session: a session is a chat; ask {GENERATE[0]}", "session")
    return None


def _invalid(document: dict[str, Any], chat: bool) -> ApiError | None:
    """The body against our API's model of it (``ChatBody``, ``CompletionBody``): its first problem, named as our workers name it."""
    from pydantic import ValidationError

    from zoo_agent.resident.worker.bodies import ChatBody, CompletionBody

    try:
        (ChatBody if chat else CompletionBody).model_validate(document)
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(part) for part in errors[0]["loc"] if isinstance(part, int) or str(part).isidentifier())
        same = [e for e in errors if ".".join(str(x) for x in e["loc"] if isinstance(x, int) or str(x).isidentifier()) == where]
        chosen = next((e for e in same if not str(e.get("type", "")).endswith("_type")), errors[0])  # a union's branch that says what is wrong
        return ApiError(400, f"{where}: {chosen['msg']}" if where else "body: must be a JSON object", where or "body")
    return None


def engine_error(status: int, body: bytes, field_name: str) -> ApiError:
    """llama-server's error answer in our shape (pure): a prompt past the context (the tenant's
    ``max_context``, or the model's own where that is smaller) is a 400 naming ``field_name``
    (``messages`` or ``prompt``); any other keeps its status and message."""
    error: object = None
    try:
        document = loads(body, limit=ERROR_LIMIT)
        error = document.get("error") if isinstance(document, dict) else None
    except ValueError:
        pass
    if not isinstance(error, dict):
        text = body[:400].decode("utf-8", "replace")
        return ApiError(status if 400 <= status <= 599 else 502, f"llama-server answered {status}: {' '.join(text.split())}")
    kind = error.get("type") if isinstance(error.get("type"), str) else None
    if kind == "exceed_context_size_error":
        tokens, context = error.get("n_prompt_tokens"), error.get("n_ctx")
        return ApiError(400, f"{field_name}: {tokens} tokens do not fit the context of {context} tokens", field_name, "context_length_exceeded")
    message = " ".join(str(error.get("message", ""))[:400].split())
    return ApiError(status if 400 <= status <= 599 else 502, message or f"llama-server answered {status}", code=kind)


def _head(data: bytes) -> tuple[str, list[tuple[str, str]]]:
    """The first line and the header fields of an HTTP head (``_Closed`` when it is none)."""
    lines = data.decode("latin-1").split("\r\n")
    fields = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _Closed(f"a header line without a name: {line[:60]!r}")
        fields.append((name.lower(), value.strip()))
    return lines[0], fields


class _Conn:
    """A socket read up to the end of an HTTP head, then in chunks (``buffer``: what came after the head)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def head(self, limit: int) -> bytes:
        data = bytearray()
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > limit:
                raise _Closed(f"a head larger than {limit} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed("closed before its head ended")
            data += chunk
        self.buffer = bytes(data[end + 4 :])
        return bytes(data[:end])

    def exactly(self, n: int) -> bytes:
        data = bytearray(self.buffer[:n])
        self.buffer = self.buffer[n:]
        while len(data) < n:
            chunk = self.sock.recv(min(65536, n - len(data)))
            if not chunk:
                raise _Closed("closed before its body ended")
            data += chunk
        return bytes(data)


def _dechunk(data: bytes) -> bytes:
    """A chunked body's bytes (what arrived of it: an answer cut short is what it is)."""
    out, at = bytearray(), 0
    while (end := data.find(b"\r\n", at)) >= 0:
        try:
            size = int(data[at:end].split(b";", 1)[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[end + 2 : end + 2 + size]
        at = end + 2 + size + 2
    return bytes(out)


class Dechunker:
    """A chunked body read as it arrives: ``feed`` gives the data whole so far; ``ended`` once its last chunk came."""

    def __init__(self) -> None:
        self.pending = b""
        self.left = 0  # data bytes still to come in the current chunk
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        self.pending += data
        out = bytearray()
        while self.pending and not self.ended:
            if self.left < 0:  # the CRLF after a chunk's data
                if len(self.pending) < 2:
                    break
                self.pending, self.left = self.pending[2:], 0
                continue
            if self.left > 0:
                take = self.pending[: self.left]
                out += take
                self.left -= len(take)
                self.pending = self.pending[len(take) :]
                if self.left == 0:
                    self.left = -1
                continue
            end = self.pending.find(b"\r\n")
            if end < 0:
                if len(self.pending) > 1024:
                    raise _Closed("a chunk size line longer than 1 KiB")
                break
            try:
                size = int(self.pending[:end].split(b";", 1)[0], 16)
            except ValueError:
                raise _Closed("a chunk size that is no number") from None
            self.pending = self.pending[end + 2 :]
            if size == 0:
                self.ended = True
            else:
                self.left = size
        return bytes(out)


class _Whole:
    """Whether an answer relayed so far is whole, from its own framing: its Content-Length, or its
    chunked body's last chunk; an answer framed by the connection's end is whole only at that end."""

    def __init__(self) -> None:
        self.left: int | None = None
        self.chunks: Dechunker | None = None

    def begin(self, fields: list[tuple[str, str]], chunked: bool) -> None:
        if chunked:
            self.chunks = Dechunker()
            return
        length = next((v.strip() for k, v in fields if k == "content-length"), "")
        self.left = int(length) if length.isdigit() else None

    def feed(self, data: bytes) -> None:
        if self.chunks is not None:
            with suppress(_Closed):  # a malformed chunk: never whole (the router sees it broken)
                self.chunks.feed(data)
        elif self.left is not None:
            self.left -= len(data)

    def done(self, at_end: bool = False) -> bool:
        """Whole by its framing; ``at_end``: the engine closed, which is the end of an answer framed by it."""
        if self.chunks is not None:
            return self.chunks.ended
        return self.left <= 0 if self.left is not None else at_end


def _answer(sock: socket.socket, error: ApiError) -> None:
    body = error.body()
    head = (f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode("latin-1") + body)


class SessionKeeper(Protocol):
    """The tenant's sessions (``llamasessions.LlamaSessions``): the requests it takes, answered on the connection."""

    def takes(self, request: Request) -> bool: ...

    def serve(self, conn: socket.socket, request: Request) -> bool: ...


class Front:
    """The socket the router forwards a llama.cpp tenant's requests to (``path``), in front of
    llama-server's own (``engine``). ``inflight`` and ``served`` are what the supervisor is told;
    ``sessions``, when set, keeps the tenant's sessions."""

    def __init__(self, path: str, engine: str, names: tuple[str, ...], loras: Loras | None = None) -> None:
        self.path, self.engine, self.names = path, engine, names
        self.loras = loras
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(128)
        self.listener.settimeout(0.25)  # the accepting thread looks at ``_stopped`` this often
        self.lock = threading.Lock()
        self.inflight = 0
        self.served = 0
        self._stopped = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.sessions: SessionKeeper | None = None

    def start(self) -> None:
        threading.Thread(target=self._accept, name=f"front-{os.path.basename(self.path)}", daemon=True).start()

    def stop(self) -> None:
        """Take no new connection (those in flight go on); the socket's file goes."""
        if not self._stopped.is_set():
            self._stopped.set()
            self.listener.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            if not self._slots.acquire(blocking=False):
                with conn:
                    conn.settimeout(1.0)
                    _try(_answer, conn, ApiError(503, f"more than {MAX_CONNECTIONS} requests at once"))
                continue
            with self.lock:
                self.inflight += 1
            threading.Thread(target=self._serve, args=(conn,), name="front-request", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._exchange(conn)
        except (OSError, _Closed) as exc:
            log.debug("front %s: %s", self.path, exc)
        finally:
            with self.lock:
                self.inflight -= 1
            self._slots.release()

    def _exchange(self, conn: socket.socket) -> None:
        conn.settimeout(READ_SECONDS)
        ours = _Conn(conn)
        line, fields = _head(ours.head(HEAD_LIMIT))
        method, _, rest = line.partition(" ")
        target = rest.rpartition(" ")[0] or rest
        headers: dict[str, str] = {}
        for name, value in fields:
            headers.setdefault(name, value)
        if "transfer-encoding" in headers:
            _answer(conn, ApiError(400, "body: send it with a Content-Length"))
            return
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= BODY_LIMIT:
            _answer(conn, ApiError(413 if length > 0 else 400, f"body: at most {BODY_LIMIT} bytes, with a Content-Length"))
            return
        request = Request(method, target.partition("?")[0], target, headers, ours.exactly(length))
        if (refused := check(request, self.names, self.loras, self.sessions is not None)) is not None:
            _answer(conn, refused)
            return
        if request.path in GENERATE:
            request = replace(request, body=with_lora(request.body, self.names, self.loras))
        if self.sessions is not None and self.sessions.takes(request):
            if self.sessions.serve(conn, request):
                with self.lock:
                    self.served += 1
            return
        generate = request.path in GENERATE
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as engine:
            engine.settimeout(CONNECT_SECONDS)
            engine.connect(self.engine)  # fails: we close without an answer, and the router sends it again elsewhere
            head = f"{method} {target} HTTP/1.1\r\nhost: llama-server\r\nconnection: close\r\n"
            if method == "POST":
                head += f"content-type: application/json\r\ncontent-length: {len(request.body)}\r\n"
            engine.sendall(head.encode("latin-1") + b"\r\n" + request.body)
            if self._relay(conn, engine, generate, "messages" if request.path == GENERATE[0] else "prompt") and generate:
                with self.lock:
                    self.served += 1

    def _relay(self, conn: socket.socket, engine: socket.socket, generate: bool, field_name: str) -> bool:
        """The engine's answer to the router: a 200 (or anything but a generation) as it comes, an
        error in our shape. False when either side went away first: the router closing once it had
        the whole answer (it closes as soon as it does, often before the engine's end arrives) is
        not going away, so the answer's own framing says when it is whole."""
        poller = select.poll()
        poller.register(engine, select.POLLIN)
        poller.register(conn, select.POLLIN)
        theirs = _Conn(engine)
        engine.settimeout(None)
        conn.settimeout(None)
        head: bytes | None = None
        status, chunked, passing = 502, False, False
        whole = _Whole()
        body = bytearray()
        deadline: float | None = None  # an error answer is read within READ_SECONDS
        while True:
            ready = {fd for fd, _ in poller.poll(None if deadline is None else 250)}
            if conn.fileno() in ready:
                # the router closed: after the whole answer, that is its way of saying so; before, its
                # client left, and closing the engine's connection cancels the generation
                return passing and whole.done() and status == 200
            if deadline is not None and time.monotonic() > deadline:
                return False
            if engine.fileno() not in ready:
                continue
            if head is None:
                head = theirs.head(HEAD_LIMIT)
                line, fields = _head(head)
                code = line.split(" ", 2)[1] if line.count(" ") >= 1 else ""
                status = int(code) if code.isdigit() and len(code) == 3 else 502
                chunked = any(k == "transfer-encoding" and "chunked" in v.lower() for k, v in fields)
                passing = status == 200 or not generate
                if passing:
                    out = [line] + [f"{k}: {v}" for k, v in fields if k not in ("connection", "keep-alive")] + ["connection: close"]
                    conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + theirs.buffer)
                    whole.begin(fields, chunked)
                    whole.feed(theirs.buffer)
                else:
                    body += theirs.buffer
                    deadline = time.monotonic() + READ_SECONDS
                continue
            chunk = engine.recv(65536)
            if not chunk:
                break
            if passing:
                conn.sendall(chunk)
                whole.feed(chunk)
            else:
                body += chunk
                if len(body) > ERROR_LIMIT:
                    break
        if not passing:
            _answer(conn, engine_error(status, _dechunk(bytes(body)) if chunked else bytes(body), field_name))
            return True
        return status == 200 and whole.done(at_end=True)  # an engine that died mid-answer served nothing


def _try(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except OSError:
        pass
