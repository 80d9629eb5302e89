"""Random backup manifests never reach outside the zoo (issue #17): restore either refuses in one
line (exit 2; exit 1 only for a link planted in the zoo) or restores only inside the root, with the
zoo's modes, and the user's directory beside the zoo is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support.victim import make_victim, snapshot
from zoo_agent.cli.main import cli

VICTIM = "<victim>"  # replaced by the victim's absolute path
_parts = st.sampled_from(["host", "resident", "models", "loras", "m", "versions", "1", "app", "x.json", "current", "previous",
                          "..", ".", "", "victim", "precious.txt", "1.tmp.x", ".hidden"])  # fmt: skip
_names = st.sampled_from(["app", "x.json", "y", "1", "sub"])
_good_paths = st.tuples(st.sampled_from(["host", "resident"]), st.lists(_names, min_size=1, max_size=2)).map(lambda t: "/".join([t[0], *t[1]]))
_bad_paths = st.one_of(
    st.lists(_parts, min_size=1, max_size=5).map("/".join),
    st.lists(_parts, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p)),
    st.sampled_from([f"{VICTIM}/precious.txt", f"{VICTIM}/sub", "../victim/precious.txt", "host/../../victim", "host/app/../../.."]),
)
# Mostly plausible entries, so that restores succeed often enough to check where they wrote.
_paths = st.one_of(_good_paths, _good_paths, _bad_paths)
_file_modes = st.one_of(st.sampled_from([0o640, 0o440, 0o600]), st.sampled_from([0o644, 0o666, 0o4750, 0o2640, 0o1640, 0, -1, 2**40]))
_dir_modes = st.one_of(st.sampled_from([0o750, 0o700]), st.sampled_from([0o755, 0o777, 0o4750, 0o2750, 0o1750, 0o500, -1]))
_targets = st.sampled_from(["versions/1", "app", "x.json", "y/x.json", "../victim", VICTIM, f"{VICTIM}/precious.txt",
                            "versions/../../../victim", "../../..", "", "app/../..", "versions/1.tmp.x"])  # fmt: skip
def _entries(paths: st.SearchStrategy[str], file_modes: st.SearchStrategy[int], dir_modes: st.SearchStrategy[int],
             targets: st.SearchStrategy[str], links: st.SearchStrategy[bool]) -> st.SearchStrategy[tuple[Any, Any, Any]]:  # fmt: skip
    """(files, dirs, links) of a manifest."""
    return st.tuples(
        st.lists(st.fixed_dictionaries({"path": paths, "data": st.binary(max_size=16), "mode": file_modes, "as_link": links}), max_size=4),
        st.lists(st.fixed_dictionaries({"path": paths, "mode": dir_modes}), max_size=2),
        st.lists(st.fixed_dictionaries({"path": paths, "target": targets}), max_size=2),
    )


# Half the manifests are plausible (so restores succeed, and where they wrote gets checked), half hostile.
_manifests = st.one_of(
    _entries(_good_paths, st.sampled_from([0o640, 0o440, 0o600]), st.sampled_from([0o750, 0o700]),
             st.sampled_from(["app", "x.json", "y/x.json", "versions/1"]), st.just(False)),
    _entries(_paths, _file_modes, _dir_modes, _targets, st.sampled_from([False, False, False, True])),
)


def _plain(path: str) -> bool:
    """Safe to create below the backup directory while building it (the test must not escape either)."""
    return not path.startswith("/") and not {"", ".", ".."} & set(path.split("/"))


def _build(tmp: Path, files: list[dict[str, Any]], dirs: list[dict[str, Any]], links: list[dict[str, Any]], version: bool) -> Path:
    victim = tmp / "victim"
    bk = tmp / "bk"
    (bk / "files").mkdir(parents=True)
    fill = lambda s: s.replace(VICTIM, str(victim))  # noqa: E731
    entries = []
    if version:  # a whole version, so the staging-and-rename path runs too
        inner = json.dumps({"files": [{"path": "w.bin"}]}).encode()
        files = [*files, {"path": "models/m/versions/1/manifest.json", "data": inner, "mode": 0o440, "as_link": False},
                 {"path": "models/m/versions/1/w.bin", "data": b"weights", "mode": 0o440, "as_link": False}]  # fmt: skip
        links = [*links, {"path": "models/m/current", "target": "versions/1"}]
    for f in files:
        path, data = fill(f["path"]), f["data"]
        if f["as_link"]:
            data = (victim / "precious.txt").read_bytes()  # what a followed link would read
        if _plain(path):
            target = bk / "files" / path
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(victim / "precious.txt", target) if f["as_link"] else target.write_bytes(data)
            except OSError:
                pass  # a path under another file, or listed twice: the manifest is refused for it
        entries.append({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "mode": f["mode"], "mtime_ns": 0})
    manifest = {"format": 1, "files": entries, "dirs": [{**d, "path": fill(d["path"])} for d in dirs],
                "links": [{"path": fill(lk["path"]), "target": fill(lk["target"])} for lk in links]}  # fmt: skip
    (bk / "backup-manifest.json").write_text(json.dumps(manifest))
    return bk


def _inside(root: Path, planted: Path | None) -> None:
    """Everything restored is below the root, reached without leaving it, with the zoo's modes."""
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path == planted:
                continue
            st_ = path.lstat()
            assert os.path.realpath(path).startswith(real_root + os.sep), path
            assert st_.st_mode & 0o7000 == 0, path
            if stat.S_ISDIR(st_.st_mode):
                assert st_.st_mode & 0o7777 & ~0o750 == 0, (path, oct(st_.st_mode))
            elif stat.S_ISREG(st_.st_mode):
                assert st_.st_mode & 0o7777 & ~0o640 == 0, (path, oct(st_.st_mode))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifest=_manifests, version=st.booleans(), planted=st.booleans())
def test_restore_of_a_random_manifest_stays_inside_the_zoo(manifest: tuple[Any, Any, Any], version: bool, planted: bool) -> None:
    files, dirs, links = manifest
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        victim = make_victim(tmp / "victim")
        bk = _build(tmp, files, dirs, links, version)
        root = tmp / "zoo"
        if planted:  # a zoo that already holds a link out of it, where a restore may want a directory
            (root / "host").mkdir(parents=True, mode=0o750)
            os.symlink(victim, root / "host" / "app")
        before, backup_before = snapshot(victim), snapshot(bk)
        result = CliRunner().invoke(cli, ["restore", "--from", str(bk), "--root", str(root)])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output
        event(f"exit {result.exit_code}")
        assert result.exit_code in ((0, 1, 2) if planted else (0, 2)), result.output
        if result.exit_code:
            assert len(result.output.strip().splitlines()) == 1, result.output
            assert planted or not root.exists()  # refused before the root was created
        if result.exit_code == 0:
            _inside(root, root / "host" / "app" if planted else None)
        assert snapshot(victim) == before and snapshot(bk) == backup_before
        assert sorted(os.listdir(tmp)) == sorted(["victim", "bk", *(["zoo"] if root.exists() else [])])
