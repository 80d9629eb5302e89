"""schema.json is generated, checked in, and agrees with an independent validator (issue #2)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from tests.support import REPO
from tests.support.index import write_index
from zoo_agent.cli.main import cli
from zoo_agent.index.schema import index_schema, render_schema


def test_checked_in_schema_is_generated() -> None:
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0
    assert result.stdout == (REPO / "schema.json").read_text(), "run: zoo-agent schema > schema.json"


def test_schema_is_valid_2020_12_with_id_and_descriptions() -> None:
    schema = index_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"]
    for name, definition in schema["$defs"].items():
        assert definition.get("description"), f"$defs/{name} has no description"
        if name == "Provenance":  # typed parts, plus the free-form string facts indexes wrote before issue #35
            assert definition.get("additionalProperties") == {"type": "string", "maxLength": 1000}, name
        elif definition.get("type") == "object":
            assert definition.get("additionalProperties") is False, name
        for prop, spec in definition.get("properties", {}).items():
            assert spec.get("description"), f"$defs/{name}/properties/{prop} has no description"


def _ajv() -> str | None:
    local = REPO / ".ci" / "node" / "node_modules" / ".bin" / "ajv"
    return str(local) if local.exists() else shutil.which("ajv")


AJV = _ajv()


@pytest.mark.skipif(AJV is None, reason="ajv-cli is not installed (.ci/run installs it into .ci/node)")
def test_ajv_accepts_index_json() -> None:
    proc = subprocess.run(
        [AJV, "validate", "--spec=draft2020", "-s", "schema.json", "-d", "index.json"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


STRUCTURAL = {
    "bad sha256": ("/models/qwen/files/0/sha256", "abc"),
    "branch revision": ("/models/qwen/source/revision", "main"),
    "unknown field": ("/models/qwen/verison", "1"),
    "bad id": ("/models/Bad Id", {}),
    "zero size": ("/models/qwen/files/0/size", 0),
    "unknown source": ("/models/qwen/source/type", "s3"),
    "bad license": ("/models/qwen/license", "apache"),
    "bad memory budget": ("/hosts/mini/memory_budget", "8 GB"),
    "tenants not a list": ("/hosts/mini/tenants", "mac"),
    "unknown priority": ("/tenants/chat/priority", "urgent"),
    "unknown fetch": ("/tenants/chat/fetch", "lazy"),
    "pinned not a bool": ("/tenants/chat/pinned", "yes"),
}


@pytest.mark.skipif(AJV is None, reason="ajv-cli is not installed (.ci/run installs it into .ci/node)")
@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_ajv_rejects_structural_cases(tmp_path: Path, index_doc: dict[str, Any], case: str) -> None:
    where, value = STRUCTURAL[case]
    *parents, last = where.strip("/").split("/")
    node: Any = index_doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[last] = value
    schema = tmp_path / "schema.json"
    schema.write_text(render_schema())
    data = write_index(tmp_path / "index.json", index_doc)
    proc = subprocess.run([AJV, "validate", "--spec=draft2020", "-s", str(schema), "-d", str(data)], capture_output=True, text=True)
    assert proc.returncode != 0, f"ajv accepted {case}"
    ours = CliRunner().invoke(cli, ["validate", str(data)])
    assert ours.exit_code == 2  # and we agree


def test_index_json_references_schema() -> None:
    assert json.loads((REPO / "index.json").read_text())["$schema"] == "./schema.json"


def test_schema_describes_the_multi_tenant_fields() -> None:
    """Issue #20: the published contract names them, with their notation and choices."""
    schema = json.loads(render_schema())["$defs"]
    host, tenant = schema["HostEntry"]["properties"], schema["TenantEntry"]["properties"]
    assert host["tenants"]["type"] == "array" and "memory_budget" in host and "systemd" in host["memory_budget"]["description"]
    assert tenant["priority"]["enum"] == ["system", "realtime", "default", "batch"] and tenant["fetch"]["enum"] == ["eager", "on-demand"]
    assert tenant["pinned"]["type"] == "boolean"
