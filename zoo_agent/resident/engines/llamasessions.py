"""Sessions on a llama.cpp tenant (issue #33): ours, kept by the front, the conversation replayed to ``llama-server``.

A transformers tenant's sessions live in its worker process, beside the model. A llama.cpp tenant's
worker is ``llama-server``, which keeps no conversation of ours, so the same session store
(``sessions/store.py``, ``transcript.py``, ``turns.py``, ``prompt.py``: no torch on this path) runs
in the front, in the supervisor's process, on the request's own thread. One code path: the same
files, the same ``Turn``, the same commit, the same ``x_zoo.session`` and the same errors as from a
transformers worker.

- **The prompt** is the transcript's messages and the new ones, sent as a chat request: the
  engine renders them with its own chat template, exactly as when a client sends the whole
  conversation, and its prompt cache (``cache_prompt``) reuses what the slot already holds of it (the
  conversation so far, when the previous turn ran there). Turns that no longer fit ``max_context``
  with the answer's ``max_tokens`` are left out, oldest first, counted in the engine's own tokens
  (its ``/apply-template`` and ``/tokenize``: what it will see).
- **The commit**: a turn is committed (temp file, fsync, rename) once the engine's answer completed
  (a ``finish_reason``), before the client sees its end: a whole answer is held until then; a
  streamed one passes chunk by chunk, and its last chunk (which carries ``x_zoo``) and ``[DONE]`` wait
  for the commit. A client that leaves, an engine that dies or answers an error: nothing committed.
  So a SIGKILL of the whole resident loses no turn whose answer completed.
- **The reply's ids**: llama-server gives no token ids of a streamed answer, so a turn's
  ``completion_ids`` are its text as the engine tokenizes it again (the prompt is built from text
  here; the ids are kept so the transcript reads the same to every tool).
- **Hibernation**: with each committed turn (before the answer ends, as a transformers worker saves
  its cache) the slot that served it (the answer's ``__verbose.id_slot``: asked for, taken out) is
  saved by llama-server's slot save into ``slots/<session>+<key>.bin``, the key a digest of
  model@version, the cache type and the adapters (the tenant's versions, the turn's choice), so
  that a slot is never restored into another version or adapter. The
  name is ours (a valid session id), written under a temporary name and renamed here; a link
  planted at either name is removed, never written or read through. A session whose conversation
  is in no slot of this engine (a new one: a page-out, a restart) has its saved slot restored into
  an idle slot before its next turn, which is sent to that slot (``id_slot``); llama-server checks
  the saved tokens against the prompt, and we check the file's sha256 (kept beside it, written before
  it is renamed into place): a stale or damaged file costs a prefill, never a wrong answer.
- **One turn at a time per session**: a second request for a session with a turn under way is a 409
  (``session_busy``), across the old and the new engine of a reload too.

Route sessions (``X-Zoo-Session-Route``) are not kept here yet: the front refuses them.
"""

from __future__ import annotations

import http
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zoo_agent.errors import ZooError
from zoo_agent.jsonbound import loads
from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.engines.front import ERROR_LIMIT, HEAD_LIMIT, READ_SECONDS, Dechunker, Request, _answer, _Conn, _head, engine_error
from zoo_agent.resident.engines.llamaslots import EngineError, SlotFiles, ask
from zoo_agent.resident.sessions.checkpoints import CheckpointPolicy
from zoo_agent.resident.sessions.prompt import rendered_prompt
from zoo_agent.resident.sessions.store import SessionError, Sessions, Turn, valid_id
from zoo_agent.resident.sessions.transcript import MAX_SESSION_BYTES, SessionTurn
from zoo_agent.resident.sessions.turns import Refusal, session_document, session_turn
from zoo_agent.resident.wire.documents import AnswerZoo, SessionReport, dump
from zoo_agent.resident.wire.http import ApiError

__all__ = ["CHAT", "EngineTokenizer", "LlamaSessions", "StreamedTurn", "cache_word", "dechunker"]

log = logging.getLogger("zoo_agent.resident")

CHAT = "/v1/chat/completions"
SESSIONS = "/v1/sessions/"
#: A whole answer held for its commit: a transcript is at most this large anyway.
ANSWER_LIMIT = MAX_SESSION_BYTES
TOKENIZE_SECONDS = 60.0
_busy: set[tuple[str, str]] = set()  # (sessions directory, id): a turn under way, across a reload's two engines
_busy_lock = threading.Lock()


