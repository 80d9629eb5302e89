"""The zoo seen as a Hugging Face cache (issue #35): ``zoo-agent export hf-cache DIR``.

Other tools look for a hub model in ``$HF_HUB_CACHE/models--<org>--<name>/``:
``refs/main`` holds a commit, ``snapshots/<commit>/<path>`` the files. The view lays that
out for every hub-sourced model and adapter whose ``current`` version verifies, each file
a symbolic link to the zoo's published (read-only, 0440) file of that version. No byte is
copied, nothing is written in the zoo, and the links name ``versions/<v>`` rather than
``current``, so a snapshot's bytes are the ones its commit pinned until the next export.
``refs/main`` names the commit the zoo serves, which is what "main" means offline.

Only what the view made is replaced or removed: the repository folders its record
(``.zoo-hf-cache.json``) lists. A folder of someone else's real cache is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo_agent import jsonbound
from zoo_agent.errors import StoreError, UsageError, ZooError
from zoo_agent.index.model import HF_REPO_PATTERN, REVISION_PATTERN
from zoo_agent.store.durable import write_atomic
from zoo_agent.store.zoo import Zoo, read_manifest

__all__ = ["RECORD", "Export", "Snapshot", "export_hf_cache", "snapshots"]

log = logging.getLogger("zoo_agent")

#: What the view made in its directory: the only folders it ever replaces or removes.
RECORD = ".zoo-hf-cache.json"
_REPO = re.compile(HF_REPO_PATTERN)
_REVISION = re.compile(REVISION_PATTERN)
_TEMP = re.compile(r"^\.models--.+\.(\d+)\.[0-9a-f]{8}\.tmp$")


@dataclass(frozen=True)
class Snapshot:
    """One hub repository at one commit, as the zoo holds it verified."""

    artifact: str  # "models/<id>@<version>"
    repo: str  # "org/name"
    revision: str  # the 40-hex commit
    files: tuple[tuple[str, str], ...]  # (path in the repository, absolute path of the zoo's file)

    @property
    def folder(self) -> str:
        return "models--" + self.repo.replace("/", "--")


@dataclass
class Export:
    """What an export did: the snapshots it lays out, the folders it removed, what it skipped and why."""

    snapshots: list[Snapshot] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _safe_path(path: Any) -> bool:
    return isinstance(path, str) and bool(path) and not path.startswith("/") and ".." not in path.split("/") and posixpath.normpath(path) == path


def snapshots(zoo: Zoo) -> tuple[list[Snapshot], list[str]]:
    """Every hub-sourced model and adapter whose current version verifies (stat against its
    manifest, as ``Zoo.current`` checks), and a line for each one that does not."""
    found: list[Snapshot] = []
    problems: list[str] = []
    for kind in ("models", "loras"):
        try:
            ids = sorted(e.name for e in os.scandir(zoo.root / kind) if e.is_dir(follow_symlinks=False))  # never an alias link
        except FileNotFoundError:
            continue
        for aid in ids:
            version = zoo.read_link(kind, aid, "current")
            if version is None:
                continue
            manifest = read_manifest(zoo.version_dir(kind, aid, version)) or {}
            source = manifest.get("source")
            if not isinstance(source, dict) or source.get("type") != "hf":
                continue
            repo, revision = source.get("repo"), source.get("revision")
            paths = [f.get("path") for f in manifest.get("files", []) if isinstance(f, dict)]
            if not (isinstance(repo, str) and _REPO.match(repo) and isinstance(revision, str) and _REVISION.match(revision)
                    and paths and all(_safe_path(p) for p in paths)):  # fmt: skip
                problems.append(f"{zoo.version_dir(kind, aid, version) / 'manifest.json'}: does not say which hub repository, commit and files it holds")
                continue
            try:
                vdir = Path(os.path.realpath(zoo.current(kind, aid)))
            except ZooError as exc:
                problems.append(str(exc))
                continue
            files = tuple(sorted((str(p), str(vdir / str(p))) for p in paths))
            found.append(Snapshot(f"{kind}/{aid}@{version}", repo, revision, files))
    return found, problems


def _desired(snaps: list[Snapshot]) -> dict[str, tuple[str, str]]:
    """A repository folder's tree, relative path -> ("file", content) or ("link", target): the first
    snapshot (by kind and id) is what refs/main names; each commit is laid out once."""
    tree: dict[str, tuple[str, str]] = {"refs/main": ("file", snaps[0].revision)}
    for snap in snaps:
        for path, target in snap.files:
            tree.setdefault(f"snapshots/{snap.revision}/{path}", ("link", target))
    return tree


def _present(folder: Path) -> dict[str, tuple[str, str]]:
    """The refs and snapshots a folder holds now (the hub client's own markers, such as .no_exist, aside)."""
    tree: dict[str, tuple[str, str]] = {}
    for top in ("refs", "snapshots"):
        for dirpath, _dirs, names in os.walk(folder / top):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, folder)
                if os.path.islink(full):
                    tree[rel] = ("link", os.readlink(full))
                else:
                    try:
                        tree[rel] = ("file", Path(full).read_text())
                    except (OSError, ValueError):
                        tree[rel] = ("file", "")
    return tree


