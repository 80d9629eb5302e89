"""``POST /v1/embeddings`` read and written (issue #36): ``wire/embeddings`` (OpenAI's request, each
problem one line naming the field; the answer, float or base64) and the router's first look at it
(``inbound.parse_request``: an embedding tenant's, checked before anything loads; a generation is never one)."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoo_agent.resident.inbound import EMBED, GENERATE, Host, Parsed, Rejected, parse_request
from zoo_agent.resident.wire.embeddings import MAX_INPUTS, EmbeddingRequest, answer, parse_embeddings
from zoo_agent.resident.wire.http import ApiError

JSON = "application/json"
HOST = Host(served=["chat", "emb", "emb2"], routes=["assistant"], accepts=["emb"], has_peers=lambda t: t in ("remote", "far-emb"),
            lora_tenant={}, aliases={"minilm": ("e-model", ("emb",))}, embedders=frozenset({"emb", "emb2"}))  # fmt: skip


def _parse(document: Any, path: str = EMBED, **kw: Any) -> Parsed | Rejected:
    return parse_request("POST", path, b"", json.dumps(document).encode(), HOST, content_type=JSON, **kw)


def test_a_request_is_its_model_texts_format_and_dimensions() -> None:
    assert parse_embeddings({"model": "emb", "input": "a cat"}) == EmbeddingRequest("emb", ("a cat",))
    assert parse_embeddings({"model": "emb", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 64, "user": "u", "extra": 1}) == \
        EmbeddingRequest("emb", ("a", "b"), True, 64)  # fmt: skip
    assert parse_embeddings({"model": "emb", "input": ["x"] * MAX_INPUTS}).inputs == ("x",) * MAX_INPUTS


@pytest.mark.parametrize(("document", "status", "param", "message"), [
    ({"input": "a"}, 400, "model", "model: required, a string"),
    ({"model": "emb"}, 400, "input", "input: required, a string or a list of strings"),
    ({"model": "emb", "input": None}, 400, "input", "input: required"),
    ({"model": "emb", "input": 5}, 400, "input", "input: a string or a list of strings, not a number"),
    ({"model": "emb", "input": []}, 400, "input", "input: an empty list; send at least one text"),
    ({"model": "emb", "input": ""}, 400, "input", "input: an empty string; every text needs at least one character"),
    ({"model": "emb", "input": ["a", "", "b"]}, 400, "input", "input[1]: an empty string"),
    ({"model": "emb", "input": ["a", None]}, 400, "input", "input[1]: must be a string, not null"),
    ({"model": "emb", "input": ["a", ["b"]]}, 400, "input", "input[1]: must be a string, not a list"),
    ({"model": "emb", "input": [1, 2, 3]}, 400, "input", "input: token ids are not accepted here; send text"),
    ({"model": "emb", "input": [[1, 2], [3]]}, 400, "input", "input: token ids are not accepted here"),
    ({"model": "emb", "input": [True]}, 400, "input", "input[0]: must be a string, not a boolean"),
    ({"model": "emb", "input": ["x"] * (MAX_INPUTS + 1)}, 413, "input", f"input: {MAX_INPUTS + 1} texts; at most {MAX_INPUTS} in one request"),
    ({"model": "emb", "input": ["ok", "a\ud800"]}, 400, "input", "input[1]: not Unicode text (a lone surrogate at character 1)"),
    ({"model": "emb", "input": "a", "encoding_format": "int8"}, 400, "encoding_format", "encoding_format: 'int8' is not 'float' or 'base64'"),
    ({"model": "emb", "input": "a", "dimensions": 0}, 400, "dimensions", "dimensions: a positive integer, not 0"),
    ({"model": "emb", "input": "a", "dimensions": "64"}, 400, "dimensions", "dimensions: a positive integer, not 64"),
])  # fmt: skip
def test_each_problem_is_one_line_naming_the_field(document: dict[str, Any], status: int, param: str, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_embeddings(document)
    assert (caught.value.status, caught.value.param) == (status, param)
    assert caught.value.message.startswith(message) and "\n" not in caught.value.message


def test_the_answer_is_openais_with_the_same_float32_values_as_floats_or_base64() -> None:
    rows = [struct.pack("<3f", 0.1, -2.5, 3.0), struct.pack("<3f", 1e-8, 0.0, -0.0)]
    plain = json.loads(answer("emb", rows, 7, as_base64=False))
    assert plain == {"object": "list", "model": "emb", "usage": {"prompt_tokens": 7, "total_tokens": 7},
                     "data": [{"object": "embedding", "index": 0, "embedding": list(struct.unpack("<3f", rows[0]))},
                              {"object": "embedding", "index": 1, "embedding": [struct.unpack("<f", rows[1][:4])[0], 0.0, -0.0]}]}  # fmt: skip
    packed = json.loads(answer("emb", rows, 7, as_base64=True))
    assert [base64.b64decode(d["embedding"]) for d in packed["data"]] == rows  # what OpenAI's client decodes with numpy (float32)


def test_the_router_takes_an_embedding_tenants_request_with_its_priority_and_never_as_a_stream() -> None:
    got = _parse({"model": "emb", "input": ["a"], "stream": True, "session": "s", "priority": 1})
    assert isinstance(got, Parsed)
    assert (got.tenant, got.stream, got.in_session, got.priority_field) == ("emb", False, False, 1)
    aliased = _parse({"model": "minilm", "input": "a"})  # an alias of the embedding model: its one tenant here
    assert isinstance(aliased, Parsed) and aliased.tenant == "emb" and aliased.body is not None and json.loads(aliased.body)["model"] == "emb"


@pytest.mark.parametrize(("document", "path", "status", "message"), [
    ({"model": "chat", "input": "a"}, EMBED, 400, "model: 'chat' generates; /v1/embeddings takes an embedding tenant (here: emb, emb2)"),
    ({"model": "assistant", "input": "a"}, EMBED, 400, "model: 'assistant' is a route, which chooses among tenants that generate"),
    ({"model": "emb:code", "input": "a"}, EMBED, 400, "model: 'emb:code': an embedding tenant has no adapters"),
    ({"model": "far-emb", "input": "a"}, EMBED, 404, "model: 'far-emb' is not served by this host"),  # embeddings are never delegated
    ({"model": "emb", "input": ""}, EMBED, 400, "input: an empty string"),  # refused here: nothing loads for it
    ({"model": "emb", "input": ["x"] * (MAX_INPUTS + 1)}, EMBED, 413, "input: 2049 texts"),
    ({"model": "emb", "messages": [{"role": "user", "content": "hi"}]}, GENERATE[0], 400, "model: 'emb' is an embedding tenant; ask POST /v1/embeddings"),
    ({"model": "emb2", "prompt": "hi"}, GENERATE[1], 400, "model: 'emb2' is an embedding tenant"),
])  # fmt: skip
def test_the_router_refuses_the_wrong_task_and_a_bad_body_naming_the_field(document: dict[str, Any], path: str, status: int, message: str) -> None:
    got = _parse(document, path)
    assert isinstance(got, Rejected) and got.status == status and got.message.startswith(message), got
    assert got.param == message.split(":", 1)[0].split("[", 1)[0]


def test_a_peers_embedding_request_is_checked_as_a_clients() -> None:
    assert isinstance(_parse({"model": "emb", "input": "a"}, from_peer=True), Parsed)
    refused = _parse({"model": "emb", "input": [5]}, from_peer=True)
    assert isinstance(refused, Rejected) and refused.param == "input"


_text = st.text(max_size=8) | st.sampled_from(["\ud800", "", " ", "emb", "chat"])
_value = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | _text,
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=3), max_leaves=12)  # fmt: skip
_body = st.fixed_dictionaries({"model": st.sampled_from(["emb", "chat", "assistant", "far-emb", "emb:x", "minilm"]) | _value},
                              optional={"input": _value, "encoding_format": _value, "dimensions": _value, "priority": _value})  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_body, peer=st.booleans())
def test_random_requests_are_parsed_or_refused_with_one_line_4xx(body: dict[str, Any], peer: bool) -> None:
    got = _parse(body, from_peer=peer)
    if isinstance(got, Rejected):
        assert 400 <= got.status < 500 and "\n" not in got.message and len(got.message) < 1000, got
    else:
        assert got.tenant in HOST.embedders
        request = parse_embeddings(got.document)
        assert request.inputs and all(isinstance(t, str) and t for t in request.inputs)