class EngineTokenizer:
    """What ``sessions/prompt.py`` asks of a tokenizer, answered by the engine: its chat template
    (``/apply-template``) and its tokenizer as it tokenizes a prompt (``/tokenize`` with its special
    tokens, as the engine adds them to every prompt: the count is what the engine will see)."""

    eos_token_id = None

    def __init__(self, engine: str) -> None:
        self.engine = engine

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        prompt = ask(self.engine, "/apply-template", {"messages": messages}, TOKENIZE_SECONDS).get("prompt")
        if not isinstance(prompt, str):
            raise EngineError("/apply-template answered no prompt")
        return prompt

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.tokens(text, special=True)}

    def tokens(self, text: str, special: bool) -> list[int]:
        """``special``: as a prompt is tokenized (its special tokens added and read); else as plain text (a reply)."""
        body = {"content": text, "add_special": special, "parse_special": special}
        tokens = ask(self.engine, "/tokenize", body, TOKENIZE_SECONDS).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            raise EngineError("/tokenize answered no token ids")
        return tokens


class _Prompt:
    """``turns.PromptModel`` for the engine: the conversation as the engine renders and tokenizes it."""

    def __init__(self, tokenizer: EngineTokenizer) -> None:
        self.tokenizer = tokenizer

    def session_prompt(self, history: list[SessionTurn], new_messages: list[dict[str, str]], budget: int | None, *,
                       native: Callable[[SessionTurn], bool] | None = None, preface: list[dict[str, str]] | None = None) -> tuple[int, list[int]]:  # fmt: skip
        return rendered_prompt(self.tokenizer, history, new_messages, budget)

    def truncate(self, text: str, tokens: int) -> str:
        return text  # a route's summary: route sessions are not kept here


def dechunker() -> Dechunker:
    """An incremental reader of a chunked body: ``feed(bytes) -> bytes`` of the data that arrived whole so far."""
    return Dechunker()


def cache_word(history: bool, cached_tokens: int, restored: bool = False) -> str:
    """How a turn was continued, in ``x_zoo.session.cache``'s words (pure): ``none`` (its first turn),
    ``restored`` (its hibernated slot), ``cached`` (the engine's prompt cache held the conversation so
    far), ``re-prefilled`` (the engine read it all again, from the transcript)."""
    if not history:
        return "none"
    if restored:
        return "restored"
    return "cached" if cached_tokens > 0 else "re-prefilled"


