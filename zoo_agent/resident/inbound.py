"""What a client's request asks for, read once: a pure function of its path, query and body (issue #31).

The router's first look at a request, before anything is forwarded. Each request is parsed
here once, and every way it can be wrong is a 4xx naming its field, never an exception:
the body goes through the one bounded JSON reader (``jsonbound``: depth 64, so ``[[[…]]]``
100,000 levels deep is a 400, not a ``RecursionError``), and a session id is checked before
it becomes part of a URL (``%00`` or ``%0d%0a`` in a path made httpx refuse the URL: a 500).
A body must say it is JSON (``Content-Type: application/json``), as the workers require
(FastAPI's strict content type, against cross-site requests a browser sends without one):
the router parsed any body, routed it, even loaded a tenant for it, and the worker then
answered a 400 that named nothing. The work is linear in the body (at most the Gate's 1 MiB)
and touches nothing but its arguments, so the router may run it on another thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from zoo_agent.jsonbound import JSONRefused, loads
from zoo_agent.resident.sessions.transcript import SessionError, valid_id
from zoo_agent.resident.wire.embeddings import PATH as EMBED
from zoo_agent.resident.wire.embeddings import parse_embeddings
from zoo_agent.resident.wire.headers import PRIORITY
from zoo_agent.resident.wire.http import ApiError

if TYPE_CHECKING:
    from zoo_agent.index.model import Index

__all__ = ["EMBED", "GENERATE", "LORA", "SESSIONS", "Host", "Parsed", "Rejected", "alias_tenants", "embedding_tenants", "parse_request"]

GENERATE = ("/v1/chat/completions", "/v1/completions")
LORA = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
SESSIONS = "/v1/sessions/"


@dataclass(frozen=True)
class Host:
    """What the host serves, as a request's parse needs it (a snapshot: the router's own dicts, never mutated in place)."""

    served: Sequence[str]  # the tenants, in the index's order
    routes: Collection[str]
    accepts: Collection[str]  # tenants this host answers for peers
    has_peers: Callable[[str], bool]  # whether the index names peers for a tenant
    lora_tenant: Mapping[str, str]  # adapter id -> the tenant declaring it
    aliases: Mapping[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # alias -> (its model, the tenants here serving it)
    embedders: Collection[str] = frozenset()  # served tenants of kind "embedding" (issue #36): /v1/embeddings only


@dataclass(frozen=True)
class Parsed:
    """A request this host answers: its tenant (or route), its JSON body, the session id of its path;
    for a generation, what the router decides on (issue #32: read here once, not again where it is used)."""

    tenant: str
    document: dict[str, Any]
    session: str | None = None
    stream: bool = False  # ``"stream": true``
    in_session: bool = False  # the body names a session (its turns live here: never a peer's)
    from_peer: bool = field(default=False, compare=False)  # it came from a peer (``X-Zoo-Peer``): never delegated again
    priority_header: str | None = None  # the ``X-Zoo-Priority`` it sent (at most once)
    priority_field: int | None = None  # the body's integer ``priority`` (a field of another type is the worker's 400 to give)
    body: bytes | None = None  # what to forward instead of the client's bytes (an alias it named, replaced by the tenant)


@dataclass(frozen=True)
class Rejected:
    """Why a request is answered with an error at once: its status and one line naming the field."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None


def parse_request(method: str, path: str, query: bytes, body: bytes, host: Host, *, content_type: str | None,
                  from_peer: bool = False, priority: Sequence[bytes] = ()) -> Parsed | Rejected:  # fmt: skip
    """Which tenant a request is for (and its JSON body), or why it has none.
    A tenant this host does not serve is its peers' (when the index names any); a request
    from a peer is answered only for a tenant this host accepts from peers, and only here.
    ``priority``: the values of every ``X-Zoo-Priority`` header it sent."""
    parsed = _parse(method, path, query, body, host, content_type=content_type, from_peer=from_peer)
    if not isinstance(parsed, Rejected) and (path in GENERATE or path == EMBED):
        parsed = _kind(path, parsed, host)
    if isinstance(parsed, Rejected) or (path not in GENERATE and path != EMBED):
        return parsed
    if len(priority) > 1:  # the router would check one and the worker serve another
        return Rejected(400, f"{PRIORITY}: sent {len(priority)} times; send it once", PRIORITY)
    document = parsed.document
    asked = document.get("priority")
    generate = path in GENERATE  # an embedding is one JSON answer, in no session
    return replace(parsed, stream=generate and document.get("stream") is True, in_session=generate and document.get("session") is not None,
                   from_peer=from_peer,
                   priority_header=priority[0].decode("latin-1") if priority else None,
                   priority_field=asked if isinstance(asked, int) and not isinstance(asked, bool) else None)  # fmt: skip


def _parse(method: str, path: str, query: bytes, body: bytes, host: Host, *, content_type: str | None, from_peer: bool) -> Parsed | Rejected:
    """``parse_request`` up to its tenant and body."""
    served = host.served
    if path in GENERATE or path in LORA or path == EMBED:
        if method != "POST":
            return Rejected(405, f"method: {path} takes POST, not {method[:20]!r}", "method", "method_not_allowed")
        if not _json_type(content_type):
            given = "none" if content_type is None else repr(content_type[:60])
            return Rejected(415, f"content-type: a body is read as JSON only with Content-Type: application/json (given: {given})",
                           "content-type", "unsupported_media_type")  # fmt: skip
        try:
            document = loads(body)
        except JSONRefused as exc:
            return Rejected(400, f"body: {exc}", "body")
        if not isinstance(document, dict):
            return Rejected(400, "body: must be a JSON object", "body")
        key = "lora_name" if path in LORA else "model"
        name = document.get(key)
        if not isinstance(name, str):
            return Rejected(400, f"{key}: required, a string", key)
        tenant = name.split(":", 1)[0]
        if from_peer:
            if key != "model" or tenant not in host.accepts or tenant not in served:
                return Rejected(403, f"{key}: this host answers peers only for {', '.join(sorted(host.accepts)) or 'no tenant'}", key, "peer_not_accepted")
            return Parsed(tenant, document)
        if key == "model" and name in host.routes:
            return Parsed(name, document) if path != EMBED else Rejected(
                400, f"model: {name[:100]!r} is a route, which chooses among tenants that generate; name an embedding tenant", "model")
        if key == "model" and tenant not in served and tenant in host.aliases:
            return _aliased(name, document, *host.aliases[tenant])
        if key == "model" and tenant not in served and host.has_peers(tenant) and path != EMBED:  # embeddings: where served
            return Parsed(tenant, document)
        if key == "lora_name" and tenant not in served:
            tenant = host.lora_tenant.get(name, tenant)
        if tenant not in served:
            names = ", ".join([*served, *host.routes])
            return Rejected(404, f"{key}: {name[:100]!r} is not served by this host (models: {names})", key, "model_not_found")
        return Parsed(tenant, document)
    if path.startswith(SESSIONS):
        if from_peer:
            return Rejected(403, "sessions: a peer may only ask for generations", "model", "peer_not_accepted")
        if method not in ("GET", "DELETE"):
            return Rejected(405, f"method: a session takes GET or DELETE, not {method[:20]!r}", "method", "method_not_allowed")
        try:  # before it goes into a URL or a file name: letters, digits, '_', '-', '.'
            sid = valid_id(path.removeprefix(SESSIONS))
        except SessionError as exc:
            return Rejected(400, str(exc), "session")
        try:  # percent-decoded, as the worker reads it (the whole query is within uvicorn's 16 KiB head)
            fields = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True, max_num_fields=100))
        except ValueError:
            return Rejected(400, "query: more than 100 fields", "query")
        tenant = (fields.get("model") or (served[0] if served else "")).split(":", 1)[0]
        if tenant in host.routes:
            return Parsed(tenant, {}, sid)  # a route's session: read here, from the zoo (issue #21)
        if tenant not in served:
            return Rejected(404, f"model: {tenant[:100]!r} is not served by this host (tenants: {', '.join(served)})", "model", "model_not_found")
        return Parsed(tenant, {}, sid)
    return Rejected(404, "Not Found")


def _kind(path: str, parsed: Parsed, host: Host) -> Parsed | Rejected:
    """A generation for a generating tenant, an embedding for an embedding tenant (issue #36), and an
    embedding request that is one (``wire/embeddings``: refused here, before a tenant loads for it)."""
    name = str(parsed.document.get("model", ""))[:100]
    if path != EMBED:
        if parsed.tenant in host.embedders:
            return Rejected(400, f"model: {name!r} is an embedding tenant; ask POST {EMBED}", "model", "wrong_task")
        return parsed
    if parsed.tenant not in host.embedders:
        listed = ", ".join(t for t in host.served if t in host.embedders) or "none"
        return Rejected(400, f"model: {name!r} generates; {EMBED} takes an embedding tenant (here: {listed})", "model", "wrong_task")
    if ":" in name:
        return Rejected(400, f"model: {name!r}: an embedding tenant has no adapters; name the tenant alone", "model")
    try:
        parse_embeddings(parsed.document)
    except ApiError as exc:
        return Rejected(exc.status, exc.message, exc.param, str(exc.code) if exc.code is not None else None)
    return parsed


def embedding_tenants(idx: Index, served: Sequence[str]) -> frozenset[str]:
    """The served tenants of kind "embedding"."""
    return frozenset(t for t in served if t in idx.tenants and idx.tenants[t].kind == "embedding")


def alias_tenants(idx: Index, served: Sequence[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each alias the index declares for a model that tenants of this host serve: (the model, those tenants).
    An alias is never a tenant, route, model or adapter id (``index/checks.py``), so it shadows nothing."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for mid, entry in idx.models.items():
        tenants = tuple(t for t in served if t in idx.tenants and idx.tenants[t].model == mid)
        if tenants:
            found.update((alias, (mid, tenants)) for alias in entry.aliases)
    return found


def _aliased(name: str, document: dict[str, Any], model: str, tenants: tuple[str, ...]) -> Parsed | Rejected:
    """A request naming an alias (issue #35): its tenant's, with the tenant's name in its body (a
    ``:adapter`` suffix kept), as a route's request is forwarded. The answer names the tenant, as
    OpenAI's names the model an alias stands for (``gpt-4o`` is answered as ``gpt-4o-2024-08-06``)."""
    alias, sep, rest = name.partition(":")
    if len(tenants) != 1:
        return Rejected(400, f"model: {alias[:100]!r} is an alias of model {model}, which tenants {', '.join(tenants)} serve here; "
                        "name one of them", "model", "model_ambiguous")  # fmt: skip
    document = {**document, "model": tenants[0] + sep + rest}
    return Parsed(tenants[0], document, body=json.dumps(document, allow_nan=False).encode())


def _json_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, with any parameters (what FastAPI reads as JSON)."""
    if content_type is None:
        return False
    kind, _, subtype = content_type.split(";", 1)[0].strip().lower().partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))
