"""Key files are read one way everywhere (issue #31): a regular file of one short token.

A FIFO hung the command (and the resident before READY), /dev/zero was read until memory
ran out, and a 1 MiB key was accepted and sent in every header. Each flag that names a
key file gets one line naming it, exit 2, and nothing written.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests.support.world import World
from zoo_agent.cli.main import cli
from zoo_agent.errors import UsageError
from zoo_agent.keyfile import MAX_KEY_BYTES, read_key_file

pytestmark = pytest.mark.resident

Make = Callable[[Path], Path]


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "key")
    return tmp / "key"


def _huge(tmp: Path) -> Path:
    (tmp / "key").write_bytes(b"k" * (1 << 20) + b"\n")  # one visible word: only its size is wrong
    return tmp / "key"


def _directory(tmp: Path) -> Path:
    (tmp / "key").mkdir()
    return tmp / "key"


KINDS: dict[str, tuple[Make, str]] = {
    "fifo": (_fifo, "is a FIFO; a key file is a regular file holding one token"),
    "zero": (lambda tmp: Path("/dev/zero"), "is a character device; a key file is a regular file holding one token"),
    "huge": (_huge, f"larger than {MAX_KEY_BYTES} bytes; a key file holds one token"),
    "directory": (_directory, "is a directory; a key file is a regular file holding one token"),
    "missing": (lambda tmp: tmp / "nothing-here", "no such file"),
}


def _invoke(args: list[str], within: float = 60) -> Result:
    """In-process, in a thread of its own: a command that hangs fails the test instead of hanging it."""
    done: list[Result] = []
    thread = threading.Thread(target=lambda: done.append(CliRunner().invoke(cli, args)), daemon=True)
    thread.start()
    thread.join(within)
    assert done, f"{args[0]} did not return within {within}s"
    return done[0]


def _fleet_index(tmp: Path) -> Path:
    (tmp / "fleet.json").write_text(json.dumps({"hosts": {"a": {"endpoint": "http://127.0.0.1:1"}}}))
    return tmp / "fleet.json"


COMMANDS: dict[str, tuple[str, Callable[[World, Path], list[str]]]] = {
    "fleet status": ("--key-file", lambda w, key: ["fleet", "status", "--index", str(_fleet_index(w.tmp)), "--key-file", str(key)]),
    "chat": ("--api-key-file", lambda w, key: ["chat", "--url", "http://127.0.0.1:1", "--api-key-file", str(key)]),
    "apply": ("--hf-token-file", lambda w, key: ["apply", *w.args("--hf-token-file", str(key))]),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_key_file_that_is_not_a_small_regular_file_is_one_line(world: World, tmp_path: Path, command: str, kind: str) -> None:
    world.artifact("m", "v1", {"config.json": b"{}"})
    make, why = KINDS[kind]
    (tmp_path / "keys").mkdir()
    key = make(tmp_path / "keys")
    flag, args = COMMANDS[command]
    result = _invoke(args(world, key))
    assert (result.exit_code, result.stderr) == (2, f"{flag} {key}: {why}\n"), result.output
    assert not world.root.exists()  # nothing written


def test_the_hub_token_credential_is_read_the_same_way(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world.artifact("m", "v1", {"config.json": b"{}"})
    os.mkfifo(tmp_path / "hf-token")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # systemd's LoadCredential=hf-token:...
    result = _invoke(["apply", *world.args()])
    why = "is a FIFO; a key file is a regular file holding one token"
    assert (result.exit_code, result.stderr) == (2, f"the systemd credential hf-token {tmp_path / 'hf-token'}: {why}\n")


def test_a_key_at_the_limit_is_read_and_an_empty_hub_token_falls_through(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(b"k" * (MAX_KEY_BYTES - 1) + b"\n")
    assert read_key_file(tmp_path / "key", "--api-key-file") == "k" * (MAX_KEY_BYTES - 1)
    (tmp_path / "empty").write_text(" \n")
    assert read_key_file(tmp_path / "empty", "--hf-token-file", allow_empty=True) == ""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "key")  # a link to a regular file is that file (systemd's credentials may be links)
    assert read_key_file(link, "--api-key-file") == "k" * (MAX_KEY_BYTES - 1)


@pytest.mark.parametrize(("flag", "kind"), [("--api-key-file", "fifo"), ("--fleet-key-file", "fifo"), ("--api-key-file", "zero")])
def test_the_resident_refuses_such_a_key_file_before_ready(world: World, tmp_path: Path, flag: str, kind: str) -> None:
    pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")
    from tests.support.resident import free_port

    world.artifact("m", "v1", {"config.json": b"{}"})
    make, why = KINDS[kind]
    (tmp_path / "keys").mkdir()
    key = make(tmp_path / "keys")
    proc = world.spawn("resident", flag, str(key), "--listen", f"127.0.0.1:{free_port()}")
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # it hangs (or serves): stop it, then fail below
            proc.kill()
            _, err = proc.communicate()
    assert (proc.returncode, err) == (2, f"{flag} {key}: {why}\n")


def test_a_path_with_a_newline_is_named_on_one_line(tmp_path: Path) -> None:
    odd = tmp_path / "key\nINJECTED: \x1b[2J"
    odd.write_text("")
    with pytest.raises(UsageError) as caught:
        read_key_file(odd, "--api-key-file")
    assert str(caught.value) == f"--api-key-file {ascii(str(odd))}: empty; it must hold the bearer token (an empty one would turn auth off)"
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)
