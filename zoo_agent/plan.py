"""Desired + Observed in, a Plan out: the pure heart of reconciliation (issue #3).

``plan`` and ``plan_gc`` decide; they never touch the disk. ``reconcile.apply`` executes
a Plan. The same ``Step.describe`` prints "would fetch …" for ``plan`` and "fetching …"
for ``apply`` (switch-to-configuration's habit: one code path, two tenses).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from zoo_agent.errors import UsageError
from zoo_agent.formats import human_bytes
from zoo_agent.index.digest import version_digest
from zoo_agent.index.model import FileEntry, HostEntry, Index, Source

__all__ = [
    "Action", "Desired", "Have", "Observed", "Origin", "Plan", "Reuse", "Seen", "Step", "Want",
    "desired_for_host", "desired_for_tenant", "holdings", "host_id", "plan", "plan_aliases", "plan_gc", "plan_versions",
    "route_embedding_models",
]  # fmt: skip

Kind = Literal["models", "loras"]
Tense = Literal["plan", "apply"]


class Action(enum.Enum):
    FETCH = "fetch"
    PUBLISH = "publish"
    SWAP_CURRENT = "swap-current"
    VERIFY = "verify"
    RETAIN = "retain"
    REMOVE = "remove"
    NOOP = "no-op"
    REFUSE = "refuse"
    ALIAS = "alias"  # link models/<alias> to models/<id> (``version``), or remove the link (``version`` "")


@dataclass(frozen=True)
class Want:
    """One artifact version the host must hold."""

    kind: Kind
    id: str
    version: str
    source: Source
    files: tuple[FileEntry, ...]
    # The declared facts manifest.json records beside the files (issue #35); they never decide a step.
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def digest(self) -> str:
        """The whole-version digest (index/digest.py): the files' pins, or an 'ollama' source's manifest digest."""
        ollama = self.source.digest if self.source.type == "ollama" else None
        return version_digest(((f.path, f.sha256) for f in self.files), ollama)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def pins(self) -> frozenset[tuple[str, str, int]]:
        return frozenset((f.path, f.sha256, f.size) for f in self.files)


@dataclass(frozen=True)
class Desired:
    host: str
    wants: tuple[Want, ...]
    keep_versions: int = 2
    # Declared for on-demand tenants (issue #20): apply does not fetch them, gc keeps what is on disk.
    on_demand: tuple[Want, ...] = ()
    # alias -> model id for the models this host holds (issue #35); None: a partial slice, whose apply leaves aliases alone.
    aliases: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Have:
    """A published version on disk, as its manifest and a stat of its files describe it."""

    version: str
    pins: frozenset[tuple[str, str, int]] | None  # None: manifest missing or unreadable
    drifted: tuple[str, ...] = ()  # files whose stat no longer matches the manifest
    published_at: str = ""  # when the version was sealed; gc keeps the newest by it
    size: int = 0
    verified_at: str = ""  # the last full re-hash (a reverify moves this, never published_at)
    drifted_paths: frozenset[str] = frozenset()  # the paths of ``drifted``: never reused (issue #23)
    daemon: tuple[str, str] | None = None  # an Ollama version: the daemon's name:tag and digest it stands for (issue #35)


@dataclass(frozen=True)
class Seen:
    """One artifact directory on disk."""

    kind: Kind
    id: str
    versions: Mapping[str, Have] = field(default_factory=dict)
    current: str | None = None
    previous: str | None = None
    leftovers: tuple[str, ...] = ()  # staging dirs and temp links of killed runs


@dataclass(frozen=True)
class Observed:
    seen: Mapping[tuple[Kind, str], Seen] = field(default_factory=dict)
    in_use: frozenset[tuple[Kind, str, str]] = frozenset()  # what a running resident has loaded


@dataclass(frozen=True)
class Origin:
    """A published file whose bytes another version can reuse instead of fetching them (issue #23)."""

    kind: Kind
    id: str
    version: str
    path: str

    @property
    def label(self) -> str:
        return f"{'model' if self.kind == 'models' else 'lora'} {self.id} {self.version}"


@dataclass(frozen=True)
class Reuse:
    """FETCH: the file ``path`` of the new version comes from ``origin`` (same sha256 and size)."""

    path: str
    size: int
    origin: Origin


@dataclass(frozen=True)
class Step:
    action: Action
    kind: Kind
    id: str
    version: str = ""
    size: int = 0
    files: int = 0
    previous: str | None = None  # SWAP_CURRENT: the version current pointed at before
    reason: str = ""
    resume: str = ""  # FETCH: a killed run's staging directory of this version to continue
    reuse: tuple[Reuse, ...] = ()  # FETCH: files the zoo already holds (issue #23)

    @property
    def reused_size(self) -> int:
        return sum(r.size for r in self.reuse)

    @property
    def subject(self) -> str:
        noun = "model" if self.kind == "models" else "lora"
        return f"{noun} {self.id} {self.version}".rstrip()

    def describe(self, tense: Tense) -> str:
        would = tense == "plan"
        a, subject = self.action, self.subject
        if a is Action.FETCH:
            again = ", resuming an interrupted fetch" if self.resume else ""
            if not self.reuse:
                return f"{'would fetch' if would else 'fetching'} {subject} ({self.files} files, {human_bytes(self.size)}{again})"
            origins = list(dict.fromkeys(r.origin.label for r in self.reuse))
            named = ", ".join(origins[:3]) + (f" and {len(origins) - 3} more" if len(origins) > 3 else "")
            reuse = f"{'would reuse' if would else 'reusing'} {_files(len(self.reuse))} ({human_bytes(self.reused_size)}) from {named}"
            rest = self.files - len(self.reuse)
            fetch = f"{'would fetch' if would else 'fetching'} {_files(rest)} ({human_bytes(self.size - self.reused_size)})" if rest else "nothing to fetch"
            return f"{subject}: {reuse}; {fetch}{again}"
        if a is Action.PUBLISH:
            return f"{'would publish' if would else 'publishing'} {subject}"
        if a is Action.SWAP_CURRENT:
            was = f" (was {self.previous})" if self.previous else ""
            return f"{'would switch' if would else 'switching'} {subject} to current{was}"
        if a is Action.VERIFY:
            return f"{'would re-verify' if would else 're-verifying'} {subject}: {self.reason}"
        if a is Action.RETAIN:
            return f"{'would keep' if would else 'keeping'} {subject} ({self.reason})"
        if a is Action.REMOVE:
            return f"{'would remove' if would else 'removing'} {subject} ({self.reason})"
        if a is Action.NOOP:
            return f"{subject} is up to date"
        if a is Action.ALIAS:
            if not self.version:
                return f"{'would remove' if would else 'removing'} alias {self.id} ({self.reason})"
            if self.reason:
                return f"cannot link alias {self.id} to model {self.version}: {self.reason}"
            return f"{'would link' if would else 'linking'} alias {self.id} to model {self.version}"
        return f"cannot publish {subject}: {self.reason}"


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...] = ()

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    @property
    def changes(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.action not in (Action.NOOP, Action.RETAIN))

    @property
    def refusals(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.action is Action.REFUSE)


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def host_id(idx: Index, host: str) -> str:
    """The host's id in the index: its name lowercased, or the short name when only that is declared."""
    name = host.lower()
    if name not in idx.hosts and (short := name.split(".")[0]) in idx.hosts:
        return short
    return name


