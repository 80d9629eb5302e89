"""The CLI's contract: exit codes, --json documents, --debug, no tracebacks (issue #2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from tests.support import REPO
from tests.support.index import write_index
from zoo_agent.cli.main import cli
from zoo_agent.errors import EXIT_CODES


def test_validate_ok_json(tmp_path: Path, index_doc: dict[str, Any]) -> None:
    path = write_index(tmp_path / "index.json", index_doc)
    result = CliRunner().invoke(cli, ["validate", "--json", str(path)])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"valid": True, "errors": []}


def test_validate_bad_json_output(tmp_path: Path, index_doc: dict[str, Any]) -> None:
    index_doc["tenants"]["chat"]["model"] = "ghost"
    path = write_index(tmp_path / "index.json", index_doc)
    result = CliRunner().invoke(cli, ["validate", "--json", str(path)])
    assert result.exit_code == 2
    document = json.loads(result.stdout)  # exactly one document
    assert document["valid"] is False
    assert document["errors"] == [
        {"pointer": "/tenants/chat/model", "message": "unknown model 'ghost' (declared models: llama, qwen)"}
    ]


def test_unreadable_file_with_json_is_one_document(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", "--json", str(tmp_path / "missing.json")])
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "InvalidIndex" and error["exit_code"] == 2
    assert error["problems"] == [{"pointer": "", "message": "no such file"}]


def test_debug_shows_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--debug", "validate", str(tmp_path / "missing.json")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_bad_flag_is_usage_error() -> None:
    result = CliRunner().invoke(cli, ["validate", "--frobnicate"])
    assert result.exit_code == 2
    assert "No such option '--frobnicate'" in result.stderr


def test_help_lists_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    for code in EXIT_CODES:
        assert f"  {code:>3}  " in result.stdout


def test_python_dash_m_and_console_script(tmp_path: Path) -> None:
    """Both entry points run for real, in a fresh interpreter."""
    bad = tmp_path / "index.json"
    bad.write_text('{"models": {"x": {}}}')
    proc = subprocess.run([sys.executable, "-m", "zoo_agent", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{bad}: /models/x: missing required field ")
    assert "Traceback" not in proc.stderr
    script = Path(sys.executable).with_name("zoo-agent")
    proc = subprocess.run([script, "validate", str(REPO / "index.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
