"""A llama.cpp tenant's GGUF adapters, the pure parts (issue #33): the command line that loads them,
and the ``lora`` field each request is sent with, decided as a transformers tenant decides it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zoo_agent.resident.config import AdapterConfig, WorkerConfig
from zoo_agent.resident.engines.front import Request, check
from zoo_agent.index.fit import GgufHeader
from zoo_agent.resident.engines.llamalora import adapter_files, adapter_problem, csv_field, lora_argv, lora_field, loras_for, with_lora
from zoo_agent.resident.wire.http import ApiError

NAMES = ("t", "m")


def _config(tmp_path: Path, *ids: str, refused: dict[str, str] | None = None, max_loras: int = 8) -> WorkerConfig:
    adapters = tuple(AdapterConfig(id=aid, version="1", dir=tmp_path / aid, rank=4) for aid in ids)
    return WorkerConfig(tenant="t", model="m", version="v1", version_dir=tmp_path, adapters=adapters, refused_adapters=refused or {},
                        max_loras=max_loras)  # fmt: skip


def _field(config: WorkerConfig, **document: Any) -> Any:
    field = lora_field({"prompt": "x", **document}, NAMES, loras_for(config))
    return field.document()["error"] if isinstance(field, ApiError) else field


def test_each_adapter_is_loaded_in_order_without_being_applied(tmp_path: Path) -> None:
    assert lora_argv([]) == []  # a tenant without adapters: its command line as before
    assert lora_argv([tmp_path / "a.gguf", tmp_path / "b.gguf"]) == [
        "--lora", f'"{tmp_path}/a.gguf"', "--lora", f'"{tmp_path}/b.gguf"', "--lora-init-without-apply"]  # fmt: skip


def test_a_comma_or_a_quote_in_a_zoo_path_stays_one_file() -> None:
    """llama.cpp splits --lora at commas (several adapters in one argument), outside double quotes, where "" is a quote."""
    assert csv_field("/zoo,a/x.gguf") == '"/zoo,a/x.gguf"'
    assert csv_field('/zoo"b/x.gguf') == '"/zoo""b/x.gguf"'


def test_an_adapter_without_its_gguf_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter.gguf").write_bytes(b"GGUF")
    (tmp_path / "b").mkdir()
    config = _config(tmp_path, "a", "b")
    assert adapter_files(config.adapters[:1]) == [tmp_path / "a" / "adapter.gguf"]
    assert adapter_files(config.adapters) == f"adapter b@1: no .gguf file in {tmp_path / 'b'}"


def test_every_request_says_every_adapters_scale(tmp_path: Path) -> None:
    """The base model's requests too: a request without ``lora`` gets the adapters at scale 1 in this llama-server."""
    config = _config(tmp_path, "code", "terse", "legal")
    assert _field(config, model="t") == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}, {"id": 2, "scale": 0.0}]
    assert _field(config, model="m") == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}, {"id": 2, "scale": 0.0}]
    assert _field(config, model="t:terse") == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}, {"id": 2, "scale": 0.0}]
    assert _field(config, model="t:legal+code") == [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}, {"id": 2, "scale": 1.0}]
    scaled = {"adapters": [{"name": "legal", "scale": -0.5}, {"name": "terse"}]}
    assert _field(config, model="t", x_zoo=scaled) == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}, {"id": 2, "scale": -0.5}]
    assert _field(_config(tmp_path), model="t") is None  # no adapters: the body goes as it came


@pytest.mark.parametrize(("document", "status", "param", "start"), [
    ({"model": "t:sql"}, 404, "model", "model 't:sql' is not served here"),
    ({"model": "t:code+sql"}, 400, "model", "model: adapter 'sql' is not declared for tenant 't' (declared: broken, code, legal, terse)"),
    ({"model": "t:code+code"}, 400, "model", "model: adapter 'code' is named twice"),
    ({"model": "t:broken"}, 400, "model", "model: adapter refused: broken@1: damaged"),
    ({"model": "t:code", "x_zoo": {"exclude": ["code"]}}, 400, "model", "model: adapter 'code' is excluded by x_zoo.exclude.0"),
    ({"model": "t:code", "x_zoo": {"adapters": [{"name": "terse"}]}}, 400, "x_zoo.adapters", "x_zoo.adapters: a set is asked here with model 't'"),
    ({"model": "t:code+terse+legal"}, 400, "model", "model: a set of 3 adapters; at most 2"),
    ({"model": "t:auto"}, 400, "model", "model: 't:auto' is not available on a llama.cpp tenant yet"),
    ({"model": "t", "lora": [{"id": 0, "scale": 1}]}, 400, "lora", "lora: adapters are chosen by name"),  # by position: past names, exclusions, refusals
    ({"model": "t:code", "lora": []}, 400, "lora", "lora: adapters are chosen by name"),
])  # fmt: skip
def test_what_a_transformers_tenant_refuses_is_refused_the_same_way(tmp_path: Path, document: dict[str, Any], status: int, param: str, start: str) -> None:
    config = _config(tmp_path, "code", "terse", "legal", refused={"broken": "broken@1: damaged"}, max_loras=2)
    refused = check(Request("POST", "/v1/completions", "/v1/completions", {}, json.dumps({"prompt": "x", **document}).encode()), NAMES, loras_for(config))
    assert refused is not None and (refused.status, refused.param) == (status, param), refused and refused.document()
    assert refused.message.startswith(start), refused.message


