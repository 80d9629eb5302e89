"""The documents that cross processes and hosts, typed once (issues #32, #36).

``/health`` (``Health``), the ``/v1/models`` list and its cards (``ModelList``, ``Card``, ``CardZoo``),
``resident/state.json`` (``ResidentState``) and ``x_zoo`` on answers (``AnswerZoo``). Their
producers build these models and write ``dump(...)`` (exactly the fields they set, so the JSON
on the wire keeps its keys); their readers (peers, ``fleet status``, ``resident status``,
``status``, ``chat``) call ``parse``: the one bounded JSON reader, then the model.

A reader is tolerant of what a newer resident adds (unknown fields are ignored) and of what
an older one leaves out (every field has a default), but not of a field of the wrong type: that
is ``Malformed``, one line naming the field as a JSON pointer (``/tenants/chat/running: expected
an integer, got a string``), never a class name. Types are strict: ``"5"`` is not a count.
``salvage`` is for a human's view of a document (``resident status``): each field of the wrong
type is left out, so its default shows, and named.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from zoo_agent.jsonbound import loads

__all__ = [
    "AnswerZoo", "Card", "CardZoo", "ComposedAdapter", "Health", "HealthMemory", "HealthTenant", "Malformed", "ModelList", "PeerReport",
    "ResidentState", "RouteReport", "SessionReport", "StateTenant", "dump", "parse", "salvage", "validate",
]  # fmt: skip

#: A count a document may carry: never negative (a peer claiming -5 waiting must not look idlest), and exact in a double.
Count = Annotated[int, Field(ge=0, le=2**53)]
#: A word or label (a state, an id, a model@version, a digest, a rule's name) and a sentence (a STATUS= line, an
#: error). Not bounded here: a reader bounds the whole document's bytes, and a producer must never fail on its own words.
Word = str
Text = str


class _Document(BaseModel):
    """Strict types, unknown fields ignored (a newer peer), frozen."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


D = TypeVar("D", bound=_Document)


class Malformed(ValueError):
    """A document with a field of the wrong type; ``str()`` is one line naming the field."""


# -- /health -----------------------------------------------------------------------------------
class HealthMemory(_Document):
    """A tenant's ``memory`` in ``/health`` (issue #34): its estimate, what was measured of its model
    (the budget counts the larger), and its worker's own readings (RAM, its runtime included; device);
    null where not read."""

    estimate: Count = 0
    measured: Count | None = None
    ram: Count | None = None
    device: Count | None = None


class HealthTenant(_Document):
    """One tenant in ``/health``: its phase, what its worker serves, how busy it is."""

    state: Word | None = None  # paged_out, fetching, loading, serving, failed, ...
    pinned: bool = False
    model: Word | None = None
    version: Word | None = None
    running: Count = 0
    waiting: Count = 0
    inflight: Count = 0
    idle_seconds: float | None = None
    footprint: Count = 0
    fetch_pct: Count | None = None  # only while fetching
    error: Text | None = None  # only when it is refused or failed
    memory: HealthMemory | None = None  # issue #34


class PeerReport(_Document):
    """``/health``'s ``peers``: one peer host, its worst state over its tenants."""

    state: Word = "unknown"
    reason: Text | None = None
    busy: Count = 0
    tenants: dict[str, Word] = Field(default_factory=dict)


class Health(_Document):
    """The router's ``/health`` (200 when ``state`` is ready, 503 otherwise)."""

    state: Word | None = None  # ready, starting, stopping
    status: Text = ""
    budget: Count | None = None
    tenants: dict[str, HealthTenant] = Field(default_factory=dict)
    peers: dict[str, PeerReport] | None = None  # only with peers


# -- /v1/models ----------------------------------------------------------------------------------
def _object_or_none(value: Any) -> Any:
    """``x_zoo`` that is not an object is some other server's field of that name: it vouches for nothing."""
    return value if isinstance(value, dict | CardZoo) else None