def _host_entry(idx: Index, host: str) -> HostEntry:
    entry = idx.hosts.get(host.lower())
    if entry is None:
        known = ", ".join(sorted(idx.hosts)) or "none"
        raise UsageError(f"host '{host}' is not in the index (hosts: {known}); pass --host or set ZOO_HOST")
    return entry


def _tenant_wants(idx: Index, tenant_id: str) -> Iterator[tuple[Kind, str]]:
    """What one tenant loads: its model, its adapters, the embedding model of adapter selection."""
    tenant = idx.tenants[tenant_id]
    if tenant.is_remote:
        return  # answered by a server elsewhere (backend 'openai'): nothing of it is on disk
    yield "models", tenant.model
    for lora in tenant.loras:
        yield "loras", lora
    if tenant.adapter_selection is not None:
        yield "models", tenant.adapter_selection.embedding_model


def route_embedding_models(idx: Index, entry: HostEntry) -> list[str]:
    """The embedding models of the host's routes with similarity rules: the router loads them
    itself at start (issue #21), so they are fetched eagerly, like a pinned tenant's model."""
    routes = [idx.routes[rid] for rid in entry.routes if rid in idx.routes]
    return list(dict.fromkeys(r.embedding_model for r in routes if r.embedding_model is not None and any(x.when.similar_to for x in r.rules)))


def _want(idx: Index, kind: Kind, aid: str) -> Want:
    art = idx.models[aid] if kind == "models" else idx.loras[aid]
    return Want(kind, aid, art.version, art.source, tuple(art.files), art.metadata())


def desired_for_host(idx: Index, host: str) -> Desired:
    """The host's slice: every served tenant's model and adapters, plus its available models.

    An on-demand tenant's artifacts (unless an eager tenant needs them too) go to
    ``on_demand``: declared, so gc keeps them, but fetched only by its first request."""
    entry = _host_entry(idx, host)
    wants: dict[tuple[Kind, str], Want] = {}
    later: dict[tuple[Kind, str], Want] = {}
    for tid in entry.served():
        into = later if idx.tenants[tid].fetch == "on-demand" else wants
        for kind, aid in _tenant_wants(idx, tid):
            into.setdefault((kind, aid), _want(idx, kind, aid))
    for model in [*route_embedding_models(idx, entry), *entry.available]:
        wants.setdefault(("models", model), _want(idx, "models", model))
    on_demand = tuple(w for key, w in later.items() if key not in wants)
    held = dict.fromkeys(w.id for w in (*wants.values(), *on_demand) if w.kind == "models")
    aliases = {alias: mid for mid in held for alias in idx.models[mid].aliases}
    return Desired(host.lower(), tuple(wants.values()), entry.retention.keep_versions, on_demand, aliases)


