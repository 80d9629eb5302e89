"""Pin an artifact: resolve a revision, list files with size and sha256, write the entry (issue #4).

``zoo-agent add hf:ORG/REPO[@REV]`` asks the hub (through huggingface_hub's ``HfApi``):
LFS files carry their sha256 in the tree listing; small non-LFS files are downloaded
and hashed. ``add file:PATH`` hashes local files, which is how a training pipeline
publishes a new adapter or checkpoint. The entry is written in canonical form.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo_agent import jsonbound
from zoo_agent.errors import InvalidIndex, Problem, UsageError
from zoo_agent.index.checks import PICKLE_SUFFIXES
from zoo_agent.index.fit import first_gguf, gguf_header, gguf_lora_rank
from zoo_agent.index.fmt import canonical_text
from zoo_agent.index.load import check_document, read_document
from zoo_agent.index.model import LICENSES
from zoo_agent.sources import FetchSettings, retried
from zoo_agent.sources.file import confined
from zoo_agent.store.durable import write_atomic
from zoo_agent.store.zoo import hash_file

__all__ = [
    "Selection", "adapter_rank", "add_directory", "bump_version", "describe_entry", "file_source", "pin_directory", "pin_hf", "read_provenance",
    "weights_format", "write_entry", "write_index",
]  # fmt: skip

log = logging.getLogger("zoo_agent")

#: A provenance document is a few kB; a file far larger is not one.
PROVENANCE_LIMIT = 1 << 20


@dataclass(frozen=True)
class Selection:
    """Which files of a repository or directory get pinned."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    allow_pickle: bool = False
    allow_code: bool = False


def _matches(path: str, glob: str) -> bool:
    """Globs ignore case: a GGUF repository names its quantizations 'Q4_K_M' or 'q4_k_m' (issue #33)."""
    return fnmatch.fnmatchcase(path.lower(), glob.lower())


def _selected(where: str, paths: list[str], sel: Selection) -> list[str]:
    chosen = [p for p in paths if not sel.include or any(_matches(p, g) for g in sel.include)]
    chosen = sorted(p for p in chosen if not any(_matches(p, g) for g in sel.exclude))
    if not chosen:
        raise UsageError(f"{where}: no files left to pin after --include/--exclude")
    pickles = [p for p in chosen if p.lower().endswith(PICKLE_SUFFIXES)]
    code = [p for p in chosen if p.lower().endswith(".py")]
    if pickles and not sel.allow_pickle:
        raise UsageError(f"{where}: has pickle files, which run code when loaded ({', '.join(pickles[:4])}); "
                         "leave them out with --exclude '*.bin' (and similar) or pass --allow-pickle")
    if code and not sel.allow_code:
        raise UsageError(f"{where}: has repository code ({', '.join(code[:4])}); leave it out with --exclude '*.py' or pass --allow-code")
    return chosen


def weights_format(files: Sequence[Mapping[str, Any]], old: Mapping[str, Any]) -> str | None:
    """'gguf' when the pinned weights are GGUF files only (llama.cpp's), else the entry's old format
    (None: the default, safetensors)."""
    paths = [str(f.get("path", "")).lower() for f in files]
    if any(p.endswith(".gguf") for p in paths) and not any(p.endswith(".safetensors") for p in paths):
        return "gguf"
    return old.get("format") if isinstance(old.get("format"), str) else None


def spdx(license_: str | None) -> str | None:
    """The hub's lowercase license tag as an SPDX id we know, if it is one."""
    by_lower = {name.lower(): name for name in LICENSES}
    return by_lower.get((license_ or "").lower())


