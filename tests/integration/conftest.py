"""Fixtures of the integration tests, used by name (never imported): a zoo world, the tiny models
the resident tests serve, the worker's app, the LoRA models, an applied zoo with host state.
The harnesses they build on live in tests/support."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.llamacpp import LlamaCpp, build_tiny_gguf, build_tiny_gguf_loras, llama_cpp_or_skip
from tests.support.world import World


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The tiny model's files (built once per run), for a world to publish with `artifact`."""
    from zoo_agent.demo.tiny import build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model built in a directory of its own, once per module (for in-process backends)."""
    pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")
    from zoo_agent.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def app(model_dir: Path) -> Any:
    """The worker's ASGI app serving the tiny model as tenant t (``tests.support.asgi.ask`` talks to it)."""
    from zoo_agent.resident.worker.app import ServingState, create_app
    from zoo_agent.resident.worker.backend import TransformersBackend

    b = TransformersBackend(model_dir, allow_pickle=False, allow_code=False, device="cpu")
    b.load()
    return create_app(ServingState("t", "m", "1", b, {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0}))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base model, three random adapters (code, terse, legal) and a bag-of-words embedder (tests.support.lora)."""
    from tests.support.lora import DESCRIPTIONS, LABELLED
    from zoo_agent.demo.tiny import build_tiny_adapter, build_tiny_embedder, build_tiny_model

    out = tmp_path_factory.mktemp("lora")
    paths = {"base": build_tiny_model(out / "base")}
    paths["code"] = build_tiny_adapter(paths["base"], out / "code", seed=1, base_name="m")
    paths["terse"] = build_tiny_adapter(paths["base"], out / "terse", seed=2, base_name="m")
    paths["legal"] = build_tiny_adapter(paths["base"], out / "legal", seed=3, rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), base_name="m")
    words = " ".join(d for d, _ in DESCRIPTIONS.values()) + " " + " ".join(t for t, _ in LABELLED) + " hello there weather today"
    paths["embedder"] = build_tiny_embedder(out / "embedder", words + " " + " ".join(t for _, tags in DESCRIPTIONS.values() for t in tags))
    return paths


@pytest.fixture
def zoo(world: World) -> World:
    """An applied zoo with a model and a LoRA, and host and resident state of an application's own."""
    world.artifact("m", "1", {"config.json": b'{"a": 1}', "model.safetensors": b"w" * 70_000})
    world.artifact("lo", "1", {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"l" * 5000}, kind="loras")
    assert world.run("apply").exit_code == 0
    # An application's own state, opaque to us, with the modes the zoo's own writers use
    # (0750/0640, as the resident's sessions do); a backup narrows wider modes to these.
    for directory in ("host/app", "resident", "resident/tenants", "resident/tenants/t"):
        (world.root / directory).mkdir(mode=0o750, exist_ok=True)
    for path, text in (("host/app/experience.json", '{"episodes": 12}'), ("resident/tenants/t/lease.json", '{"requests": 3}')):
        (world.root / path).write_text(text)
        os.chmod(world.root / path, 0o640)
    return world


@pytest.fixture(scope="session")
def llama_cpp() -> LlamaCpp:
    """llama.cpp built by .ci/llama-cpp (skipped, saying how to build it, where absent; issue #33)."""
    return llama_cpp_or_skip()


@pytest.fixture(scope="session")
def tiny_gguf(llama_cpp: LlamaCpp, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model converted with the pinned source's converter: {"hf", "f32", "q8_0", "q4_k_m"}."""
    return build_tiny_gguf(llama_cpp, tmp_path_factory.mktemp("tiny-gguf"))


@pytest.fixture(scope="session")
def tiny_gguf_loras(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tests' peft adapters of that tiny model, converted with the same source's convert_lora_to_gguf.py: {"code", "terse"}."""
    return build_tiny_gguf_loras(llama_cpp, tiny_gguf["hf"], tmp_path_factory.mktemp("tiny-gguf-loras"))
