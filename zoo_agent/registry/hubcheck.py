"""A pull request's new pins against the hub's LFS metadata, without downloading (issue #35).

The hub answers ``paths-info`` (``HfApi.get_paths_info``) with each file's git blob size
and, for an LFS file, the sha256 and size of its content: the same numbers an index pins.
So a reviewer learns before merging, and before any host fetches a byte, whether a pin
names what the repository holds at that commit. A small file kept in git itself carries
only a git blob id (sha1 over a header and the bytes): its size is compared, its sha256
needs the bytes, which ``apply`` hashes as it fetches. Sources other than the hub are
skipped, saying so.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from zoo_agent.errors import Problem, UsageError
from zoo_agent.registry.pins import EntryChange, FilePin
from zoo_agent.sources import FetchSettings, retried

__all__ = ["Finding", "HubFile", "check", "compare", "hub_files"]

#: Paths asked for in one paths-info request: well under what the hub pages at, so a
#: repository of thousands of files costs a bounded number of small requests.
PATHS_PER_REQUEST = 100

Checked = Literal["lfs", "size", "skipped", "failed"]


@dataclass(frozen=True)
class HubFile:
    """What the hub says about one path at one commit."""

    size: int  # the git blob's size: the content's for a file in git, the content's too for LFS
    lfs_sha256: str | None = None
    lfs_size: int | None = None


@dataclass(frozen=True)
class Finding:
    where: str
    checked: Checked
    message: str

    @property
    def ok(self) -> bool:
        return self.checked != "failed"

    def line(self) -> str:
        """One line, whatever a path holds (a newline in one cannot split it)."""
        return Problem("", self.message).line(self.where)


def compare(pin: FilePin, hub: HubFile | None) -> tuple[Checked, str]:
    """Pure: one pin against the hub's answer for its path."""
    if hub is None:
        return "failed", "no such file in the repository at that commit"
    if hub.lfs_sha256 is not None:
        if hub.lfs_sha256 != pin.sha256:
            return "failed", f"pinned sha256 {pin.sha256}, the hub's LFS metadata says {hub.lfs_sha256}"
        if hub.lfs_size != pin.size:
            return "failed", f"pinned size {pin.size}, the hub's LFS metadata says {hub.lfs_size}"
        return "lfs", "sha256 and size match the hub's LFS metadata"
    if hub.size != pin.size:
        return "failed", f"pinned size {pin.size}, the hub's git blob is {hub.size} bytes (not an LFS file)"
    return "size", "not an LFS file: the size matches; its sha256 needs the bytes (apply checks it)"


def hub_files(repo: str, revision: str, paths: Sequence[str], settings: FetchSettings) -> dict[str, HubFile]:
    """The hub's paths-info for ``paths`` at ``revision``; a path the hub does not list is absent."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    from zoo_agent.sources.hf import HfRepo  # importing it switches off the hub client's telemetry requests

    if settings.offline:
        raise UsageError(f"hf:{repo}: checking pins asks the hub, and offline mode forbids it")
    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token or False, library_name="zoo-agent")
    source = HfRepo(repo, revision, settings)
    found: dict[str, HubFile] = {}
    for start in range(0, len(paths), PATHS_PER_REQUEST):
        chunk = list(paths[start : start + PATHS_PER_REQUEST])

        def call(chunk: list[str] = chunk) -> list[Any]:
            with source.translated():
                return list(api.get_paths_info(repo, chunk, revision=revision))

        for info in retried(call, source.describe()):
            if isinstance(info, RepoFile) and info.path in chunk:
                lfs = info.lfs
                found[info.path] = HubFile(int(info.size), lfs.sha256 if lfs else None, int(lfs.size) if lfs else None)
    return found


def check(entries: Iterable[EntryChange], settings: FetchSettings) -> list[Finding]:
    """A finding for each new pin of each changed entry: hub sources asked, others skipped."""
    findings: list[Finding] = []
    for change in entries:
        pins = change.new_pins()
        if not pins:
            continue
        where = f"{change.kind}/{change.id}"
        source = change.source
        repo, revision = source.get("repo"), source.get("revision")
        if source.get("type") != "hf" or not isinstance(repo, str) or not isinstance(revision, str):
            what = f"{source.get('type')!s} source" if isinstance(source.get("type"), str) else "source"
            pins_ = f"{len(pins)} new {'pin' if len(pins) == 1 else 'pins'}"
            findings.append(Finding(where, "skipped", f"{pins_} from a {what}: no hub to ask (apply checks the bytes)"))
            continue
        hub = hub_files(repo, revision, [p.path for p in pins], settings)
        for pin in pins:
            checked, message = compare(pin, hub.get(pin.path))
            findings.append(Finding(f"{where} hf:{repo}@{revision[:12]} {pin.path}", checked, message))
    return findings