class CardZoo(_Document):
    """Our extension of a model card: what the card is, its state, and what it can do (issue #36)."""

    kind: Word | None = None  # tenant, adapter, route (a word, not a closed set: a newer resident may list other kinds)
    state: Word | None = None  # the tenant's phase (tenants and their adapters)
    model: Word | None = None  # model@version the tenant serves (what peers compare)
    digest: Word | None = None  # the tenant's digest over its pinned model and adapters (peers.tenant_digest); null mid-swap
    version_digest: Word | None = None  # the whole-version digest apply recorded in the version's manifest.json (issue #35)
    backend: Word | None = None
    task: Word | None = None  # generate (embed: issue #36's embedding tenants)
    max_context: Count | None = None  # tokens one sequence may hold; null: not known (no config.json, nothing declared)
    adapters: list[Word] | None = None  # the model names of the tenant's adapters, <tenant>:auto included where declared
    tenants: list[Word] | None = None  # a route's: every tenant it may send a request to, in order
    description: Text | None = None


class Card(_Document):
    """One entry of ``/v1/models``, as OpenAI (and vLLM, for adapters: ``parent``) write it."""

    id: Word
    object: Word = "model"
    created: Count = 0
    owned_by: Word = ""
    root: Word | None = None
    parent: Word | None = None
    x_zoo: Annotated[CardZoo | None, BeforeValidator(_object_or_none)] = None


class ModelList(_Document):
    object: Word = "list"
    data: list[Card] = Field(default_factory=list)

    def by_id(self) -> dict[str, Card]:
        """The cards by id; of two with one id, the first."""
        out: dict[str, Card] = {}
        for card in self.data:
            out.setdefault(card.id, card)
        return out


# -- resident/state.json -------------------------------------------------------------------------
class StateTenant(_Document):
    state: Word | None = None
    model: Word | None = None
    version: Word | None = None
    pid: Count | None = None
    pinned: bool = False
    footprint: Count = 0
    running: Count = 0
    waiting: Count = 0
    last_used: Word | None = None
    error: Text = ""


class ResidentState(_Document):
    """What the supervisor leaves in ``resident/state.json`` (``reports.py``), for ``resident reload`` and ``status``."""

    pid: Count | None = None
    attempts: Count = 0
    reloads: Count = 0
    last_error: Text = ""
    state: Word | None = None  # reloading, ready, starting
    version: Word | None = None
    swapped: list[Word] = Field(default_factory=list)
    listen: Word | None = None
    budget: Count | None = None
    status: Text = ""
    updated: Word | None = None
    tenants: dict[str, StateTenant] = Field(default_factory=dict)


# -- x_zoo on answers ------------------------------------------------------------------------------
class ComposedAdapter(_Document):
    """One adapter of a composition (``<tenant>:auto`` choosing several, or a set the caller named, issue #36)."""

    id: Word
    version: Word
    similarity: float | None = None
    weight: float | None = None
    scale: float | None = None  # an explicit set's: the scale the caller gave


class SessionReport(_Document):
    """How a session's turn was continued."""

    id: Word
    cache: Word = "none"  # restored, re-prefilled, none
    cached_tokens: Count = 0
    dropped_turns: Count = 0
    route: Word | None = None  # a route's session
    summary: Word | None = None  # new, reused, marker, none


class RouteReport(_Document):
    """Which tenant a route's request went to, by which rule, and whom it stood in for."""

    route: Word
    tenant: Word
    rule: Word
    similarity: float | None = None
    similarity_unavailable: Text | None = None
    fallback_from: Word | None = None
    reason: Text | None = None


class AnswerZoo(_Document):
    """``x_zoo`` on an answer (its last chunk when streamed): the worker's part (adapter, session),
    the router's (route), the delegating host's (host)."""

    adapter: Word | None = None
    similarity: float | None = None
    adapters: list[ComposedAdapter] | None = None
    combine: Word | None = None
    session: SessionReport | None = None
    route: RouteReport | None = None
    host: Word | None = None
    remote: Word | None = None  # a remote tenant's server that answered (its host and port, issue #36)