def _cached_tokens(document: dict[str, Any]) -> int:
    """The prompt tokens the engine took from its cache: ``usage.prompt_tokens_details.cached_tokens`` (or its ``timings.cache_n``)."""
    usage = document.get("usage")
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    if value is None and isinstance(document.get("timings"), dict):
        value = document["timings"].get("cache_n")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class StreamedTurn:
    """A streamed answer's events, as they pass to the client (pure): the reply's text gathered, and
    from the chunk that ends it (its ``finish_reason``) on, everything held until the turn is committed."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish: str | None = None
        self.final: dict[str, Any] | None = None  # the chunk that ends it: x_zoo goes there
        self.held: list[bytes] = []  # what follows it (a usage chunk), then [DONE]
        self.done = False
        self.cached = 0
        self.slot: int | None = None  # the slot that served it (``__verbose.id_slot``)
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The events of ``data`` to send now (each with its blank line)."""
        self._buffer += data
        out = []
        while (end := self._buffer.find(b"\n\n")) >= 0:
            event, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
            if (sent := self._event(event)) is not None:
                out.append(sent)
        return out

    def _event(self, event: bytes) -> bytes | None:
        data = event.strip()
        if data == b"data: [DONE]":
            self.done = True
            return None if self.final is not None else event
        if self.final is not None:
            self.held.append(event)
            return None
        if not data.startswith(b"data: {"):
            return event  # a comment (a ping): passed as it came
        try:
            document = loads(data[6:], limit=ERROR_LIMIT)
        except ValueError:
            return event
        if isinstance(document, dict) and "__verbose" in document:  # asked for by us: which slot served it
            self.slot = _slot_of(document)
            if not isinstance(document.get("choices"), list) or not document["choices"]:
                return None
            event = f"data: {json.dumps(document)}\n\n".encode()
        choices = document.get("choices") if isinstance(document, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        delta = choice.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            self.text.append(delta["content"])
        if isinstance(choice.get("finish_reason"), str):
            self.finish, self.final = choice["finish_reason"], document
            self.cached = _cached_tokens(document)
            return None
        return event

    def ending(self, x_zoo: dict[str, Any]) -> bytes:
        """The held end, once committed: the last chunk with ``x_zoo``, what followed it, ``[DONE]``."""
        assert self.final is not None
        return b"".join([f"data: {json.dumps({**self.final, 'x_zoo': x_zoo})}\n\n".encode(), *self.held, b"data: [DONE]\n\n"])


class LlamaSessions:
    """A llama.cpp tenant's sessions, kept by its front (``Front.sessions``): the chat requests that
    name a ``session`` and ``/v1/sessions/<id>``."""

    def __init__(self, config: WorkerConfig, engine: str) -> None:
        assert config.sessions_dir is not None
        self.config, self.engine = config, engine
        self.tokenizer = EngineTokenizer(engine)
        self.max_context = config.max_context or 4096
        self.max_tokens = int(config.defaults.get("max_tokens") or 256)
        self._store: Sessions | None = None
        self._store_lock = threading.Lock()
        self.hibernation = SlotFiles(config, engine)  # the sessions' slots, saved and restored

    @classmethod
    def for_config(cls, config: WorkerConfig, engine: str) -> LlamaSessions | None:
        return cls(config, engine) if config.sessions_dir is not None else None

    # -- the store ----------------------------------------------------------------------------
    def store(self) -> Sessions:
        """The tenant's session store, made on first use with the engine's chat template (its digest goes into each turn)."""
        with self._store_lock:
            if self._store is None:
                base = self.config.sessions_dir
                assert base is not None
                try:
                    template = str(ask(self.engine, "/props", None, TOKENIZE_SECONDS).get("chat_template") or "")
                except EngineError:
                    template = ""
                c = self.config
                self._store = Sessions(base, model_key=f"{c.model}@{c.version}", dtype=c.kv_cache_type or "f16", template=template,
                                       checkpoints=CheckpointPolicy(c.checkpoint_keep, c.checkpoint_every))  # fmt: skip
            return self._store

    def count(self) -> int:
        """Open sessions, for ``Status:``."""
        return _count(self.config)

    # -- requests -------------------------------------------------------------------------------
    def takes(self, request: Request) -> bool:
        """Whether this request is ours: a chat turn of a session, or a session's own path."""
        if request.path.startswith(SESSIONS):
            return True
        if request.path != CHAT or request.method != "POST":
            return False
        try:
            document = loads(request.body)
        except ValueError:
            return False
        return isinstance(document, dict) and document.get("session") is not None

    def serve(self, conn: socket.socket, request: Request) -> bool:
        """Answer it on ``conn``; whether a generation was served."""
        if request.path.startswith(SESSIONS):
            _answer_json(conn, *self._session_path(request))
            return False
        document = loads(request.body)
        assert isinstance(document, dict)
        sid = document.get("session")
        try:
            valid_id(sid if isinstance(sid, str) else "")
        except SessionError as exc:
            _answer(conn, ApiError(400, str(exc), "session"))
            return False
        assert isinstance(sid, str)
        key = (str(self.config.sessions_dir), sid)
        with _busy_lock:
            if key in _busy:
                busy = True
            else:
                busy = False
                _busy.add(key)
        if busy:
            _answer(conn, ApiError(409, f"session '{sid[:64]}': a turn of it is under way; send the next once it is answered", "session",
                                   "session_busy"))  # fmt: skip
            return False
        try:
            return self._turn(conn, document, sid)
        finally:
            with _busy_lock:
                _busy.discard(key)

    def _session_path(self, request: Request) -> tuple[int, dict[str, Any]]:
        """GET or DELETE /v1/sessions/<id>: as a transformers worker answers them."""
        sid = request.path.removeprefix(SESSIONS)
        if request.method == "GET":
            found = session_document(self.store(), sid)
            return (found.status, _refusal(found).document()) if isinstance(found, Refusal) else (200, found)
        if request.method != "DELETE":
            return 405, ApiError(405, f"method: a session takes GET or DELETE, not {request.method[:20]!r}", "method", "method_not_allowed").document()
        try:
            found_any = self.store().delete(valid_id(sid))
            found_any = self.hibernation.forget(sid) or found_any
        except SessionError as exc:
            return 400, ApiError(400, str(exc), "session").document()
        if not found_any:
            return 404, ApiError(404, f"session '{sid}' does not exist", "session", "session_not_found").document()
        return 200, {"id": sid, "object": "session.deleted", "deleted": True}

    def _turn(self, conn: socket.socket, document: dict[str, Any], sid: str) -> bool:
        store = self.store()
        messages = [{"role": m["role"], "content": m["content"]} for m in document["messages"]]
        max_tokens = document.get("max_tokens") or self.max_tokens
        try:
            made = session_turn(_Prompt(self.tokenizer), store, sid, messages, lambda: self.max_context - int(max_tokens))
        except EngineError as exc:
            log.warning("%s: session %s: the engine did not count its prompt: %s", self.config.tenant, sid, exc)
            _answer(conn, ApiError(503, f"session '{sid}': llama-server did not answer ({exc})"[:400], code="model_unavailable"))
            return False
        if isinstance(made, Refusal):
            _answer(conn, _refusal(made))
            return False
        assert isinstance(made, tuple)  # a tenant's session: no summary to make first
        turn, conversation = made
        # verbose: its answer then says which slot served it (``__verbose.id_slot``, taken out here), the slot to save.
        body = {k: v for k, v in document.items() if k not in ("session", "id_slot")} | {"messages": conversation, "cache_prompt": True, "verbose": True}
        sampling = {k: document.get(k) for k in ("max_tokens", "temperature", "top_p", "seed")}
        sampling["max_tokens"] = int(max_tokens)
        if document.get("stop"):
            sampling["stop"] = [document["stop"]] if isinstance(document["stop"], str) else list(document["stop"])
        if document.get("temperature") is None:
            sampling["temperature"] = self.config.defaults.get("temperature")
        adapter = str(document["model"]).partition(":")[2] or None  # '<tenant>:<adapter>' (the lora field says which, llamalora.py)
        pending = _Pending(turn, store, {k: v for k, v in sampling.items() if v is not None}, lora=document.get("lora"), adapter=adapter)
        if turn.history and (slot := self.hibernation.restore(sid, pending.lora)) is not None:
            body["id_slot"], pending.restored = slot, True
        started = time.monotonic()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as engine:
            engine.settimeout(5.0)
            engine.connect(self.engine)  # fails: closed without an answer, as the front does, and nothing committed
            data = json.dumps(body).encode()
            head = (f"POST {CHAT} HTTP/1.1\r\nhost: llama-server\r\nconnection: close\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(data)}\r\n\r\n")  # fmt: skip
            engine.sendall(head.encode("latin-1") + data)
            committed = self._relay(conn, engine, pending, document.get("stream") is True)
        log.debug("%s: session %s turn %s in %.3fs", self.config.tenant, sid, "committed" if committed else "not committed", time.monotonic() - started)
        return committed

    def _commit(self, pending: _Pending, text: str, finish: str, cached: int) -> dict[str, Any]:
        """The turn, committed durably (``ZooError``/``OSError`` when it cannot be); its ``x_zoo``."""
        turn = pending.turn
        turn.cache = cache_word(bool(turn.history), cached, pending.restored)
        turn.cached_tokens = cached
        try:
            ids = self.tokenizer.tokens(text, special=False) if text else []
        except EngineError as exc:
            log.warning("%s: session %s: the reply's ids are not kept: %s", self.config.tenant, turn.id, exc)
            ids = []
        meta = {"sampling": pending.sampling, "adapter": pending.adapter, "finish_reason": finish, "cache": turn.cache}
        transcript = pending.store.commit(turn, text, ids, meta)
        if pending.slot is not None:  # as a transformers worker saves the turn's cache: before the answer ends
            self.hibernation.save(turn.id, pending.slot, pending.lora)
        pending.store.timed_checkpoint(transcript)
        return dump(AnswerZoo(session=SessionReport(id=turn.id, cache=turn.cache, cached_tokens=turn.cached_tokens, dropped_turns=turn.dropped_turns)))

    def _relay(self, conn: socket.socket, engine: socket.socket, pending: _Pending, stream: bool) -> bool:
        """The engine's answer to the router, its end held until the turn is committed; whether it was."""
        poller = select.poll()
        poller.register(engine, select.POLLIN)
        poller.register(conn, select.POLLIN)
        theirs = _Conn(engine)
        engine.settimeout(None)
        conn.settimeout(None)
        status, chunked, head_seen = 502, False, False
        reader = dechunker()
        body = bytearray()
        streamed = StreamedTurn() if stream else None
        deadline: float | None = None  # an error answer is read within READ_SECONDS
        while True:
            ready = {fd for fd, _ in poller.poll(None if deadline is None else 250)}
            if conn.fileno() in ready:
                return False  # the client left: closing the engine's connection cancels the generation; nothing committed
            if deadline is not None and time.monotonic() > deadline:
                return False
            if engine.fileno() not in ready:
                continue
            if not head_seen:
                line, fields = _head(theirs.head(HEAD_LIMIT))
                head_seen = True
                code = line.split(" ", 2)[1] if line.count(" ") >= 1 else ""
                status = int(code) if code.isdigit() and len(code) == 3 else 502
                chunked = any(k == "transfer-encoding" and "chunked" in v.lower() for k, v in fields)
                chunk = theirs.buffer
                if status != 200:
                    deadline = time.monotonic() + READ_SECONDS
                elif streamed is not None:
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                                 b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")  # fmt: skip
            else:
                chunk = engine.recv(65536)
                if not chunk:
                    break
            data = reader.feed(chunk) if chunked else chunk
            if status == 200 and streamed is not None:
                out = b"".join(streamed.feed(data))
                if out:
                    conn.sendall(_chunk(out))
            else:
                body += data
                if len(body) > (ANSWER_LIMIT if status == 200 else ERROR_LIMIT):
                    break
            if chunked and reader.ended:
                break
        if status != 200:
            _answer(conn, engine_error(status, bytes(body), "messages"))
            return False
        if streamed is not None:
            pending.slot = streamed.slot
            return self._end_stream(conn, streamed, pending)
        return self._end_whole(conn, bytes(body), pending)

    def _end_whole(self, conn: socket.socket, body: bytes, pending: _Pending) -> bool:
        """A whole answer: its turn committed, then the answer with its ``x_zoo``; whether it was."""
        try:
            document = loads(body, limit=ANSWER_LIMIT)
            pending.slot = _slot_of(document)
            choice = document["choices"][0]
            text, finish = choice["message"]["content"] or "", choice["finish_reason"]
            if not isinstance(text, str) or not isinstance(finish, str):
                raise ValueError("no reply's text or finish_reason")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            _answer(conn, ApiError(502, f"llama-server's answer is not a chat completion: {exc}"[:400]))
            return False
        try:
            x_zoo = self._commit(pending, text, finish, _cached_tokens(document))
        except (ZooError, OSError) as exc:
            _answer(conn, self._not_committed(pending, exc))
            return False
        _answer_json(conn, 200, {**document, "x_zoo": x_zoo})
        return True

    def _not_committed(self, pending: _Pending, exc: Exception) -> ApiError:
        log.error("%s: session %s: the turn was not committed: %s", self.config.tenant, pending.turn.id, exc)
        return ApiError(500, f"session '{pending.turn.id}': the turn was not committed ({exc}); send it again"[:400], "session", "session_not_committed")

    def _end_stream(self, conn: socket.socket, streamed: StreamedTurn, pending: _Pending) -> bool:
        if streamed.final is None or streamed.finish is None:  # the engine ended before the answer did
            conn.sendall(_chunk(ApiError(502, "llama-server ended the answer before it was complete; the turn is not kept").event()) + b"0\r\n\r\n")
            return False
        try:
            x_zoo = self._commit(pending, "".join(streamed.text), streamed.finish, streamed.cached)
        except (ZooError, OSError) as exc:
            conn.sendall(_chunk(self._not_committed(pending, exc).event()) + b"0\r\n\r\n")
            return False
        conn.sendall(_chunk(streamed.ending(x_zoo)) + b"0\r\n\r\n")
        return True

    def slot_file(self, sid: str, lora: object = None) -> str:
        """The file a session's slot is saved in (``llamaslots.SlotFiles.file``)."""
        return self.hibernation.file(sid, lora)


@dataclass
class _Pending:
    """A session turn on its way: what its commit needs, and which slot served it (its ``__verbose.id_slot``)."""

    turn: Turn
    store: Sessions
    sampling: dict[str, Any]
    lora: object = None  # the turn's lora field (set by the front on a tenant with adapters): part of its slot file's key
    adapter: str | None = None
    restored: bool = False
    slot: int | None = None


def _slot_of(document: object) -> int | None:
    """``__verbose.id_slot`` of an answer (or of a stream's event), taken out of it: the client did not ask for it."""
    verbose = document.pop("__verbose", None) if isinstance(document, dict) else None
    slot = verbose.get("id_slot") if isinstance(verbose, dict) else None
    return slot if isinstance(slot, int) and not isinstance(slot, bool) and slot >= 0 else None


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _refusal(refusal: Refusal) -> ApiError:
    return ApiError(refusal.status, refusal.message, refusal.param, refusal.code)


def _answer_json(conn: socket.socket, status: int, document: dict[str, Any]) -> None:
    body = json.dumps(document).encode()
    phrase = http.HTTPStatus(status).phrase
    conn.sendall(f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                 + body)  # fmt: skip


def _count(config: WorkerConfig) -> int:
    assert config.sessions_dir is not None
    try:
        return sum(1 for p in (config.sessions_dir / "sessions").iterdir() if p.suffix == ".json")
    except OSError:
        return 0

