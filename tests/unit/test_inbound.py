"""The router's request parser (issue #31): whatever a client sends (random bytes, JSON nested
100,000 levels deep or 100,000 wide, control characters in a session path) is a success or a
4xx naming the field, never an exception (the router answered those with a 500)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoo_agent.index.model import RouteEntry
from zoo_agent.resident.inbound import GENERATE, LORA, SESSIONS, Host, Parsed, Rejected, parse_request

JSON = "application/json"
from zoo_agent.resident.routing import choose, features

HOST = Host(served=["small", "large"], routes=["assistant"], accepts=["small"], has_peers=lambda t: t == "remote",
            lora_tenant={"code": "small"}, aliases={"fast": ("small-m", ("small",)), "best": ("large-m", ("large", "large2"))})  # fmt: skip
ROUTE = RouteEntry.model_validate({
    "rules": [{"tenant": "large", "when": {"code": True}}, {"tenant": "large", "when": {"keywords": ["explain"]}},
              {"tenant": "small", "when": {"max_words": 12, "max_messages": 4}}],
    "default": "large",
})  # fmt: skip


def _check(result: Parsed | Rejected) -> None:
    if isinstance(result, Rejected):
        assert 400 <= result.status < 500, result
        assert "\n" not in result.message and "\r" not in result.message and len(result.message) < 1000, result
        return
    assert isinstance(result.document, dict)
    choose(ROUTE, features(result.document))  # the route's decision takes whatever the parse let through


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (b'{"model": "assistant", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body", "nests deeper than 64 levels"),
        (b"[" * 100_000, "body", "nests deeper than 64 levels"),
        (b'{"model": "small", "x": ' + b'{"a":' * 100_000 + b"}", "body", "nests deeper than 64 levels"),
        (b'{"model": "small", "n": ' + b"1" * 5000 + b"}", "body", "too many digits"),
        (b'{"model": "small", "temperature": NaN}', "body", "NaN is not a JSON number"),
        (b"\xff{}", "body", "not UTF-8"),
        (b"[]", "body", "must be a JSON object"),
        (b'{"model": 5}', "model", "required, a string"),
        (b'{"model": "no\\u0000body\\r\\n"}', "model", "is not served by this host"),
    ],
)
def test_a_body_we_cannot_read_is_a_400_naming_it(body: bytes, param: str, says: str) -> None:
    for path in GENERATE:
        result = parse_request("POST", path, b"", body, HOST, content_type=JSON)
        assert isinstance(result, Rejected) and result.param == param and says in result.message, result
        assert result.status == (404 if says.startswith("is not served") else 400) and "\n" not in result.message


@pytest.mark.parametrize("sid", ["a\x00b", "a\r\nSet-Cookie: x", "a\x7f", "", "../x", "a/b", "x" * 65, ".hidden", "a b", "\u00e9"])
def test_a_session_id_that_is_not_one_is_a_400_before_it_reaches_a_url(sid: str) -> None:
    for query in (b"model=small", b"model=assistant", b""):
        result = parse_request("GET", SESSIONS + sid, query, b"", HOST, content_type=None)
        assert isinstance(result, Rejected) and (result.status, result.param) == (400, "session"), (sid, result)
        assert "\n" not in result.message and "\r" not in result.message


def test_what_is_served_here_by_a_route_or_by_peers() -> None:
    chat = json.dumps({"model": "small:code", "messages": []}).encode()
    assert parse_request("POST", GENERATE[0], b"", chat, HOST, content_type=JSON) == Parsed("small", {"model": "small:code", "messages": []})
    assert parse_request("POST", GENERATE[1], b"", b'{"model": "assistant"}', HOST, content_type="application/json; charset=utf-8") == Parsed("assistant", {"model": "assistant"})
    assert parse_request("POST", GENERATE[1], b"", b'{"model": "remote"}', HOST, content_type="Application/JSON") == Parsed("remote", {"model": "remote"})
    assert parse_request("POST", LORA[0], b"", b'{"lora_name": "code"}', HOST, content_type="application/vnd.api+json") == Parsed("small", {"lora_name": "code"})
    assert parse_request("DELETE", SESSIONS + "s-1.a", b"model=assist%61nt", b"", HOST, content_type=None) == Parsed("assistant", {}, "s-1.a")
    assert parse_request("GET", SESSIONS + "s", b"", b"", HOST, content_type=None) == Parsed("small", {}, "s")  # the first tenant
    assert isinstance(parse_request("POST", GENERATE[1], b"", b'{"model": "large"}', HOST, content_type=JSON, from_peer=True), Rejected)  # not accepted from peers
    assert parse_request("POST", GENERATE[1], b"", b'{"model": "small"}', HOST, content_type=JSON, from_peer=True) == Parsed("small", {"model": "small"})
    assert parse_request("POST", "/v1/rerank", b"", b"{}", HOST, content_type=JSON) == Rejected(404, "Not Found")


_text = st.text(max_size=12) | st.sampled_from(["\ud800", "\x00", "\r\n", "explain", "def f():\n", "{", "small", "assistant", "remote"])
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", 5]), "content": _json})
_request = st.fixed_dictionaries(
    {"model": st.sampled_from(["small", "large", "assistant", "remote", "nobody", "small:auto", "fast", "fast:code", "best"]) | _json},
    optional={"messages": st.lists(_message | _json, max_size=4) | _json, "prompt": _json, "stream": _json, "session": _json},
)


@st.composite
def _deep_or_wide(draw: st.DrawFn) -> bytes:
    """A request whose messages (or a field) nest up to 100,000 levels, or hold up to 100,000 items."""
    depth = draw(st.sampled_from([1, 63, 64, 65, 1000, 100_000]))
    width = draw(st.sampled_from([1, 1000, 100_000]))
    inner = draw(st.sampled_from(["[", '{"a":', '[{"role":"user","content":']))
    close = {"[": "]", '{"a":': "}", '[{"role":"user","content":': "}]"}[inner]
    leaf = draw(st.sampled_from(['"x"', "1", "[]", "{}", "null", '"\\ud800"']))
    nested = inner * depth + leaf + close * depth
    wide = "[" + ",".join([leaf] * width) + "]"
    field = draw(st.sampled_from(["messages", "prompt", "stop", "x"]))
    return json.dumps({"model": draw(st.sampled_from(["small", "assistant", "fast"]))})[:-1].encode() + f', "{field}": {nested}, "w": {wide}}}'.encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(path=st.sampled_from([*GENERATE, *LORA]), body=st.binary(max_size=64) | _request.map(lambda d: json.dumps(d).encode()) | _deep_or_wide(),
       cut=st.integers(0, 8), peer=st.booleans())  # fmt: skip
def test_random_bodies_are_parsed_or_refused_with_a_4xx(path: str, body: bytes, cut: int, peer: bool) -> None:
    for data in (body, body[: len(body) - cut]):  # and cut short
        _check(parse_request("POST", path, b"", data, HOST, content_type=JSON, from_peer=peer))


@settings(max_examples=300, deadline=None)
@given(sid=st.text(max_size=70), query=st.binary(max_size=40), peer=st.booleans())
def test_random_session_paths_and_queries_are_parsed_or_refused_with_a_4xx(sid: str, query: bytes, peer: bool) -> None:
    result = parse_request("GET", SESSIONS + sid, query, b"", HOST, content_type=None, from_peer=peer)
    _check(result)
    if isinstance(result, Parsed):
        assert result.session == sid and sid.isascii() and sid.isprintable() and "/" not in sid


def test_a_document_the_parse_lets_through_never_breaks_the_decision() -> None:
    odd: list[Any] = [{"messages": "x"}, {"messages": [None, 5, {"role": "user"}]}, {"messages": [{"role": "user", "content": ["a"]}]},
                      {"prompt": ["a", "b"]}, {"prompt": None}, {"messages": []}]  # fmt: skip
    for document in odd:
        _check(parse_request("POST", GENERATE[0], b"", json.dumps({"model": "assistant", **document}).encode(), HOST, content_type=JSON))


@pytest.mark.parametrize(
    ("method", "path", "content_type", "status", "param"),
    [
        ("PUT", GENERATE[0], JSON, 405, "method"),  # a route forwarded any method as POST
        ("GET", GENERATE[1], None, 405, "method"),
        ("POST", SESSIONS + "s", None, 405, "method"),
        ("POST", GENERATE[0], None, 415, "content-type"),  # what a browser sends cross-site without a preflight
        ("POST", GENERATE[0], "text/plain", 415, "content-type"),
        ("POST", LORA[1], "application/x-www-form-urlencoded", 415, "content-type"),
        ("POST", GENERATE[0], "application/jsonx", 415, "content-type"),
    ],
)
def test_a_request_a_worker_would_not_read_is_refused_here_naming_why(method: str, path: str, content_type: str | None, status: int,
                                                                       param: str) -> None:  # fmt: skip
    """Before anything is routed, loaded or forwarded (the worker answered these with a 400 naming nothing)."""
    result = parse_request(method, path, b"model=small", b'{"model": "assistant"}', HOST, content_type=content_type)
    assert isinstance(result, Rejected) and (result.status, result.param) == (status, param), result


def test_a_generation_is_read_once_into_what_the_router_decides_on() -> None:
    """Stream, session, priority and whether a peer sent it, in the one value (issue #32)."""
    body = b'{"model": "small", "stream": true, "session": "s1", "priority": -1}'
    parsed = parse_request("POST", GENERATE[0], b"", body, HOST, content_type=JSON, priority=[b"batch"])
    assert isinstance(parsed, Parsed)
    assert (parsed.stream, parsed.in_session, parsed.from_peer, parsed.priority_header, parsed.priority_field) == (True, True, False, "batch", -1)
    wrong_type = parse_request("POST", GENERATE[0], b"", b'{"model": "small", "priority": true, "stream": 1}', HOST, content_type=JSON)
    assert isinstance(wrong_type, Parsed) and wrong_type.priority_field is None and not wrong_type.stream  # the worker's 400 to give
    twice = parse_request("POST", GENERATE[0], b"", body, HOST, content_type=JSON, priority=[b"batch", b"system"])
    assert twice == Rejected(400, "X-Zoo-Priority: sent 2 times; send it once", "X-Zoo-Priority")


def test_an_alias_names_the_one_tenant_here_that_serves_its_model_and_the_worker_is_told_the_tenant() -> None:
    """Issue #35: a request's `model` may be an alias the index declares for a model a tenant of
    this host serves; the worker gets the tenant's name in its place (an adapter suffix kept)."""
    from zoo_agent.index.model import Index
    from zoo_agent.resident.inbound import alias_tenants

    idx = Index.model_validate({
        "models": {m: {"version": "1", "source": {"type": "file", "path": m}, "files": [], "license": "MIT", **extra}
                   for m, extra in (("small-m", {"aliases": ["fast", "cheap"]}), ("large-m", {"aliases": ["best"]}),
                                    ("other-m", {"aliases": ["elsewhere"]}))},
        "tenants": {"small": {"model": "small-m"}, "large": {"model": "large-m"}, "large2": {"model": "large-m"},
                    "away": {"model": "other-m"}},
    })  # fmt: skip
    assert alias_tenants(idx, ["small", "large"]) == {"fast": ("small-m", ("small",)), "cheap": ("small-m", ("small",)),
                                                      "best": ("large-m", ("large",))}
    host = Host(served=["small", "large", "large2"], routes=["assistant"], accepts=["small"], has_peers=lambda t: False,
                lora_tenant={}, aliases=alias_tenants(idx, ["small", "large", "large2"]))  # fmt: skip
    for name, tenant, model in (("fast", "small", "small"), ("cheap:code", "small", "small:code")):
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        parsed = parse_request("POST", GENERATE[0], b"", body, host, content_type=JSON)
        assert isinstance(parsed, Parsed) and parsed.tenant == tenant and parsed.stream, parsed
        assert parsed.body is not None and json.loads(parsed.body) == {**json.loads(body), "model": model} == parsed.document
    plain = parse_request("POST", GENERATE[0], b"", b'{"model": "small"}', host, content_type=JSON)
    assert isinstance(plain, Parsed) and plain.body is None  # a tenant's own name: the client's bytes go on as they are
    two = parse_request("POST", GENERATE[0], b"", b'{"model": "best"}', host, content_type=JSON)
    assert two == Rejected(400, "model: 'best' is an alias of model large-m, which tenants large, large2 serve here; name one of them",
                           "model", "model_ambiguous")  # fmt: skip
    gone = parse_request("POST", GENERATE[0], b"", b'{"model": "elsewhere"}', host, content_type=JSON)
    assert isinstance(gone, Rejected) and gone.status == 404 and gone.code == "model_not_found"
    peer = parse_request("POST", GENERATE[0], b"", b'{"model": "fast"}', host, content_type=JSON, from_peer=True)
    assert isinstance(peer, Rejected) and peer.status == 403  # a peer names the tenant it was asked for, never an alias