def _build(where: Path, tree: dict[str, tuple[str, str]]) -> None:
    where.mkdir(mode=0o755)
    for rel, (kind, value) in sorted(tree.items()):
        path = where / rel
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if kind == "link":
            os.symlink(value, path)
        else:
            write_atomic(path, value.encode(), 0o644)


def _record(dest: Path) -> set[str]:
    try:
        doc = jsonbound.loads((dest / RECORD).read_bytes(), limit=1 << 20)
    except (OSError, ValueError):
        return set()
    folders = doc.get("folders") if isinstance(doc, dict) else None
    return {f for f in folders if isinstance(f, str) and f.startswith("models--") and "/" not in f} if isinstance(folders, list) else set()


def _write_record(dest: Path, ours: set[str]) -> None:
    write_atomic(dest / RECORD, (json.dumps({"folders": sorted(ours)}, indent=2) + "\n").encode(), 0o644)


def _sweep(dest: Path) -> None:
    """Temporary folders of an export that was killed (its process is gone)."""
    for entry in os.scandir(dest):
        m = _TEMP.match(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.kill(int(m.group(1)), 0)
            if int(m.group(1)) != os.getpid():
                continue  # alive: another export's
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(entry.path)


def export_hf_cache(zoo: Zoo, dest: Path) -> Export:
    """Make ``dest`` a hub cache of the zoo's verified hub-sourced versions (see the module doc)."""
    if not zoo.root.is_dir():
        raise UsageError(f"{zoo.root}: no zoo here (run zoo-agent apply first, or pass --root)")
    real_root, real_dest = os.path.realpath(zoo.root), os.path.realpath(dest)
    if os.path.commonpath([real_root, real_dest]) == real_root:
        raise UsageError(f"{dest}: is inside the zoo at {zoo.root}; the view lives elsewhere and only links into it")
    if os.path.lexists(dest) and not dest.is_dir():
        raise UsageError(f"{dest}: exists and is not a directory")
    try:
        dest.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{dest}: cannot create the cache directory: {exc.strerror or exc}") from exc
    found, problems = snapshots(zoo)
    result = Export(problems=problems)
    by_folder: dict[str, list[Snapshot]] = {}
    for snap in found:
        by_folder.setdefault(snap.folder, []).append(snap)
    _sweep(dest)
    ours = _record(dest)
    for folder, snaps in sorted(by_folder.items()):
        if len({s.revision for s in snaps}) > 1:
            log.warning("%s: held at several commits (%s); refs/main names %s's", snaps[0].repo, ", ".join(s.artifact for s in snaps), snaps[0].artifact)
        path = dest / folder
        if os.path.lexists(path) and folder not in ours:
            result.problems.append(f"{path}: exists and this export did not make it; left as it is ({snaps[0].repo} not exported)")
            continue
        result.snapshots += snaps
        tree = _desired(snaps)
        if folder in ours and path.is_dir() and not path.is_symlink() and _present(path) == tree:
            continue
        _write_record(dest, ours | {folder})  # the record first: a kill leaves a folder we know, never one we forget
        ours.add(folder)
        fresh = dest / f".{folder}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        _build(fresh, tree)
        if os.path.lexists(path):
            old = dest / f".{folder}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            os.rename(path, old)
            os.rename(fresh, path)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(fresh, path)
    for folder in sorted(ours - set(by_folder)):
        path = dest / folder
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            result.removed.append(folder)
        ours.discard(folder)
        _write_record(dest, ours)
    if not os.path.lexists(dest / RECORD) or _record(dest) != ours:
        _write_record(dest, ours)
    return result
