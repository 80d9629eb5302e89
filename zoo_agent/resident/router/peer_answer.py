"""What a peer's answer may be before any of it reaches a client (issue #31). Pure: bytes
in, the bytes to send out or :class:`Refused`; no sockets, no clock.

A peer holds the fleet key: trusted to generate, not to speak to our clients. The router
relays only

- a ``200`` whose body is one JSON object with a ``choices`` list (a completion), or, when
  the client asked for a stream, ``text/event-stream`` events that are each one line:
  ``data: <a JSON object with choices>``, ``data: [DONE]`` (nothing after it is read) or,
  after the first token, ``data: <a JSON object with an error>``; comment lines (the peer's
  "waiting for" notes) are dropped;
- a ``400``, ``404``, ``413`` or ``422`` whose body is ``{"error": {"message": "..."}}``:
  the request's own error, which every peer serving the same pins would give (a ``404``
  for an adapter the index declares is such an error, never a reason to ask the next peer).
  Its message (and an error event's) reaches our client cut to one line of at most 200
  printable characters, as our own 503 quotes it (``error_message``).

Each document is read by the one bounded reader (``zoo_agent.jsonbound``) and written out
again by us, with ``x_zoo`` (who answered) added; the head is ours, never the peer's (no
``Location``, ``Set-Cookie`` or ``Content-Encoding``: the router reads bodies decoded).
Everything else is a failed attempt, the next peer's turn: a ``3xx`` (a standard-library
client would follow its ``Location`` with its own ``Authorization`` header), a ``1xx``,
another ``2xx``, ``401``/``403`` (our fleet key, the peer's ``accept_from_peers``), ``429``
(busy), a ``5xx``, any other status, and any body or event that is not as above.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from zoo_agent.jsonbound import loads

__all__ = ["PASSED_ON", "RELAYED_ERRORS", "Events", "Refused", "error_message", "head", "judge", "whole"]

#: The request's own errors: the same at every peer serving the same pins, so relayed.
RELAYED_ERRORS = frozenset({400, 404, 413, 422})
#: The peer's own state (our fleet key refused, the tenant not accepted, busy): the next peer may answer.
PASSED_ON = frozenset({401, 403, 429})
#: How much of a failed answer is read for its message (the rest is not needed).
MAX_ERROR = 64 << 10


class Refused(ValueError):
    """An answer (or part of one) that is not relayed: a failed attempt, with why in one line.
    ``ready``: the events checked before it in the same chunk, which may still be sent."""

    def __init__(self, message: str, ready: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.ready = ready or []


def judge(status: int, content_type: str, stream: bool) -> Literal["answer", "error"]:
    """Whether a head may lead to a relayed answer (``answer``: a 200; ``error``: a relayed 4xx); ``Refused`` otherwise."""
    media = content_type.partition(";")[0].strip().lower()
    if status == 200:
        wanted = "text/event-stream" if stream else "application/json"
        if media != wanted:
            raise Refused(f"answered 200 with Content-Type {content_type[:60]!r}, not {wanted}")
        return "answer"
    if status in RELAYED_ERRORS:
        if media != "application/json":
            raise Refused(f"answered {status} with Content-Type {content_type[:60]!r}, not application/json")
        return "error"
    raise Refused(f"answered {status}")


def head(stream: bool) -> list[tuple[bytes, bytes]]:
    """Our response headers for a relayed answer (the peer's are never passed on)."""
    if stream:
        return [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    return [(b"content-type", b"application/json")]


def whole(status: int, data: bytes, x_zoo: dict[str, Any]) -> bytes:
    """A whole (not streamed) answer as we send it: the peer's document, checked, with ``x_zoo`` added."""
    document = _object(data, "its answer")
    if status == 200:
        if not isinstance(document.get("choices"), list):
            raise Refused("answered 200 with no completion (no 'choices' list)")
    elif not isinstance(error := document.get("error"), dict) or not isinstance(error.get("message"), str):
        raise Refused(f"answered {status} with no error message")
    else:
        document = _cut_error(document)
    return _dump(_with_x_zoo(document, x_zoo))


def error_message(data: bytes) -> str:
    """A failed answer's ``error.message`` for our own 503, one short printable line; '' when it has none."""
    try:
        document = loads(data)
    except ValueError:
        return ""
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return _line(message) if isinstance(message, str) else ""


def _line(message: str) -> str:
    """A peer's message as our client may read it: at most 200 characters, each printable (a newline or an escape is a space)."""
    return "".join(c if c.isprintable() else " " for c in message[:200])


def _cut_error(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with its ``error.message`` (when a string) on one short printable line."""
    error = document.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return document
    return {**document, "error": {**error, "message": _line(error["message"])}}


class Events:
    """A peer's event stream, fed as it arrives. ``feed`` returns the events to send now, each
    ending in its blank line: none until one commits the answer (text, a finish or [DONE]; the
    role chunk does not), then every event held so far and each one after. An error event
    before that is a failed attempt (a peer that waited for its tenant to load sends its notes,
    then an error, in a stream it already started); after it, it ends the relayed stream.
    ``Refused`` for an event that is not ours to relay, one larger than ``limit``, or more than
    ``limit`` bytes held; before ``committed`` that is the next peer's turn, after it the router
    ends the stream with an error. Nothing after ``data: [DONE]`` is read (``finished``)."""

    def __init__(self, x_zoo: dict[str, Any], limit: int) -> None:
        self.x_zoo, self.limit = x_zoo, limit
        self.committed = False
        self.finished = False  # [DONE] came: the answer is over, whatever follows is not read
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._buffer = bytearray()
        self._searched = 0  # the buffer before this holds no separator: each byte is searched once

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        out: list[bytes] = []
        start, search = 0, max(0, self._searched - 1)  # a separator may straddle the last chunk's end
        try:
            while not self.finished and (end := self._buffer.find(b"\n\n", search)) >= 0:
                event = self._event(bytes(self._buffer[start:end]))
                start = search = end + 2
                if event is not None:
                    out.append(event)
        except Refused as exc:
            raise Refused(str(exc), self._ready(out)) from None
        if self.finished:
            start = len(self._buffer)
        del self._buffer[:start]
        self._searched = len(self._buffer)
        if len(self._buffer) > self.limit:
            raise Refused(f"sent an event larger than {self.limit} bytes", self._ready(out))
        return self._ready(out)

    def _ready(self, out: list[bytes]) -> list[bytes]:
        """What may be sent now: nothing before the first token, then everything held and ``out``."""
        if not self.committed:
            return []
        out, self._held = self._held + out, []
        return out

    def end(self) -> None:
        """The answer ended: ``Refused`` unless it ended with ``data: [DONE]`` (inside an event, before
        a first token, or cut off after it: a stream that just stops is no whole answer; issue #31)."""
        if self.finished:
            return
        if self._buffer.strip():
            raise Refused("its answer ended inside an event")
        if not self.committed:
            raise Refused("its answer ended before a first token")
        raise Refused("its answer ended before data: [DONE]")  # cut off: never passed on as a whole answer

    def _event(self, raw: bytes) -> bytes | None:
        """One event as we send it (None: a comment, dropped); it may commit the answer."""
        if b"\n" in raw or b"\r" in raw:
            raise Refused("sent an event of several lines")
        if raw.startswith(b":"):
            return None
        if not raw.startswith(b"data: "):
            raise Refused("sent an event that is not 'data: '")
        payload = raw[6:]
        if payload == b"[DONE]":
            self._commit()
            self.finished = True
            return b"data: [DONE]\n\n"
        document = _object(payload, "an event")
        choices = document.get("choices")
        if "error" in document:
            if not self.committed:  # the peer could not answer after all (its notes went out first): the next peer may
                said = error_message(payload)
                raise Refused("sent an error before a first token" + (f": {said}" if said else ""))
            document = _with_x_zoo(_cut_error(document), self.x_zoo)  # the error that ends the answer says who gave it too
        elif not isinstance(choices, list):
            raise Refused("sent an event with no 'choices' list")
        else:
            chosen = [c for c in choices if isinstance(c, dict)]
            if any(_commits(c) for c in chosen):
                self._commit()
            if any(c.get("finish_reason") for c in chosen):
                document = _with_x_zoo(document, self.x_zoo)  # the last chunk says who answered
        event = b"data: " + _dump(document) + b"\n\n"
        if not self.committed:
            self._held_bytes += len(event)
            if self._held_bytes > self.limit:  # what waits for the first token is bounded as one event is
                raise Refused(f"sent more than {self.limit} bytes before a first token")
            self._held.append(event)
            return None
        return event

    def _commit(self) -> None:
        self.committed = True


def _commits(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    return bool(choice.get("finish_reason") or choice.get("text") or (isinstance(delta, dict) and delta.get("content")))


def _object(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = loads(data)
    except ValueError as exc:
        raise Refused(f"{what}: {exc}") from None
    if not isinstance(document, dict):
        raise Refused(f"{what}: not a JSON object")
    return document


#: What only this host may say of an answer: who answered it (a peer, a remote tenant's server),
#: which of its routes chose, its sessions. A peer's word on them is dropped, not merged (a peer
#: forged ``route``; issue #31).
OURS = frozenset({"host", "route", "session", "remote"})


def _with_x_zoo(document: dict[str, Any], x_zoo: dict[str, Any]) -> dict[str, Any]:
    own = document.get("x_zoo")
    theirs = {k: v for k, v in own.items() if k not in OURS} if isinstance(own, dict) else {}
    return {**document, "x_zoo": {**theirs, **x_zoo}}


def _dump(document: dict[str, Any]) -> bytes:
    """One line of JSON (a lone surrogate the peer escaped stays escaped: ASCII out)."""
    return json.dumps(document, separators=(",", ":")).encode()
