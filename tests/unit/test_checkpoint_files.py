"""Named checkpoints of a session (issue #36), on the files: retention keeps exactly `keep`, a
restored session is the session as it was, hostile names and planted links are refused with a
victim directory outside the zoo unchanged, and a SIGKILL at any step of a checkpoint leaves the
old set or the new one. No model here (tests/integration/test_checkpoints.py runs one)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.support.victim import make_victim, snapshot
from zoo_agent.cli.main import cli
from zoo_agent.formats import parse_timespan
from zoo_agent.index.load import load_index
from zoo_agent.resident.sessions.checkpoints import CheckpointPolicy, Checkpoints, default_name, retained
from zoo_agent.resident.sessions.store import Sessions
from zoo_agent.resident.sessions.transcript import SessionFile
from zoo_agent.store.zoo import Zoo

CACHE = b"frozen tensors"


def _turn(n: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"question {n}"}, {"role": "assistant", "content": f"answer {n}"}], "completion_ids": [n, n + 1]}


def _session(sid: str, turns: int) -> dict[str, Any]:
    return {"id": sid, "created": "2025-01-01T00:00:00.000Z", "updated": "2025-01-01T00:00:00.000Z", "turns": [_turn(n) for n in range(turns)]}


class Zooish:
    """An index with tenant t (and route r over it) and the tenant's session files; the CLI over them."""

    def __init__(self, tmp: Path, checkpoints: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.write_index(checkpoints or {})
        self.base = tmp / "zoo" / "resident" / "tenants" / "t"
        (self.base / "sessions").mkdir(parents=True)
        (self.base / "kv-cache").mkdir()

    def write_index(self, checkpoints: dict[str, Any]) -> None:
        model = {"version": "v1", "source": {"type": "file", "path": "src"}, "license": "MIT",
                 "files": [{"path": "config.json", "sha256": hashlib.sha256(b"{}").hexdigest(), "size": 2}]}  # fmt: skip
        tenant = {"model": "m", "sessions": {"checkpoints": checkpoints}} if checkpoints else {"model": "m"}
        index = {"models": {"m": model}, "loras": {}, "tenants": {"t": tenant}, "routes": {"r": {"default": "t"}},
                 "hosts": {"h": {"resident": "t", "routes": ["r"]}}}  # fmt: skip
        (self.tmp / "index.json").write_text(json.dumps(index))

    def talk(self, sid: str, turns: int, cache: bytes = CACHE) -> None:
        """The session as a worker leaves it: its transcript, and its cache written by rename."""
        (self.base / "sessions" / f"{sid}.json").write_text(json.dumps(_session(sid, turns)))
        tmp = self.base / "kv-cache" / f".{sid}.tmp"
        tmp.write_bytes(cache + str(turns).encode())
        os.replace(tmp, self.base / "kv-cache" / f"{sid}.safetensors")

    def cli(self, *args: str) -> Result:
        where = ["--root", str(self.tmp / "zoo"), "--index", str(self.tmp / "index.json"), "--host", "h"]
        return CliRunner().invoke(cli, ["sessions", args[0], *where, *args[1:]], catch_exceptions=False)

    def names(self, sid: str = "s") -> list[str]:
        return [c["name"] for c in json.loads(self.cli("list", "--json").stdout)["checkpoints"] if c["session"] == sid]


@pytest.fixture
def z(tmp_path: Path) -> Zooish:
    return Zooish(tmp_path, {"keep": 3})


def test_retention_keeps_exactly_keep_and_the_oldest_go_first(z: Zooish) -> None:
    z.talk("s", 1)
    dropped = []
    for n in range(1, 6):
        z.talk("s", n)
        result = z.cli("checkpoint", "s", "--name", f"c{n}", "--json")
        assert result.exit_code == 0, result.output
        dropped += json.loads(result.output)["dropped"]
    assert z.names() == ["c3", "c4", "c5"] and dropped == ["c1", "c2"]
    assert sorted(os.listdir(z.base / "checkpoints" / "s")) == ["_set.json", "c3", "c4", "c5"]  # nothing else left on disk
    z.write_index({"keep": 1})  # lowered: the next checkpoint leaves exactly one
    assert z.cli("checkpoint", "s", "--name", "c6").exit_code == 0
    assert z.names() == ["c6"] and sorted(os.listdir(z.base / "checkpoints" / "s")) == ["_set.json", "c6"]
    listed = json.loads(z.cli("list", "--json").stdout)
    assert listed["sessions"][0]["checkpoints"] == ["c6"] and listed["checkpoints"][0]["turns"] == 5
    assert "(1 checkpoints)" in z.cli("list").output and "c6" in z.cli("list").output
    assert retained([], 3) == ([], [])


def test_a_restored_session_is_the_session_as_it_was_with_its_cache(z: Zooish) -> None:
    z.talk("s", 2)
    assert z.cli("checkpoint", "s", "--name", "two").exit_code == 0
    z.talk("s", 4)  # the session goes on
    result = z.cli("restore", "two", "--as", "back", "--json")
    assert result.exit_code == 0, result.output
    restored = json.loads((z.base / "sessions" / "back.json").read_text())
    assert restored["id"] == "back" and restored["restored_from"] == "s/two" and restored["turns"] == _session("s", 2)["turns"]
    assert (z.base / "kv-cache" / "back.safetensors").read_bytes() == CACHE + b"2"  # the frozen cache, not the session's newer one
    again = z.cli("restore", "two", "--as", "back")
    assert again.exit_code == 2 and "session 'back' exists; choose another --as" in again.output
    default = json.loads(z.cli("restore", "two", "--json").stdout)["id"]
    assert default.startswith("s-") and len(default) == 10 and (z.base / "sessions" / f"{default}.json").exists()
    assert z.cli("restore", "nope").exit_code == 2 and "checkpoint 'nope' does not exist" in z.cli("restore", "nope").output
    taken = z.cli("checkpoint", "back", "--name", "two")
    assert taken.exit_code == 2 and "checkpoint 'two' exists (of session 's')" in taken.output  # names are the tenant's
    assert z.cli("delete-checkpoint", "two").exit_code == 0 and z.names() == []
    assert (z.base / "sessions" / "back.json").exists() and (z.base / "kv-cache" / "back.safetensors").read_bytes() == CACHE + b"2"
    missing = z.cli("checkpoint", "ghost")
    assert missing.exit_code == 2 and "session 'ghost' does not exist" in missing.output


def test_a_route_session_is_checkpointed_with_each_of_its_caches(tmp_path: Path) -> None:
    z = Zooish(tmp_path)
    route = tmp_path / "zoo" / "resident" / "routes" / "r"
    (route / "sessions").mkdir(parents=True)
    (route / "kv-cache").mkdir()
    (route / "sessions" / "s.json").write_text(json.dumps(_session("s", 2)))
    for key in ("aaaa", "bbbb"):  # one cache per model@version and adapter
        (route / "kv-cache" / f"s+{key}.safetensors").write_bytes(key.encode())
    (route / "kv-cache" / "s2+cccc.safetensors").write_bytes(b"another session's")
    record = json.loads(z.cli("checkpoint", "--route", "r", "s", "--name", "cp", "--json").stdout)["checkpoint"]
    assert record["caches"] == 2
    assert z.cli("restore", "--route", "r", "cp", "--as", "new").exit_code == 0
    assert sorted(p.name for p in (route / "kv-cache").iterdir() if p.name.startswith("new")) == ["new+aaaa.safetensors", "new+bbbb.safetensors"]


def test_a_full_disk_is_one_line_and_leaves_the_old_set(z: Zooish, monkeypatch: pytest.MonkeyPatch) -> None:
    z.talk("s", 1)
    assert z.cli("checkpoint", "s", "--name", "a").exit_code == 0

    def full(*_args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    result = z.cli("checkpoint", "s", "--name", "b")
    monkeypatch.undo()
    assert result.exit_code == 1 and "checkpointing session 's': No space left on device" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and z.names() == ["a"]


HOSTILE = ["../../x", "../victim", "/tmp/x", "a/b", ".hidden", "x" * 65, "", "x y", "..", "a\nb", "é"]


def test_hostile_names_and_planted_links_are_refused_and_the_victim_is_unchanged(z: Zooish, tmp_path: Path) -> None:
    victim = make_victim(tmp_path / "victim")
    (victim / "s").mkdir()
    before = snapshot(victim)
    z.talk("s", 1)
    for name in HOSTILE:
        for args in [("checkpoint", "s", "--name", name), ("restore", name), ("delete-checkpoint", name), ("checkpoint", name)]:
            result = z.cli(*args)
            assert result.exit_code == 2, (args, result.output)
            assert "is not a checkpoint name" in result.output or "is not a session id" in result.output
    assert z.cli("checkpoint", "s", "--name", "ok").exit_code == 0
    for name in HOSTILE:
        result = z.cli("restore", "ok", "--as", name)
        assert result.exit_code == 2 and "is not a session id" in result.output, (name, result.output)

    def refused(args: tuple[str, ...], what: str) -> None:
        result = z.cli(*args)
        assert result.exit_code == 2 and f"{what}, not a directory; refused" in result.output and len(result.output.strip().splitlines()) == 1, result.output

    checkpoints = z.base / "checkpoints"
    os.rename(checkpoints, tmp_path / "kept")
    checkpoints.symlink_to(victim)  # the whole checkpoints directory
    refused(("checkpoint", "s", "--name", "a1"), "a symbolic link")
    refused(("restore", "ok"), "a symbolic link")
    assert z.cli("list").exit_code == 2
    checkpoints.unlink()
    os.rename(tmp_path / "kept", checkpoints)
    z.talk("t2", 1)
    (checkpoints / "t2").symlink_to(victim / "s")  # one session's
    refused(("checkpoint", "t2", "--name", "a2"), "a symbolic link")
    (checkpoints / "t2").unlink()
    (checkpoints / "s" / "planted").symlink_to(victim)  # garbage in a session's directory: removed, not followed
    (checkpoints / "s" / "junk").mkdir()
    (checkpoints / "s" / "junk" / "link").symlink_to(victim / "precious.txt")
    assert z.cli("checkpoint", "s", "--name", "a3").exit_code == 0
    assert sorted(os.listdir(checkpoints / "s")) == ["_set.json", "a3", "ok"]
    (z.base / "kv-cache" / "s.safetensors").unlink()
    (z.base / "kv-cache" / "s.safetensors").symlink_to(victim / "precious.txt")  # a cache that is a link: not frozen
    assert json.loads(z.cli("checkpoint", "s", "--name", "a4", "--json").stdout)["checkpoint"]["caches"] == 0
    (z.base / "sessions" / "s.json").rename(tmp_path / "s.json")
    (z.base / "sessions" / "s.json").symlink_to(tmp_path / "s.json")  # a transcript that is a link
    result = z.cli("checkpoint", "s", "--name", "a5")
    assert result.exit_code == 2 and "a symbolic link, not a file; refused" in result.output
    sessions = z.base / "sessions"
    os.rename(sessions, tmp_path / "sessions-kept")
    sessions.symlink_to(victim)  # where a restore writes
    refused(("restore", "ok", "--as", "into-victim"), "a symbolic link")
    sessions.unlink()
    os.rename(tmp_path / "sessions-kept", sessions)
    (sessions / "dangling.json").symlink_to(victim / "nothing-here.json")  # a restore never writes through a link
    result = z.cli("restore", "ok", "--as", "dangling")
    assert result.exit_code == 2 and "session 'dangling' exists" in result.output
    kv = z.base / "kv-cache"
    (kv / "thawed.safetensors").symlink_to(victim / "precious.txt")
    assert z.cli("restore", "ok", "--as", "thawed").exit_code == 0  # the link is replaced, never written through
    assert not (kv / "thawed.safetensors").is_symlink() and (kv / "thawed.safetensors").read_bytes() == CACHE + b"1"
    assert snapshot(victim) == before
    assert not (tmp_path / "x").exists() and not (z.base / "x").exists()


# -- a SIGKILL at each step -----------------------------------------------------------------------

OPERATIONS = ("mkdir", "open", "write", "fsync", "link", "rename", "replace", "unlink", "rmdir", "fchmod")


def _checkpoint_killed_at(base: Path, name: str, n: int) -> int:
    """A checkpoint in a forked process that SIGKILLs itself at its ``n``-th file operation; its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            calls = [0]

            def counted(fn: Any) -> Any:
                def call(*args: Any, **kwargs: Any) -> Any:
                    calls[0] += 1
                    if calls[0] == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*args, **kwargs)

                return call

            for op in OPERATIONS:
                setattr(os, op, counted(getattr(os, op)))
            Checkpoints(base).create("s", name, keep=2)
        except BaseException:  # noqa: BLE001 - any failure but the kill: exit 3
            os._exit(3)
        os._exit(0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def test_a_sigkill_at_any_step_of_a_checkpoint_leaves_the_old_set_or_the_new_one(z: Zooish) -> None:
    """Every file operation of a checkpoint in turn is the last (a real SIGKILL of a real process)."""
    z.talk("s", 1)
    store = Checkpoints(z.base)
    for name in ("first", "second"):
        store.create("s", name, keep=2)
    outcomes = set()
    for n in range(1, 200):
        old = [r.name for r in store.listed("s")[0]]
        z.talk("s", n + 1)  # each checkpoint freezes a transcript of its own
        status = _checkpoint_killed_at(z.base, f"c{n}", n)
        records = store.listed("s")[0]
        now = [r.name for r in records]
        assert now in (old, [*old, f"c{n}"][-2:]), (n, old, now)
        for record in records:  # every checkpoint of the set is whole
            frozen = z.base / "checkpoints" / "s" / record.name
            assert len(SessionFile.model_validate_json((frozen / "session.json").read_bytes()).turns) == record.turns
            assert (frozen / "s.safetensors").read_bytes().startswith(CACHE)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0 and now == [*old, f"c{n}"][-2:], (n, status)
            break
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (n, status)
        outcomes.add("new" if now != old else "old")
    else:
        pytest.fail("the checkpoint never completed")
    assert outcomes == {"old", "new"}, outcomes  # killed before the commit point and after it
    assert n > 10  # every step was a kill point
    store.create("s", "last", keep=2)  # the next writer removes what the killed ones left
    assert sorted(os.listdir(z.base / "checkpoints" / "s")) == sorted(["_set.json", f"c{n}", "last"])


# -- timed checkpoints, the settings ------------------------------------------------------------------


def test_a_timed_checkpoint_is_taken_after_a_turn_once_due_and_retention_holds(z: Zooish) -> None:
    z.talk("s", 1)
    transcript = SessionFile.model_validate(_session("s", 1))  # started long ago
    sessions = Sessions(z.base, model_key="m@1", dtype="float32", template="", checkpoints=CheckpointPolicy(keep=2, every=3600))
    sessions.timed_checkpoint(transcript)
    records = Checkpoints(z.base).listed("s")[0]
    assert [r.kind for r in records] == ["timed"] and records[0].name == default_name("s", records[0].created)
    sessions.timed_checkpoint(transcript)  # the newest is a second old: not due
    assert len(Checkpoints(z.base).listed("s")[0]) == 1
    sessions.checkpoints = CheckpointPolicy(keep=2, every=0.0)
    for _ in range(3):
        sessions.timed_checkpoint(transcript)
    assert len(Checkpoints(z.base).listed("s")[0]) == 2
    sessions.checkpoints = CheckpointPolicy(keep=2)  # no `every`: none taken on its own
    sessions.timed_checkpoint(SessionFile.model_validate(_session("quiet", 1)))
    assert Checkpoints(z.base).listed("quiet")[0] == []


@pytest.mark.parametrize(("spec", "seconds"), [("1h", 3600), ("30min", 1800), ("1h 30min", 5400), ("90", 90), ("2 days", 172800),
                                               ("1.5h", 5400), ("5m", 300), ("1w", 604800)])  # fmt: skip
def test_a_time_span_reads_as_systemd_reads_it(spec: str, seconds: float) -> None:
    assert parse_timespan(spec) == seconds


@pytest.mark.parametrize(("checkpoints", "problem"), [
    ({"every": "1 fortnight"}, "/tenants/t/sessions/checkpoints/every: '1 fortnight' is not a time span in systemd's notation: cannot read 'fortnight'"),
    ({"every": "0.5s"}, "/tenants/t/sessions/checkpoints/every: '0.5s' is shorter than a second"),
    ({"every": "1h 1h 1h 1h 1h 1h 1h 1h 1h"}, "/tenants/t/sessions/checkpoints/every: "),
    ({"keep": 0}, "/tenants/t/sessions/checkpoints/keep: must be >= 1, got 0"),
    ({"keep": 1001}, "/tenants/t/sessions/checkpoints/keep: must be <= 1000, got 1001"),
    ({"kept": 3}, "/tenants/t/sessions/checkpoints/kept: "),
])  # fmt: skip
def test_the_index_checkpoint_settings_are_validated_in_one_line(tmp_path: Path, checkpoints: dict[str, Any], problem: str) -> None:
    Zooish(tmp_path, checkpoints)
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "index.json")])
    assert result.exit_code == 2 and problem in result.output, result.output


# -- the HTTP endpoints (in-process: the gate and the router's dispatch are tests/integration's) -------


def test_the_http_api_checkpoints_restores_and_refuses_like_the_cli(z: Zooish, tmp_path: Path) -> None:
    from zoo_agent.resident.router.checkpoints import CheckpointApi, is_checkpoint_path

    victim = make_victim(tmp_path / "victim")
    before = snapshot(victim)
    z.talk("s", 2)
    api = CheckpointApi(Zoo(z.tmp / "zoo"), lambda: load_index(z.tmp / "index.json"), lambda: ["t"], lambda: ["r"])

    def ask(method: str, path: str, body: Any = None, query: bytes = b"", content_type: str | None = "application/json",
            from_peer: bool = False) -> tuple[int, Any]:  # fmt: skip
        raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        assert is_checkpoint_path(path), path
        status, answer = api.answer(method, path, query, raw, content_type=content_type, from_peer=from_peer)
        return status, json.loads(answer)

    status, made = ask("POST", "/v1/sessions/s/checkpoints", {"name": "cp"})
    assert status == 200 and made.pop("dropped") == [] and made["object"] == "session.checkpoint" and made["name"] == "cp" and made["turns"] == 2
    assert ask("POST", "/v1/sessions/s/checkpoints")[0] == 200  # a default name
    assert [c["name"] for c in ask("GET", "/v1/sessions/s/checkpoints")[1]["data"]][0] == "cp"
    assert ask("GET", "/v1/checkpoints/cp")[1]["session"] == "s"
    z.talk("s", 5)
    status, restored = ask("POST", "/v1/checkpoints/cp/restore", {"session": "again"})
    assert status == 200 and restored == {"id": "again", "object": "session", "restored_from": made}
    assert len(json.loads((z.base / "sessions" / "again.json").read_text())["turns"]) == 2
    refusals = {
        ("POST", "/v1/checkpoints/cp/restore", json.dumps({"session": "again"}).encode()): (409, "checkpoint_exists"),
        ("POST", "/v1/checkpoints/nope/restore", None): (404, "checkpoint_not_found"),
        ("POST", "/v1/sessions/ghost/checkpoints", None): (404, "checkpoint_not_found"),
        ("POST", "/v1/sessions/s/checkpoints", json.dumps({"name": "cp"}).encode()): (409, "checkpoint_exists"),
        ("POST", "/v1/sessions/s/checkpoints", json.dumps({"name": "../../x"}).encode()): (400, None),
        ("POST", "/v1/sessions/s/checkpoints", json.dumps({"name": 5}).encode()): (400, None),
        ("POST", "/v1/sessions/s/checkpoints", json.dumps({"nom": "x"}).encode()): (400, None),
        ("POST", "/v1/sessions/s/checkpoints", b"[" * 100_000): (400, None),
        ("POST", "/v1/sessions/s/checkpoints", b'"a string"'): (400, None),
        ("POST", "/v1/checkpoints/../../x/restore", None): (404, None),
        ("POST", "/v1/checkpoints/..%2F..%2Fx/restore", None): (400, None),
        ("POST", "/v1/checkpoints/cp/restore", json.dumps({"session": "../../victim"}).encode()): (400, None),
        ("GET", "/v1/sessions/../../x/checkpoints", None): (400, None),
        ("DELETE", "/v1/checkpoints/..", None): (400, None),
        ("PUT", "/v1/checkpoints/cp", None): (405, "method_not_allowed"),
        ("GET", "/v1/checkpoints/cp/restore", None): (405, "method_not_allowed"),
    }
    for (method, path, body), (status, code) in refusals.items():
        got, answer = ask(method, path, body)
        assert got == status and answer["error"]["code"] == code and "\n" not in answer["error"]["message"], (method, path, got, answer)
    assert ask("POST", "/v1/sessions/s/checkpoints", {"name": "x"}, content_type="text/plain")[0] == 415
    assert ask("GET", "/v1/checkpoints", from_peer=True)[0] == 403
    assert ask("GET", "/v1/checkpoints", query=b"model=nobody")[0] == 404
    assert ask("GET", "/v1/checkpoints", query=b"model=r")[1]["data"] == []  # the route's own
    os.rename(z.base / "checkpoints", tmp_path / "kept")
    (z.base / "checkpoints").symlink_to(victim)  # a link planted in the tenant's directory
    status, answer = ask("POST", "/v1/sessions/s/checkpoints", {"name": "evil"})
    assert status == 409 and answer["error"]["code"] == "unsafe_path" and "a symbolic link, not a directory; refused" in answer["error"]["message"]
    assert ask("POST", "/v1/checkpoints/cp/restore", {"session": "evil"})[0] == 409
    (z.base / "checkpoints").unlink()
    os.rename(tmp_path / "kept", z.base / "checkpoints")
    assert ask("DELETE", "/v1/checkpoints/cp")[1] == {**made, "object": "session.checkpoint.deleted", "deleted": True}
    assert snapshot(victim) == before and not (tmp_path / "x").exists()
    assert not is_checkpoint_path("/v1/sessions/checkpoints")  # a session of that id is a session's GET, as before