def pin_hf(repo: str, revision: str, settings: FetchSettings, sel: Selection) -> tuple[str, list[dict[str, Any]], str | None]:
    """(commit, files, license) of a hub repository at a revision (a branch resolves to its commit)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    from zoo_agent.sources.hf import HfRepo  # importing it switches off the hub client's telemetry requests

    if settings.offline:
        raise UsageError(f"hf:{repo}: pinning asks the hub, and offline mode forbids it")
    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token or False, library_name="zoo-agent")
    source = HfRepo(repo, revision, settings)

    def info_call() -> Any:
        with source.translated():
            return api.model_info(repo, revision=revision)

    info = retried(info_call, source.describe())
    commit = str(info.sha)
    source = HfRepo(repo, commit, settings)

    def tree_call() -> list[RepoFile]:
        with source.translated():
            return [f for f in api.list_repo_tree(repo, revision=commit, recursive=True) if isinstance(f, RepoFile)]

    tree = retried(tree_call, source.describe())
    by_path = {f.path: f for f in tree}
    paths = _selected(f"hf:{repo}@{commit[:12]}", list(by_path), sel)
    files = []
    for path in paths:
        entry = by_path[path]
        if entry.lfs is not None:
            files.append({"path": path, "sha256": entry.lfs.sha256, "size": entry.lfs.size})
        else:  # small git file: the listing has only a git blob id, so hash the bytes
            digest, size = hashlib.sha256(), 0
            for chunk in source.read(path):
                digest.update(chunk)
                size += len(chunk)
            files.append({"path": path, "sha256": digest.hexdigest(), "size": size})
    card = getattr(info, "card_data", None)
    license_ = card.get("license") if card is not None else None
    return commit, files, spdx(license_ if isinstance(license_, str) else None)


def pin_directory(path: Path, sel: Selection) -> list[dict[str, Any]]:
    if not path.is_dir():
        raise UsageError(f"{path}: no such directory")
    paths = _selected(str(path), _walk(path), sel)
    files = []
    for p in paths:
        digest, size = hash_file(path / p)
        if size == 0:
            raise UsageError(f"{path / p}: is empty; an index pins files of positive size (leave it out with --exclude)")
        files.append({"path": p, "sha256": digest, "size": size})
    return files


def _walk(root: Path) -> list[str]:
    """Every file a file source would read: the rule of ``sources.file.confined``, so ``add
    file:`` and ``apply`` agree (links inside the directory followed, links out refused)."""
    real_root = os.path.realpath(root)
    found: list[str] = []
    stack, seen = [""], {real_root}
    while stack:
        rel_dir = stack.pop()
        with os.scandir(root / rel_dir) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = posixpath.join(rel_dir, entry.name) if rel_dir else entry.name
                real = os.path.realpath(entry.path)
                if os.path.commonpath([real_root, real]) != real_root:
                    raise UsageError(f"{root / rel}: is a symlink that leaves the directory (to {real}); copy the file in or remove the link")
                if entry.is_dir():  # a linked directory inside is walked once (no cycles)
                    if real not in seen:
                        seen.add(real)
                        stack.append(rel)
                    continue
                real_file, why = confined(root, rel)
                if real_file is None:
                    raise UsageError(f"{root / rel}: {why}; remove it or copy the file in")
                found.append(rel)
    return sorted(found)


def file_source(directory: Path, index_path: Path) -> dict[str, str]:
    """A file source for ``directory``: relative to the index when below it, else absolute
    (validation refuses a relative path that climbs out with '..')."""
    real, base = directory.resolve(), index_path.resolve().parent
    return {"type": "file", "path": str(real.relative_to(base)) if real.is_relative_to(base) else str(real)}


def write_index(path: Path, text: str) -> None:
    """Replace the index atomically, through a symlink to its target: replacing the link
    itself would cut the user's checked-out file loose (issue #17)."""
    write_atomic(Path(os.path.realpath(path)), text.encode())