def desired_for_tenant(idx: Index, host: str, tenant: str) -> Desired:
    """One served tenant's slice, on-demand or not (``apply --tenant``, fetch on first use)."""
    entry = _host_entry(idx, host)
    if tenant not in entry.served():
        served = ", ".join(entry.served()) or "none"
        raise UsageError(f"tenant '{tenant}' is not served by host '{host.lower()}' (its tenants: {served})")
    wants = {key: _want(idx, *key) for key in _tenant_wants(idx, tenant)}
    return Desired(host.lower(), tuple(wants.values()), entry.retention.keep_versions)


def plan(desired: Desired, observed: Observed) -> Plan:
    """Steps that make the zoo hold every wanted version as current. Deletes no version."""
    steps: list[Step] = []
    wanted = {(w.kind, w.id): w for w in desired.wants}
    resumable: dict[tuple[Kind, str], str] = {}
    for key, seen in observed.seen.items():
        want = wanted.get(key)
        for name in seen.leftovers:
            # A killed fetch of the version still wanted is continued, not thrown away (#4).
            if want and name.startswith(f"{want.version}.tmp.") and ".tmp.rm." not in name and key not in resumable:
                resumable[key] = name
                continue
            steps.append(Step(Action.REMOVE, seen.kind, seen.id, name, reason="left by an interrupted run"))
    missing = any(want.version not in getattr(observed.seen.get((want.kind, want.id)), "versions", {}) for want in desired.wants)
    held = holdings(observed) if missing else {}  # a no-op pays nothing for the index (issue #23)
    for want in desired.wants:
        planned = _plan_want(want, observed.seen.get((want.kind, want.id)), held, resumable.get((want.kind, want.id), ""))
        _will_hold(held, want, planned)
        steps += planned
    return Plan(tuple(steps))


#: Why an alias cannot be linked: its name is taken on disk by something the zoo did not make.
ALIAS_OCCUPIED = "models/{name} exists and the zoo did not make it; move it away (or run zoo-agent gc if it is an old model) or rename the alias"


def plan_aliases(desired: Desired, present: Mapping[str, str | None]) -> Plan:
    """Steps that make ``models/<alias>`` link each declared alias to its model and remove the
    links of aliases no longer declared (issue #35). ``present`` says what each name is on disk:
    the model id a link the zoo made names, "" for nothing, None for something it did not make,
    which is never replaced or removed: its step fails, saying so."""
    if desired.aliases is None:
        return Plan()
    steps = []
    for name, mid in sorted(desired.aliases.items()):
        have = present.get(name, "")
        if have != mid:
            steps.append(Step(Action.ALIAS, "models", name, mid, reason=ALIAS_OCCUPIED.format(name=name) if have is None else ""))
    for name, have in sorted(present.items()):
        if name not in desired.aliases and have:
            steps.append(Step(Action.ALIAS, "models", name, "", reason="no longer declared"))
    return Plan(tuple(steps))


def _will_hold(held: dict[tuple[str, int], tuple[Origin, ...]], want: Want, planned: list[Step]) -> None:
    """A version this plan fetches is published before the next artifact's fetch runs, so a
    model and an adapter that share a tokenizer download it once even on a fresh host. If
    that fetch fails, the later one finds no manifest there and fetches the file itself."""
    if planned and planned[0].action is Action.FETCH:
        for f in want.files:
            held[(f.sha256, f.size)] = (*held.get((f.sha256, f.size), ()), Origin(want.kind, want.id, want.version, f.path))


def plan_versions(wants: tuple[Want, ...], observed: Observed) -> Plan:
    """Fetch and publish versions that are not (or no longer) on disk, moving no link: how
    ``verify --repair`` rebuilds a damaged version the index no longer declares (issue #23)."""
    held = holdings(observed)
    steps: list[Step] = []
    for want in wants:
        seen = observed.seen.get((want.kind, want.id))
        if seen is None or want.version not in seen.versions:
            planned = _plan_want(want, seen, held)[:2]
            _will_hold(held, want, planned)
            steps += planned
    return Plan(tuple(steps))


