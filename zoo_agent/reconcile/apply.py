"""Execute a Plan against the zoo: ``apply`` (issue #3).

Level-triggered and idempotent: every step re-derives what it needs from the plan, a
failed step blocks only the later steps of the same artifact, and a rerun after a crash
converges. Each executed step is appended to ``host/actions.jsonl``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo_agent.errors import IntegrityError, InvalidIndex, Problem, SourceError, StoreError, UsageError, ZooError
from zoo_agent.index.model import FileEntry
from zoo_agent.plan import Action, Desired, Kind, Plan, Step, Want
from zoo_agent.reconcile.progress import Progress
from zoo_agent.sources import FetchSettings, Source, open_source
from zoo_agent.store.durable import PUBLISHED_MODE
from zoo_agent.store.host import append_action
from zoo_agent.store.reuse import reuse_file
from zoo_agent.formats import now
from zoo_agent.store.zoo import Zoo, file_record, hash_file, manifest_digest, read_manifest, set_mode, write_manifest

__all__ = ["Moved", "Outcome", "Result", "apply", "refuse_conflicts"]

log = logging.getLogger("zoo_agent")


@dataclass(frozen=True)
class Moved:
    """What a step moved: ``bytes`` in all; for a fetch, how many came over the source and
    how many from files the zoo already held (issue #23), by method."""

    bytes: int = 0
    fetched: int = 0
    reused: int = 0
    reused_files: dict[str, int] = field(default_factory=dict)  # method -> files


@dataclass(frozen=True)
class Outcome:
    step: Step
    ok: bool
    error: str = ""
    exit_code: int = 0
    bytes: int = 0
    seconds: float = 0.0
    moved: Moved = field(default_factory=Moved)


@dataclass
class Result:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def exit_code(self) -> int:
        return max((o.exit_code for o in self.failures), default=0)


def refuse_conflicts(plan: Plan, index_file: str) -> None:
    """A changed published version is bad input: refuse the whole run before touching disk."""
    if plan.refusals:
        raise InvalidIndex(index_file, [Problem(f"/{s.kind}/{s.id}/version", s.describe("apply")) for s in plan.refusals])


@dataclass
class _Run:
    zoo: Zoo
    wants: dict[tuple[Kind, str, str], Want]
    index_dir: Path
    progress: Progress
    settings: FetchSettings
    strict: bool = False
    staged: dict[tuple[Kind, str], Path] = field(default_factory=dict)

    def source(self, want: Want) -> Source:
        source = open_source(want.source, self.index_dir, self.settings)
        source.prepare(self.progress.item)  # an Ollama pull and its digest check; before anything is staged
        return source

    def fetch(self, step: Step) -> Moved:
        want = self.wants[(step.kind, step.id, step.version)]
        # Offline, or a source that is down, does not matter when the zoo holds every file.
        source = self.source(want) if len(step.reuse) < len(want.files) or not want.files else None
        if step.resume:
            staging = self.zoo.adopt_staging(step.kind, step.id, step.resume, step.version)
        else:
            staging = self.zoo.new_staging(step.kind, step.id, step.version)
        try:
            self.zoo.preflight_space(staging, max(0, want.size - step.reused_size - self.zoo.staged_bytes(staging)))
            reused = self.reuse(step, want, staging)
            rest = [entry for entry in want.files if entry.path not in reused]
            if rest and source is None:
                source = self.source(want)  # an origin drifted since the plan was made
            fetched = self.stage(step, rest, staging, source) if source is not None else []
            # Records last: a later link to the same inode moved the ctime of an earlier one.
            files = [file_record(staging / e.path, e.path, e.size, e.sha256) for e in want.files if e.path in reused] + fetched
            self.zoo.seal(staging, want, files)
        except SourceError:
            # The network failed: keep what arrived, so the next run continues from it.
            if not self.zoo.staged_bytes(staging):
                self.zoo.abandon(staging)
            raise
        except BaseException:
            self.zoo.abandon(staging)  # wrong bytes, a failed write or fsync: never trusted, never retried
            raise
        self.staged[(step.kind, step.id)] = staging
        by: dict[str, int] = {}
        for method in reused.values():
            by[method] = by.get(method, 0) + 1
        size = sum(e.size for e in want.files if e.path in reused)
        return Moved(want.size, want.size - size, size, by)

    def reuse(self, step: Step, want: Want, staging: Path) -> dict[str, str]:
        """The planned reuses (path -> method), one after the other (they are quick), then the
        records of the versions whose inodes gained a link are refreshed at once (#23)."""
        entries = {e.path: e for e in want.files}
        manifests: dict[Path, dict[str, dict[str, Any]]] = {}
        done: dict[str, str] = {}
        touched: dict[int, int] = {}
        try:
            for r in step.reuse:
                origin_dir = self.zoo.version_dir(r.origin.kind, r.origin.id, r.origin.version)
                if origin_dir not in manifests:
                    manifests[origin_dir] = {f["path"]: f for f in (read_manifest(origin_dir) or {}).get("files", [])}
                record = manifests[origin_dir].get(r.origin.path)
                if record is not None and (how := reuse_file(self.zoo, staging, entries[r.path], origin_dir, record, touched, strict=self.strict)):
                    done[r.path] = how
        finally:
            self.zoo.refresh_shared(touched)
        return done

    def stage(self, step: Step, entries: list[FileEntry], staging: Path, source: Source) -> list[dict[str, Any]]:
        def one(entry: FileEntry) -> dict[str, Any]:
            advance = self.progress.item(f"{step.id}/{entry.path}", entry.size)
            return self.zoo.stage_file(staging, entry, source, advance)

        # Parallel across files, bounded by --jobs; the first error cancels the rest.
        with ThreadPoolExecutor(max_workers=max(1, self.settings.jobs)) as pool:
            futures = [pool.submit(one, entry) for entry in entries]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def publish(self, step: Step) -> Moved:
        self.zoo.publish(self.staged.pop((step.kind, step.id)), step.kind, step.id, step.version)
        return Moved()

    def record(self, step: Step) -> None:
        """The index's metadata for a version already on disk (issue #35): before its swap, or on a no-op."""
        want = self.wants.get((step.kind, step.id, step.version))
        if want is not None and self.zoo.record_metadata(want):
            log.info("recorded the declared metadata of %s", step.subject)

    def swap(self, step: Step) -> Moved:
        self.record(step)
        if step.previous and step.previous != step.version:
            self.zoo.swap_link(step.kind, step.id, "previous", step.previous)
        self.zoo.swap_link(step.kind, step.id, "current", step.version)
        return Moved()

    def verify(self, step: Step) -> Moved:
        want = self.wants.get((step.kind, step.id, step.version))
        if want is not None and want.source.type == "ollama":
            self.source(want)  # the daemon lost it (observe.py): pull it again and check its digest (issue #35)
        return Moved(reverify(self.zoo, step.kind, step.id, step.version, want))

    def alias(self, step: Step) -> Moved:
        """Link an alias (or remove one no longer declared); a name taken by something else fails here, untouched."""
        if step.version and step.reason:
            raise StoreError(f"{self.zoo.root / 'models' / step.id}: {step.reason}")
        if step.version:
            self.zoo.link_alias(step.id, step.version)
        else:
            self.zoo.unlink_alias(step.id)
        return Moved()

    def remove(self, step: Step) -> Moved:
        # Unlink first: a kill between the two leaves an unlinked version (gc takes it
        # next time), never a link to a half-deleted one.
        for link in ("current", "previous"):
            if self.zoo.read_link(step.kind, step.id, link) == step.version:
                self.zoo.swap_link(step.kind, step.id, link, None)
        freed = self.zoo.remove(step.kind, step.id, step.version)
        self.zoo.remove_artifact_if_empty(step.kind, step.id)
        return Moved(freed)


def _own(zoo: Zoo, path: Path) -> None:
    """Published mode, and (when we may) the zoo's owner: drift is fixed only after the hash matched.
    Unchanged when already right: a chmod moves the ctime another version sharing the inode recorded."""
    set_mode(path, PUBLISHED_MODE)
    owner = zoo.root.stat()
    st = path.stat()
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
        os.chown(path, owner.st_uid, owner.st_gid)


def reverify(zoo: Zoo, kind: Kind, aid: str, version: str, want: Want | None) -> int:
    """Re-hash a version whose files changed on disk; refresh the manifest if they still match."""
    vdir = zoo.version_dir(kind, aid, version)
    manifest = read_manifest(vdir)
    pins = [(f.path, f.sha256, f.size) for f in want.files] if want else [(f["path"], f["sha256"], f["size"]) for f in (manifest or {}).get("files", [])]
    files, total = [], 0
    for path, sha256, size in pins:
        try:
            actual, actual_size = hash_file(vdir / path)
        except FileNotFoundError:
            raise IntegrityError(f"{vdir / path}: missing; run: zoo-agent verify --repair {aid}", file=path) from None
        if (actual, actual_size) != (sha256, size):
            raise IntegrityError(f"{vdir / path}: sha256 {actual}, expected {sha256}; run: zoo-agent verify --repair {aid}", file=path, expected=sha256, actual=actual)
        _own(zoo, vdir / path)  # the bytes are right: now the file is ours again
        files.append(file_record(vdir / path, path, size, sha256))
        total += size
    base = dict(manifest or {"kind": kind, "id": aid, "version": version, "source": want.source.model_dump(mode="json") if want else {}})
    base.update(files=files, verified_at=now())
    base.update(digest=manifest_digest(base), **({"metadata": dict(want.metadata)} if want else {}))  # issue #35
    write_manifest(vdir, base)
    return total


def apply(plan: Plan, zoo: Zoo, desired: Desired, index_dir: Path, progress: Progress, settings: FetchSettings | None = None,
          *, strict: bool = False) -> Result:  # fmt: skip
    """Run the plan's steps in order; ``strict`` re-hashes reused files too (their manifest
    record and stat are trusted otherwise, as a no-op trusts them)."""
    run = _Run(zoo, {(w.kind, w.id, w.version): w for w in desired.wants}, index_dir, progress, settings or FetchSettings(), strict)
    handlers: dict[Action, Callable[[Step], Moved]] = {
        Action.FETCH: run.fetch, Action.PUBLISH: run.publish, Action.SWAP_CURRENT: run.swap,
        Action.VERIFY: run.verify, Action.REMOVE: run.remove, Action.ALIAS: run.alias,
    }  # fmt: skip
    result, blocked = Result(), set()
    for step in plan:
        handler = handlers.get(step.action)
        if handler is None:
            log.debug("%s", step.describe("apply"))
            if step.action is Action.NOOP and (failed := _record_noop(run, step)) is not None:
                result.outcomes.append(failed)
                _log_action(zoo, failed)
            continue
        if (step.kind, step.id) in blocked:
            result.outcomes.append(Outcome(step, False, "skipped: an earlier step for it failed", 1))
            continue
        log.info("%s", step.describe("apply"))
        started = time.monotonic()
        try:
            moved = handler(step)
            outcome = Outcome(step, True, bytes=moved.bytes, seconds=time.monotonic() - started, moved=moved)
        except ZooError as exc:
            outcome = Outcome(step, False, str(exc), exc.exit_code, seconds=time.monotonic() - started)
        except OSError as exc:
            where = exc.filename or zoo.root
            error = StoreError(f"{where}: {exc.strerror or exc} while {step.describe('apply')}")
            outcome = Outcome(step, False, str(error), error.exit_code, seconds=time.monotonic() - started)
        if not outcome.ok:
            blocked.add((step.kind, step.id))
            log.error("%s", outcome.error)
        result.outcomes.append(outcome)
        _log_action(zoo, outcome)
    progress.close()
    return result


def _record_noop(run: _Run, step: Step) -> Outcome | None:
    """A no-op still records corrected metadata; a failure to write it is the step's failure."""
    try:
        run.record(step)
    except OSError as exc:
        error = StoreError(f"{exc.filename or run.zoo.root}: {exc.strerror or exc} while recording the metadata of {step.subject}")
        log.error("%s", error)
        return Outcome(step, False, str(error), error.exit_code)
    return None


def _log_action(zoo: Zoo, outcome: Outcome) -> None:
    """Append-only action log: one JSON line per executed step."""
    step = outcome.step
    record: dict[str, Any] = {
        "time": now(), "action": step.action.value, "kind": step.kind, "id": step.id, "version": step.version,
        "result": "ok" if outcome.ok else "failed", "duration_s": round(outcome.seconds, 4), "bytes": outcome.bytes,
    }  # fmt: skip
    if step.action is Action.FETCH and outcome.ok:
        record.update(fetched_bytes=outcome.moved.fetched, reused_bytes=outcome.moved.reused, reused_files=outcome.moved.reused_files)
    if outcome.error:
        record["error"] = outcome.error
    try:
        append_action(zoo, record)
    except OSError as exc:  # the log must not turn a done step into a failure
        log.warning("cannot append to %s: %s", zoo.actions_log, exc.strerror)


def rollback(zoo: Zoo, seen_kind: Kind, aid: str) -> tuple[str, str]:
    """Point ``current`` back at ``previous`` (and ``previous`` at the old current).

    Instant, because retention keeps the previous version on disk. The next ``apply``
    moves current back to what the index declares: revert the index to make it stick.
    """
    current = zoo.read_link(seen_kind, aid, "current")
    previous = zoo.read_link(seen_kind, aid, "previous")
    if previous is None or not zoo.version_dir(seen_kind, aid, previous).is_dir():
        raise UsageError(f"{zoo.artifact_dir(seen_kind, aid)}: no previous version to roll back to")
    zoo.swap_link(seen_kind, aid, "current", previous)
    zoo.swap_link(seen_kind, aid, "previous", current)
    step = Step(Action.SWAP_CURRENT, seen_kind, aid, previous, previous=current, reason="rollback")
    _log_action(zoo, Outcome(step, True))
    return current or "", previous
