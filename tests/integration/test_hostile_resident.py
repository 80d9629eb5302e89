"""Hostile input and faults against the resident and the sessions (issue #17): nothing
escapes the zoo, nothing is silently wrong, nothing takes the worker down."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import World
from tests.victim import make_victim, snapshot


def _session(sid: str, turns: int = 1) -> dict[str, Any]:
    """A session file as the resident writes it."""
    turn = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}], "completion_ids": [5, 6, 7],
            "template": "0123456789abcdef", "model": "m@v1", "dropped_turns": 0, "time": "2025-01-01T00:00:00Z",
            "sampling": {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None},
            "adapter": None, "finish_reason": "length", "cache": "none"}  # fmt: skip
    return {"id": sid, "created": "2025-01-01T00:00:00Z", "updated": "2025-01-01T00:00:00Z", "turns": [dict(turn) for _ in range(turns)]}


def _one_line_error(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output + result.stderr
    return str(lines[0])


# -- 1. --tenant is an id, never a path ------------------------------------------------------


def test_a_tenant_that_is_a_path_is_refused_and_nothing_outside_the_zoo_changes(world: World, tmp_path: Path) -> None:
    world.artifact("m", "v1", {"config.json": b"{}"})
    victim = make_victim(tmp_path / "victim")
    (victim / "sessions").mkdir()
    (victim / "sessions" / "precious.json").write_text(json.dumps(_session("precious")))
    (victim / "kv-cache").mkdir()
    (victim / "kv-cache" / "precious.safetensors").write_bytes(b"the user's own bytes")
    before = snapshot(victim)
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps(_session("precious")))
    tenants_dir = world.root / "resident" / "tenants"
    attacks = [str(victim), os.path.relpath(victim, tenants_dir), "../../../victim", "t/../../../../victim", "T", "", " t", "t\n", "a/b"]
    for tenant in attacks:
        for command in (["import", "--force", str(upload)], ["list"], ["show", "precious"], ["export", "precious"], ["prune"]):
            result = world.raw("sessions", command[0], *world.args("--tenant", tenant, *command[1:]))
            assert result.exit_code == 2, (tenant, command, result.output)
            assert "not a tenant id" in _one_line_error(result), (tenant, command)
    unknown = world.raw("sessions", "list", *world.args("--tenant", "nobody"))
    assert unknown.exit_code == 2 and _one_line_error(unknown).endswith("no such tenant in " + str(world.index) + " (tenants: t)")
    assert snapshot(victim) == before
    assert not (world.root / "resident").exists()  # nothing was created in the zoo either
