"""READY=1 means a real generation succeeded, not that the weights loaded (issue #24).

A published model that loads but cannot generate is the one case that tells the two
apart: its generation_config.json bans a token id outside the vocabulary, so
``from_pretrained`` succeeds and every ``generate`` raises (transformers 5.24: "The
model vocabulary size is N, but the following tokens were being biased"). Without the
warm-up generation before READY (``.ci/mutations/no-warmup``) this test fails.
"""

from __future__ import annotations

import errno
import json

import pytest

from tests.support.resident import Resident
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident


def _cannot_generate(tiny_files: dict[str, bytes]) -> dict[str, bytes]:
    """The tiny model plus a generation config that bans a token id the model does not have."""
    config = json.loads(tiny_files["config.json"])
    vocab = int(config["vocab_size"])
    generation = {"bad_words_ids": [[vocab + 7]], "eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
    return {**tiny_files, "generation_config.json": json.dumps(generation).encode()}


def test_a_model_that_loads_but_cannot_generate_never_sends_ready(world: World, tiny: dict[str, bytes]) -> None:
    world.artifact("m", "v1", _cannot_generate(tiny))
    world.tenant = {"generation": {"temperature": 0, "max_tokens": 4}}
    world.write_index()
    assert world.run("apply").exit_code == 0
    r = Resident(world)
    try:
        # Whichever comes first: READY (the bug) or the supervisor's failure report.
        first = r.notify.wait(lambda m: "READY" in m or "ERRNO" in m, timeout=120)
        code = r.proc.wait(timeout=60) if "READY" not in first else None
    finally:
        out = r.stop()
    assert "READY" not in r.notify.keys(), f"READY=1 without a generation that worked: {first}"
    assert code == 1, out  # a deterministic failure: exit 1, not a restart loop
    assert first["ERRNO"] == str(errno.EIO)
    assert first["STATUS"].startswith("cannot load m@v1: ValueError: "), first
    assert "vocabulary size" in first["STATUS"], first
    assert "restarting in" not in out and "Traceback" not in out, out
    assert [m for _, m in r.notify.messages if "ERRNO" in m] == [first]  # reported once, then the end