def holdings(observed: Observed) -> dict[tuple[str, int], tuple[Origin, ...]]:
    """(sha256, size) -> every published file holding those bytes, from the manifests observe
    read anyway: the zoo's index of hashes costs no extra read and is never stale (issue #23).
    A drifted file, or a version without a readable manifest, holds nothing."""
    held: dict[tuple[str, int], list[Origin]] = {}
    for (kind, aid), seen in sorted(observed.seen.items()):
        for version, have in sorted(seen.versions.items()):
            for path, sha256, size in sorted(have.pins or ()):
                if path not in have.drifted_paths:
                    held.setdefault((sha256, size), []).append(Origin(kind, aid, version, path))
    return {key: tuple(origins) for key, origins in held.items()}


def _reuse(want: Want, seen: Seen | None, held: Mapping[tuple[str, int], tuple[Origin, ...]]) -> tuple[Reuse, ...]:
    """Where each file of ``want`` can come from without the network: the artifact's own
    current version first, then its other versions, then any other artifact."""
    current = seen.current if seen else None

    def rank(o: Origin) -> tuple[bool, bool, str, str, str, str]:
        return ((o.kind, o.id) != (want.kind, want.id), o.version != current, o.kind, o.id, o.version, o.path)

    found = []
    for f in want.files:
        if candidates := held.get((f.sha256, f.size)):
            found.append(Reuse(f.path, f.size, min(candidates, key=rank)))
    return tuple(found)


def _plan_want(want: Want, seen: Seen | None, held: Mapping[tuple[str, int], tuple[Origin, ...]], resume: str = "") -> list[Step]:
    kind, aid, version = want.kind, want.id, want.version
    current = seen.current if seen else None
    have = seen.versions.get(version) if seen else None
    swap = Step(Action.SWAP_CURRENT, kind, aid, version, previous=current)
    if have is None:
        return [
            Step(Action.FETCH, kind, aid, version, size=want.size, files=len(want.files), resume=resume, reuse=_reuse(want, seen, held)),
            Step(Action.PUBLISH, kind, aid, version),
            swap,
        ]
    if have.pins is not None and have.pins != want.pins():
        changed = sorted({p for p, *_ in have.pins ^ want.pins()})
        return [Step(Action.REFUSE, kind, aid, version, reason=(
            f"it is already published with other files ({', '.join(changed[:3])}); "
            "published versions are immutable: bump the version"))]  # fmt: skip
    steps = []
    if have.pins is None:
        steps.append(Step(Action.VERIFY, kind, aid, version, size=want.size, reason="its manifest is missing"))
    elif have.drifted:
        steps.append(Step(Action.VERIFY, kind, aid, version, size=have.size, reason=f"changed on disk: {', '.join(have.drifted[:3])}"))
    steps.append(swap if current != version else Step(Action.NOOP, kind, aid, version))
    return steps


def plan_gc(desired: Desired, observed: Observed) -> Plan:
    """Remove versions beyond retention and artifacts this host no longer declares.

    Never removes ``current`` of a declared artifact (on-demand ones included), ``previous``
    while retention allows it, the declared version, or anything a running resident has loaded.
    """
    wanted = {(w.kind, w.id): w.version for w in (*desired.on_demand, *desired.wants)}
    steps: list[Step] = []
    for (kind, aid), seen in sorted(observed.seen.items()):
        steps += [Step(Action.REMOVE, kind, aid, name, reason="left by an interrupted run") for name in seen.leftovers]
        in_use = {v for (k, i, v) in observed.in_use if (k, i) == (kind, aid)}
        if (kind, aid) in wanted:
            keep = _keep(seen, wanted[(kind, aid)], desired.keep_versions) | in_use
        else:
            keep = in_use
        for version, have in sorted(seen.versions.items()):
            if version in keep:
                why = "in use by the resident" if version in in_use else _role(seen, version)
                steps.append(Step(Action.RETAIN, kind, aid, version, size=have.size, reason=why))
            else:
                why = "no longer declared for this host" if (kind, aid) not in wanted else f"beyond retention ({desired.keep_versions})"
                steps.append(Step(Action.REMOVE, kind, aid, version, size=have.size, reason=why))
    return Plan(tuple(steps))


def _keep(seen: Seen, declared: str, keep_versions: int) -> set[str]:
    first = [v for v in (seen.current, declared, seen.previous) if v is not None and v in seen.versions]
    order = list(dict.fromkeys(first))  # current and declared are usually the same version
    order += sorted((v for v in seen.versions if v not in order), key=lambda v: seen.versions[v].published_at, reverse=True)
    keep = set(order[: max(keep_versions, 1)])
    if seen.current is not None and seen.current in seen.versions:
        keep.add(seen.current)  # never remove what readers resolve right now
    if declared in seen.versions:
        keep.add(declared)
    return keep


def _role(seen: Seen, version: str) -> str:
    if version == seen.current:
        return "current"
    if version == seen.previous:
        return "previous"
    return "retained"
