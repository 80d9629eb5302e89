"""Every way an index file can be unreadable: one line, exit 2 (issue #2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from zoo_agent.cli.main import cli


def _validate(path: Path | str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert "Traceback" not in result.output
    return result.exit_code, result.stderr.strip()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty; an index is a JSON object"),
        (b"  \n\t", "is empty"),
        (b"\xff\xfe{}", "is not UTF-8 (byte 0xff at offset 0)"),
        (b'{"models": {\n  "a": 1,\n  }\n}', "line 3, column 3: Expecting property name enclosed in double quotes"),
        (b'{"models": NaN}', "NaN is not valid JSON"),
        (b'{"models": {}, "models": {}}', "/models: key appears twice; JSON keeps only the last one"),
        (b'{"models": {"a": {}, "a": {}}}', "/models/a: key appears twice"),
        (b"[]", "expected object, got array"),
    ],
)
def test_bad_file_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "index.json"
    path.write_bytes(content)
    code, err = _validate(path)
    assert code == 2
    assert err == f"{path}: {message}" or (err.startswith(f"{path}: ") and message in err and "\n" not in err)


def test_missing_file(tmp_path: Path) -> None:
    assert _validate(tmp_path / "nope.json") == (2, f"{tmp_path / 'nope.json'}: no such file")


def test_directory(tmp_path: Path) -> None:
    assert _validate(tmp_path) == (2, f"{tmp_path}: is a directory, not an index file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    path.write_text("{}")
    path.chmod(0)
    assert _validate(path) == (2, f"{path}: cannot be read: permission denied")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    path.write_bytes(b'\xef\xbb\xbf{"models": {}}')
    assert _validate(path)[0] == 0


def test_default_index_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fleet.json"
    path.write_text("{}")
    monkeypatch.setenv("ZOO_INDEX", str(path))
    result = CliRunner().invoke(cli, ["validate"])
    assert result.exit_code == 0 and result.stdout.startswith(f"{path}: valid")
