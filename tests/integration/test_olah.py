"""apply and add against olah, a real third-party hub mirror (PyPI olah==0.5.4), on 127.0.0.1.

olah runs from its own virtual environment (.ci/olah, made by .ci/setup; it pins newer
dependencies than ours) in offline mode over a git repository this module builds, with
LFS objects laid out by hand as git-lfs would. It shows that we speak the real protocol;
error paths and large files use tests/support/hubserver.py, since olah maps every miss to
RepoNotFound and hashes whole files on each request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.world import World

OLAH = REPO / ".ci" / "olah" / "bin" / "olah-cli"
WEIGHTS = hashlib.sha256(b"seed").digest() * 4096  # 128 KiB, stored as an LFS object
FILES = {"config.json": b'{"model_type": "llama", "hidden_size": 8}\n', "tokenizer.json": b'{"version": "1.0"}\n', "model.safetensors": WEIGHTS}

pytestmark = pytest.mark.skipif(not OLAH.exists(), reason="olah is not installed (.ci/setup installs it into .ci/olah)")


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _make_repo(repo: Path) -> str:
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    (repo / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    for name, data in FILES.items():
        if name.endswith(".safetensors"):  # an LFS pointer in git, the bytes in .git/lfs/objects
            oid = hashlib.sha256(data).hexdigest()
            (repo / name).write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True)
            obj.write_bytes(data)
        else:
            (repo / name).write_bytes(data)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "tiny model")
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def olah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    base = tmp_path_factory.mktemp("olah")
    commit = _make_repo(base / "mirrors" / "models" / "org" / "tiny")
    (base / "olah.toml").write_text(
        '[basic]\nhost = "127.0.0.1"\nport = 0\nhf-scheme = "http"\nhf-netloc = "127.0.0.1:9"\nhf-lfs-netloc = "127.0.0.1:9"\n'
        f'repos-path = "{base / "repos"}"\nmirrors-path = ["{base / "mirrors"}"]\n\n[accessibility]\noffline = true\n'
    )
    (base / "logs").mkdir()
    proc = subprocess.Popen([str(OLAH), "-c", str(base / "olah.toml"), "--log-path", str(base / "logs")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        url, deadline = None, time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"olah exited with {proc.returncode}")
            if m := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
        assert url, "olah did not say which port it listens on"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its log pipe drained
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/api/models/org/tiny/revision/main", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield url, commit
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stderr is not None:
            proc.stderr.close()


def test_apply_from_olah(world: World, olah: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    url, commit = olah
    monkeypatch.setenv("HF_ENDPOINT", url)
    world.artifact("m", "v1", FILES, source={"type": "hf", "repo": "org/tiny", "revision": commit})
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    for name, data in FILES.items():
        assert (world.root / "models/m/current" / name).read_bytes() == data


def test_add_from_olah(world: World, olah: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    url, commit = olah
    monkeypatch.setenv("HF_ENDPOINT", url)
    world.write_index()
    result = world.raw("add", "hf:org/tiny", "--id", "tiny", "--license", "MIT", "--exclude", ".gitattributes", "--index", str(world.index))
    assert result.exit_code == 0, result.output
    entry = json.loads(world.index.read_text())["models"]["tiny"]
    assert entry["source"]["revision"] == commit
    assert {f["path"]: f["sha256"] for f in entry["files"]} == {n: hashlib.sha256(d).hexdigest() for n, d in FILES.items()}
