"""Named checkpoints over HTTP (issue #36), answered by the router from the zoo's files.

Checkpoints are files beside the sessions (``sessions/checkpoints.py``), so no worker is loaded
to make or restore one: a paged-out tenant's session is checkpointed as it lies on disk, as a
route's session is read (``routes.py``). Addressed as sessions are (``?model=<tenant or route>``,
the first tenant by default; behind the same gate and keys)::

    GET    /v1/checkpoints                      every checkpoint (of the tenant's or route's sessions)
    GET    /v1/sessions/<id>/checkpoints        the session's, oldest first
    POST   /v1/sessions/<id>/checkpoints        freeze it; body (optional): {"name": "<name>"}
    GET    /v1/checkpoints/<name>               one
    DELETE /v1/checkpoints/<name>               remove it
    POST   /v1/checkpoints/<name>/restore       a new session from it; body (optional): {"session": "<new id>"}

Every id and name in a path is one component checked like a session id before it names a file;
a body goes through the one bounded JSON reader, then a strict model. Runs on a thread of the
router's (file work and a lock wait of at most 10 s: never on its loop).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zoo_agent.errors import SessionDamaged, SessionError, StoreError
from zoo_agent.jsonbound import JSONRefused, loads
from zoo_agent.resident.sessions.checkpoints import CheckpointError, CheckpointRecord, Checkpoints
from zoo_agent.resident.sessions.transcript import valid_id
from zoo_agent.resident.wire.http import error

if TYPE_CHECKING:
    from zoo_agent.index.model import Index
    from zoo_agent.store.zoo import Zoo

__all__ = ["CheckpointApi", "is_checkpoint_path"]

_B = TypeVar("_B", bound=BaseModel)

CHECKPOINTS = "/v1/checkpoints"
SESSIONS = "/v1/sessions/"


def is_checkpoint_path(path: str) -> bool:
    """Whether a request is one of these (the router asks before anything else parses it)."""
    at_session = path.startswith(SESSIONS) and path.endswith("/checkpoints") and len(path) > len(SESSIONS) + len("/checkpoints")
    return path == CHECKPOINTS or path.startswith(CHECKPOINTS + "/") or at_session  # not /v1/sessions/checkpoints: a session of that id


class _Create(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str | None = Field(default=None, max_length=200)


class _Restore(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    session: str | None = Field(default=None, max_length=200)


@dataclass(frozen=True)
class _Scope:
    """Whose checkpoints: a tenant's or a route's directory, and how many each session keeps."""

    name: str
    base: Path
    route: bool
    keep: int


@dataclass
class CheckpointApi:
    """The answers; ``index``, ``served`` and ``routes`` are the router's current view (replaced whole on a reload)."""

    zoo: Zoo
    index: Callable[[], Index | None]
    served: Callable[[], Sequence[str]]
    routes: Callable[[], Collection[str]]

    def answer(self, method: str, path: str, query: bytes, body: bytes, *, content_type: str | None, from_peer: bool) -> tuple[int, bytes]:
        """``(status, body)`` for a checkpoint request; every problem a 4xx naming its field, or one line of the store's 500."""
        if from_peer:
            return error(403, "checkpoints: a peer may only ask for generations", "model", "peer_not_accepted")
        try:
            return self._answer(method, path, query, body, content_type)
        except CheckpointError as exc:
            return error(exc.status, str(exc), "checkpoint", exc.code)
        except SessionDamaged as exc:
            return error(422, f"{exc}; delete the checkpoint or the file", "checkpoint", "checkpoint_damaged")
        except SessionError as exc:
            return error(400, str(exc), "session")
        except StoreError as exc:
            return error(500, str(exc))

    def _answer(self, method: str, path: str, query: bytes, body: bytes, content_type: str | None) -> tuple[int, bytes]:
        scope = self._scope(query)
        if isinstance(scope, tuple):
            return scope
        store = Checkpoints(scope.base, route=scope.route)
        if path.startswith(SESSIONS):  # /v1/sessions/<id>/checkpoints
            sid = path.removeprefix(SESSIONS).removesuffix("/checkpoints")
            if method == "GET":
                records, damaged = store.listed(_session(sid))
                return _ok({"object": "list", "data": [_card(r) for r in records], "damaged": damaged})
            if method != "POST":
                return _method(method, "GET or POST")
            asked = _body(body, content_type, _Create)
            if not isinstance(asked, _Create):
                return asked
            record, dropped = store.create(_session(sid), asked.name, keep=scope.keep)
            return _ok({**_card(record), "dropped": dropped})
        parts = path.removeprefix(CHECKPOINTS).split("/")[1:]  # [] | [name] | [name, "restore"]
        if not parts:
            if method != "GET":
                return _method(method, "GET")
            records, damaged = store.listed()
            return _ok({"object": "list", "data": [_card(r) for r in records], "damaged": damaged})
        if len(parts) == 2 and parts[1] == "restore":
            if method != "POST":
                return _method(method, "POST")
            asked_restore = _body(body, content_type, _Restore)
            if not isinstance(asked_restore, _Restore):
                return asked_restore
            sid, record = store.restore(parts[0], _session(asked_restore.session) if asked_restore.session is not None else None)
            return _ok({"id": sid, "object": "session", "restored_from": _card(record)})
        if len(parts) != 1:
            return error(404, "Not Found")
        name = parts[0]
        if method == "DELETE":
            return _ok({**_card(store.delete(name)), "object": "session.checkpoint.deleted", "deleted": True})
        if method != "GET":
            return _method(method, "GET or DELETE")
        records, _ = store.listed()
        found = [r for r in records if r.name == name]
        if not found:
            return error(404, f"checkpoint '{name[:64]}' does not exist", "checkpoint", "checkpoint_not_found")
        return _ok(_card(found[0]))

    def _scope(self, query: bytes) -> _Scope | tuple[int, bytes]:
        """``?model=``: a tenant this host serves or one of its routes (a route keeps as its default tenant does)."""
        try:
            fields = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True, max_num_fields=100))
        except ValueError:
            return error(400, "query: more than 100 fields", "query")
        served, routes, idx = self.served(), self.routes(), self.index()
        name = (fields.get("model") or (served[0] if served else "")).split(":", 1)[0]
        if idx is not None and name in routes and name in idx.routes:
            return _Scope(name, self.zoo.route_dir(name), True, idx.tenants[idx.routes[name].default].sessions.checkpoints.keep)
        if idx is None or name not in served or name not in idx.tenants:
            return error(404, f"model: {name[:100]!r} is not served by this host (tenants: {', '.join(served)})", "model", "model_not_found")
        return _Scope(name, self.zoo.tenant_dir(name), False, idx.tenants[name].sessions.checkpoints.keep)


def _session(sid: str) -> str:
    return valid_id(sid)


def _card(record: CheckpointRecord) -> dict[str, Any]:
    return {"object": "session.checkpoint", **record.model_dump(mode="json")}


def _ok(document: dict[str, Any]) -> tuple[int, bytes]:
    return 200, json.dumps(document).encode()


def _method(method: str, allowed: str) -> tuple[int, bytes]:
    return error(405, f"method: this takes {allowed}, not {method[:20]!r}", "method", "method_not_allowed")


def _body(body: bytes, content_type: str | None, model: type[_B]) -> _B | tuple[int, bytes]:
    """An optional JSON object body, read by the one bounded reader and a strict model."""
    if not body.strip():
        return model()
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        given = "none" if content_type is None else repr(content_type[:60])
        return error(415, f"content-type: a body is read as JSON only with Content-Type: application/json (given: {given})", "content-type",
                     "unsupported_media_type")  # fmt: skip
    try:
        document = loads(body)
    except JSONRefused as exc:
        return error(400, f"body: {exc}", "body")
    if not isinstance(document, dict):
        return error(400, "body: must be a JSON object", "body")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return error(400, f"{where}: {first['msg']}", where)