# -- writing and reading ---------------------------------------------------------------------------
def dump(document: BaseModel) -> dict[str, Any]:
    """The document as JSON values: exactly the fields its producer set (an optional field left unset is absent, not null)."""
    return document.model_dump(mode="json", exclude_unset=True)


def validate(model: type[D], data: Any, what: str = "") -> D:
    """``data`` (already JSON values) as ``model``; ``Malformed`` naming the first wrong field, prefixed with ``what``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Malformed((f"{what}: " if what else "") + problem(exc.errors()[0])) from None


def parse(model: type[D], raw: bytes | bytearray | str, *, limit: int, what: str = "") -> D:
    """Bytes from another process or host as ``model``: the bounded reader (``JSONRefused``), then ``validate``."""
    return validate(model, loads(raw, limit=limit), what)


def salvage(model: type[D], data: Any) -> tuple[D, list[str]]:
    """``data`` as ``model`` with every field of the wrong type left out (its default stands), and
    one line per field left out. For a person's view of a document that is partly wrong;
    ``Malformed`` when even that leaves nothing (the document is not an object)."""
    if not isinstance(data, dict):
        raise Malformed(f"expected an object, got {_json_type(data)}")
    data = copy.deepcopy(data)
    dropped: list[str] = []
    for _ in range(8):  # each pass removes every field pydantic named; a nested default may surface another
        try:
            return model.model_validate(data), dropped
        except ValidationError as exc:
            errors = exc.errors()
        for error in errors:
            loc = _field_loc(error)
            if not loc or not _remove(data, loc):
                raise Malformed(problem(error)) from None
            dropped.append(problem(error))
    raise Malformed(dropped[-1] if dropped else "not readable")


def problem(error: Any) -> str:
    """One pydantic error as one line: the field as a JSON pointer, what it should be, what it is."""
    where = pointer(_field_loc(error))
    kind, given = error["type"], error.get("input")
    expected = _EXPECTED.get(kind)
    bound = error.get("ctx") or {}
    if kind == "missing":
        said = "required"
    elif kind in ("greater_than_equal", "less_than_equal") and isinstance(given, int | float):
        said = f"expected {'at least' if kind == 'greater_than_equal' else 'at most'} {bound.get('ge', bound.get('le'))}, got {given:.6g}"
    elif expected is not None:
        said = f"expected {expected}, got {_json_type(given)}"
    else:
        said = _printable(str(error["msg"]), 200)
    return f"{where}: {said}" if where else said


def pointer(loc: Sequence[Any]) -> str:
    """A location as a JSON pointer (RFC 6901), each key printable and short: a peer's keys are its words, not ours."""
    return "".join("/" + _printable(str(part), 64).replace("~", "~0").replace("/", "~1") for part in loc)


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer", "string_type": "a string",
    "bool_type": "true or false", "float_type": "a number", "finite_number": "a finite number", "dict_type": "an object",
    "model_type": "an object", "model_attributes_type": "an object", "list_type": "a list",
}  # fmt: skip


def _field_loc(error: Any) -> tuple[Any, ...]:
    """The error's location: keys and indexes only (no model here has a union that pydantic would name in it)."""
    return tuple(error["loc"])


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int) and abs(value) > 2**53:
        return "a number too large for a double"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else "something else"


def _printable(text: str, most: int) -> str:
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else "?" for c in text[:most])
    return shown + ("…" if len(text) > most else "")


def _remove(data: Any, loc: tuple[Any, ...]) -> bool:
    """Delete ``data[loc[0]]...[loc[-1]]``; False when there is no such field (a required one missing)."""
    *parents, last = loc
    for part in parents:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return False
    if isinstance(data, dict) and last in data:
        del data[last]
        return True
    return False
