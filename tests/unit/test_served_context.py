"""A tenant's one context number (issue #33): what the launcher gives its worker, what its card shows,
and that no worker keeps a limit of its own. No torch: the worker's pieces take stand-ins."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import zoo_agent.resident.worker as worker_package
from zoo_agent.index.model import DEFAULT_MAX_CONTEXT
from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.context import model_context, served_context
from zoo_agent.resident.worker.embedding_main import input_cap
from zoo_agent.resident.worker.main import served_context as worker_context
from zoo_agent.resident.worker.state import ServingState


def _version(tmp_path: Path, config: dict[str, Any] | None, seq_length: int | None = None) -> Path:
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if seq_length is not None:  # a sentence-transformers layout, as the hub's models have it
        (tmp_path / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                                                           {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": seq_length}))
    return tmp_path


CASES = [
    # (name, config, seq_length, declared, backend, served)
    ("the model's own, capped by the default", {"max_position_embeddings": 32768}, None, None, "transformers", DEFAULT_MAX_CONTEXT),
    ("the model's own, shorter than the default", {"max_position_embeddings": 1024}, None, None, "transformers", 1024),
    ("declared", {"max_position_embeddings": 32768}, None, 64, "transformers", 64),
    ("declared past the default", {"max_position_embeddings": 32768}, None, 16384, "transformers", 16384),
    ("declared past the model's positions", {"max_position_embeddings": 1024}, None, 8192, "transformers", 1024),
    ("llama-server serves what is declared", {"max_position_embeddings": 1024}, None, 8192, "llama.cpp", 8192),
    ("an embedder's max_seq_length", {"max_position_embeddings": 512}, 256, None, "transformers", 256),
    ("an embedder declared below it", {"max_position_embeddings": 512}, 256, 8, "transformers", 8),
    ("no config (an Ollama model): the default", None, None, None, "ollama", DEFAULT_MAX_CONTEXT),
    ("no config, declared", None, None, 8192, "ollama", 8192),
]


@pytest.mark.parametrize(("name", "config", "seq_length", "declared", "backend", "served"), CASES, ids=[c[0] for c in CASES])
def test_the_context_a_worker_is_given(tmp_path: Path, name: str, config: dict[str, Any] | None, seq_length: int | None, declared: int | None,
                                       backend: str, served: int) -> None:  # fmt: skip
    assert served_context(declared, *model_context(_version(tmp_path, config, seq_length)), backend) == served


def _backend(positions: int | None) -> Any:
    return SimpleNamespace(model=None, context_length=lambda: positions)


def test_the_generating_worker_takes_its_configs_number_bounded_by_the_models_positions(tmp_path: Path) -> None:
    config = WorkerConfig(tenant="t", model="m", version="1", version_dir=tmp_path, max_context=64)
    assert worker_context(config, _backend(4096)) == 64
    assert worker_context(config.model_copy(update={"max_context": 8192}), _backend(4096)) == 4096
    assert worker_context(config, _backend(None)) == 64  # the Ollama daemon's backend names no positions


def test_the_embedding_worker_takes_its_configs_number_bounded_by_what_the_model_embeds(tmp_path: Path) -> None:
    config = WorkerConfig(tenant="e", model="m", version="1", version_dir=tmp_path, kind="embedding", max_context=8)
    assert input_cap(config, 256) == 8
    assert input_cap(config.model_copy(update={"max_context": 4096}), 256) == 256


def test_no_worker_module_keeps_a_token_limit_of_its_own() -> None:
    """The hidden caps were ``max_tokens_limit = 4096`` and ``max_prompt_tokens = 4096`` in worker/state.py:
    every limit of a request's tokens is the tenant's max_context now, from the worker's config."""
    fields = {f for f in ServingState.__dataclass_fields__}
    assert "max_context" in fields and not fields & {"max_tokens_limit", "max_prompt_tokens"}
    assert ServingState.__dataclass_fields__["max_context"].default == DEFAULT_MAX_CONTEXT  # the index's documented default, by name
    for path in sorted(Path(worker_package.__file__).parent.glob("*.py")):
        numbers = [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and n.value == 4096]
        assert numbers == [], f"{path.name}: a literal token limit {numbers}"