def adapter_rank(files_dir: Path) -> int | None:
    """A peft adapter's ``r`` (adapter_config.json), else a GGUF adapter's rank from its header."""
    try:
        return int(json.loads((files_dir / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = first_gguf(files_dir) if files_dir.is_dir() else None
    header = gguf_header(found) if found is not None else None
    return gguf_lora_rank(header) if header is not None else None


def write_entry(index_path: Path, kind: str, aid: str, entry: dict[str, Any], *, update: bool) -> None:
    """Put the entry into the index and write it canonically, only if the result is valid."""
    document = read_document(index_path, str(index_path))
    section = document.setdefault(kind, {})
    if aid in section and not update:
        raise UsageError(f"{index_path}: /{kind}/{aid} already exists; use --update {aid} to move it to a new revision")
    section[aid] = entry
    _, problems = check_document(document)
    if problems:
        raise InvalidIndex(str(index_path), problems)
    write_index(index_path, canonical_text(document))


def existing(index_path: Path, aid: str) -> tuple[str, dict[str, Any]]:
    document = read_document(index_path, str(index_path))
    for kind in ("models", "loras"):
        if aid in document.get(kind, {}):
            return kind, dict(document[kind][aid])
    raise UsageError(f"{index_path}: no model or lora '{aid}' to update")



def read_provenance(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (``add --provenance FILE``), bounded; a problem is one line naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not hang the job
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UsageError(f"{path}: the provenance file is not a regular file")
            data = f.read(PROVENANCE_LIMIT + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the provenance file: {exc.strerror or exc}") from None
    try:
        document = jsonbound.loads(data, limit=PROVENANCE_LIMIT)
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None
    if not isinstance(document, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(document), "null")
        raise UsageError(f"{path}: expected a JSON object (the entry's provenance), got {kind}")
    return document


def bump_version(label: str) -> str | None:
    """The next label after ``label``: its trailing number plus one, width kept ('7' -> '8', 'v09' -> 'v10',
    'run-7' -> 'run-8', '2026.01.1' -> '2026.01.2'); None when it ends in no number."""
    m = re.search(r"[0-9]+$", label)
    if m is None:
        return None
    return label[: m.start()] + str(int(m.group()) + 1).zfill(len(m.group()))


def _pins(files: Sequence[Mapping[str, Any]]) -> set[tuple[Any, Any, Any]]:
    return {(f.get("path"), f.get("sha256"), f.get("size")) for f in files}


def add_directory(index_path: Path, directory: Path | None, aid: str, *, update: bool = False, version: str | None = None,
                  license_: str | None = None, lora_for: str | None = None, rank: int | None = None, sel: Selection = Selection(),
                  provenance: Mapping[str, Any] | None = None, provenance_file: str | None = None, tags: Sequence[str] = (),
                  description: str | None = None) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """Pin ``directory`` into the index as entry ``aid`` and write it: a training job's one step (issue #35).
    Returns (kind, the entry written). Nothing is published: ``apply`` does that.

    ``update``: the entry exists; ``directory`` defaults to its file source, the version is bumped
    in place (unless given), and the files must differ from the ones it pins, else nothing changes.
    ``provenance`` replaces the entry's whole; without it an update keeps the old one (and says so)."""
    kind, old, directory = _target(index_path, directory, aid, update, lora_for)
    sel = Selection(sel.include, sel.exclude, sel.allow_pickle or bool(old.get("allow_pickle")), sel.allow_code or bool(old.get("allow_code")))
    files = pin_directory(directory, sel)
    if update:
        version = _next_version(directory, kind, aid, old, files, version, provenance)
    elif version is None:
        raise UsageError("add file:PATH needs --version LABEL (there is no commit to name it after)")
    license_ = license_ or old.get("license")
    if license_ is None:
        raise UsageError("add file:PATH needs --license SPDX (or 'other')")
    entry: dict[str, Any] = {**old, "version": version, "source": file_source(directory, index_path), "files": files, "license": license_}
    if fmt := weights_format(files, old):
        entry["format"] = fmt
    if sel.allow_pickle:
        entry["allow_pickle"] = True
    if sel.allow_code:
        entry["allow_code"] = True
    if description is not None:
        entry["description"] = description
    if provenance is not None:
        entry["provenance"] = dict(provenance)
    if tags:
        entry["tags"] = list(tags)
    if kind == "loras":
        entry["base_model"] = lora_for or old.get("base_model")
        entry["rank"] = rank or old.get("rank") or adapter_rank(directory)
        if entry["rank"] is None:
            raise UsageError(f"{directory}: a LoRA needs --rank (no adapter_config.json with 'r', nor a GGUF adapter, was found)")
    try:
        write_entry(index_path, kind, aid, entry, update=update)
    except InvalidIndex as exc:
        raise _blame_provenance(exc, f"/{kind}/{aid}/provenance", provenance_file) from None
    return kind, entry


def _target(index_path: Path, directory: Path | None, aid: str, update: bool, lora_for: str | None) -> tuple[str, dict[str, Any], Path]:
    """(kind, the entry as it is, the directory to pin): an update's defaults to its file source."""
    if update:
        kind, old = existing(index_path, aid)
        source: dict[str, Any] = old["source"] if isinstance(old.get("source"), dict) else {}
        if directory is None:
            if source.get("type") != "file" or not isinstance(source.get("path"), str):
                raise UsageError(f"{index_path}: /{kind}/{aid}: is not a file: entry; name the directory to pin (file:PATH)")
            directory = index_path.resolve().parent / source["path"]
        return kind, old, directory
    if directory is None:
        raise UsageError(f"{aid}: name the directory to pin (file:PATH)")
    return ("loras" if lora_for else "models"), {}, directory


def _next_version(directory: Path, kind: str, aid: str, old: Mapping[str, Any], files: Sequence[Mapping[str, Any]], version: str | None,
                  provenance: Mapping[str, Any] | None) -> str:  # fmt: skip
    """An update's version: given, or the old one bumped; refused when the files are the ones pinned already."""
    previous = old.get("version")
    if _pins(files) == _pins(old.get("files") or []):
        raise UsageError(f"{directory}: holds exactly the files {kind[:-1]} {aid} {previous} pins (paths, sizes, sha256); nothing to update")
    if version is None:
        version = bump_version(str(previous or ""))
        if version is None:
            raise UsageError(f"{kind[:-1]} {aid}: version {previous!r} ends in no number to bump; pass --version LABEL")
    elif version == previous:
        raise UsageError(f"{kind[:-1]} {aid}: version {previous} is already pinned with other files, and a published version is "
                         "immutable; pass a new --version (or leave it out to bump it)")  # fmt: skip
    if provenance is None and old.get("provenance"):
        log.warning("%s %s %s keeps the provenance of %s; pass --provenance to describe the new run", kind[:-1], aid, version, previous)
    return version


def describe_entry(index_path: Path, kind: str, aid: str, old: Mapping[str, Any], *, provenance: Mapping[str, Any] | None = None,
                   provenance_file: str | None = None, tags: Sequence[str] = (), description: str | None = None) -> list[str]:  # fmt: skip
    """``add --update`` of an entry whose source did not move (issue #35): the metadata given is
    written into it, and nothing else: the same bytes keep the same version. Returns the fields
    that changed (none: nothing is written)."""
    given = {"provenance": dict(provenance) if provenance is not None else None, "tags": list(tags) or None, "description": description}
    changed = {k: v for k, v in given.items() if v is not None and old.get(k) != v}
    if changed:
        try:
            write_entry(index_path, kind, aid, {**old, **changed}, update=True)
        except InvalidIndex as exc:
            raise _blame_provenance(exc, f"/{kind}/{aid}/provenance", provenance_file) from None
    return list(changed)


def _blame_provenance(exc: InvalidIndex, at: str, provenance_file: str | None) -> InvalidIndex:
    """Problems only inside the provenance a file supplied are that file's, located inside it."""
    if provenance_file is None or not all(p.pointer == at or p.pointer.startswith(at + "/") for p in exc.problems):
        return exc
    return InvalidIndex(provenance_file, [Problem(p.pointer.removeprefix(at), p.message) for p in exc.problems])