def test_a_scale_off_the_grid_is_refused_before_it_is_mapped(tmp_path: Path) -> None:
    body = {"model": "t", "prompt": "x", "x_zoo": {"adapters": [{"name": "code", "scale": 0.33}]}}
    refused = check(Request("POST", "/v1/completions", "/v1/completions", {}, json.dumps(body).encode()), NAMES, loras_for(_config(tmp_path, "code")))
    assert refused is not None and refused.param == "x_zoo.adapters.0.scale", refused and refused.document()


def test_the_body_is_sent_with_the_field_and_unchanged_without_adapters(tmp_path: Path) -> None:
    body = b'{"model": "t:code",  "prompt": "caf\\u00e9 \\ud800", "max_tokens": 3, "x": 0.1}'
    assert with_lora(body, NAMES, None) is body
    assert with_lora(body, NAMES, loras_for(_config(tmp_path))) is body
    sent = with_lora(body, NAMES, loras_for(_config(tmp_path, "terse", "code")))
    assert json.loads(sent) == {**json.loads(body), "lora": [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]}
    assert sent.endswith(body[1:])  # the rest as it came: a lone surrogate in a field we pass through too
    spaced = b' \n {"model": "t", "prompt": "{"}'
    assert json.loads(with_lora(spaced, NAMES, loras_for(_config(tmp_path, "code")))) == {"lora": [{"id": 0, "scale": 0.0}], "model": "t", "prompt": "{"}


def test_a_gguf_adapters_rank_is_read_from_a_bounded_header(tmp_path: Path) -> None:
    """What `add` reads for a GGUF adapter's rank: a header claiming billions of tensors costs nothing, garbage is no rank."""
    import struct

    from zoo_agent.index.fit import gguf_header

    huge = tmp_path / "huge.gguf"
    huge.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1) + b"\0" * 64)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + b"\xff" * 64)
    assert [gguf_header(p) for p in (huge, garbage, tmp_path / "absent.gguf")] == [None, None, None]


MODEL = GgufHeader({"general.architecture": "llama", "general.type": "model"},
                   {"blk.0.attn_q.weight": (64, 64), "blk.0.attn_v.weight": (64, 32), "token_embd.weight": (64, 373)})  # fmt: skip


def _adapter(rank: int = 4, arch: str = "llama", kind: str = "adapter", **shapes: tuple[int, ...]) -> GgufHeader:
    fields: dict[str, object] = {"general.architecture": arch, "general.type": kind, "adapter.type": "lora"}
    default = {"blk.0.attn_v.weight.lora_a": (64, rank), "blk.0.attn_v.weight.lora_b": (rank, 32)}
    return GgufHeader(fields, {**default, **{k.replace("__", "."): v for k, v in shapes.items()}})


@pytest.mark.parametrize(("header", "problem"), [
    (_adapter(), None),
    (_adapter(token_embd__weight__lora_a=(373, 4), token_embd__weight__lora_b=(4, 64)), None),  # llama.cpp flips A and B there
    (None, "code@1: code.gguf: not a readable GGUF file"),
    (_adapter(kind="model"), "code@1: code.gguf: not a LoRA adapter (general.type 'model'); convert_lora_to_gguf.py makes one"),
    (_adapter(rank=8), "code@1: code.gguf: rank is 8, the index declares rank 4"),
    (_adapter(arch="qwen2"), "code@1: code.gguf: built for a 'qwen2' model; the tenant's model is 'llama'"),
    (_adapter(blk__9__attn_q__weight__lora_a=(64, 4), blk__9__attn_q__weight__lora_b=(4, 64)), "code@1: code.gguf: the model has no tensor 'blk.9.attn_q.weight'"),
    (_adapter(blk__0__attn_q__weight__lora_a=(128, 4), blk__0__attn_q__weight__lora_b=(4, 64)),
     "code@1: code.gguf: 'blk.0.attn_q.weight' is [64, 64] in the model; the adapter's A and B are [128, 4] and [4, 64]"),  # another model's size
    (_adapter(blk__0__attn_q__weight__lora_a=(64, 4)), "code@1: code.gguf: 'blk.0.attn_q.weight' is [64, 64] in the model; the adapter's A and B are [64, 4] and []"),
])  # fmt: skip
def test_an_adapter_llama_server_would_not_load_is_refused_saying_why(tmp_path: Path, header: GgufHeader | None, problem: str | None) -> None:
    assert adapter_problem(_config(tmp_path, "code").adapters[0], "code.gguf", header, MODEL) == problem
