"""Semantic checks of an index: what a schema cannot say. Pure functions, no I/O.

Each check yields ``Problem``s located by JSON pointer; ``validate.py`` runs them all
so a user sees every problem at once.
"""

from __future__ import annotations

import difflib
import ipaddress
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from zoo_agent.errors import Problem
from zoo_agent.index.fit import check_host, pinned_tenants
from zoo_agent.index.model import OWN_CREDENTIALS, ArtifactEntry, Index, Provenance, RouteEntry
from zoo_agent.index.schema import pointer

__all__ = ["PICKLE_SUFFIXES", "TRANSFORMERS_FORMATS", "endpoint_key", "endpoint_problem", "placeholder_problems", "semantic_problems"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: What transformers and peft load (``from_pretrained``): a gguf, onnx or ollama entry would
#: fail at the first request, after a fetch of gigabytes (issue #31).
TRANSFORMERS_FORMATS = ("safetensors", "pickle")
_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
# A whole value that is a placeholder ("TODO", "xxx", "changeme-later"), or any text that
# carries the registry stub marker; prose that merely mentions "todo lists" passes.
_PLACEHOLDER = re.compile(
    r"(?i)^(?:todo|stub|fixme|tbd|xxx+|changeme|change-me|placeholder|replace-?me)(?:[-_:. ].*)?$|TODO-STUB"
)


def placeholder_problems(document: Any) -> Iterator[Problem]:
    """Scan the raw document, so stubs are named even where the structure is broken.

    An explicit stack, not recursion: this walks every value of every index, on every
    run, and a no-op ``apply`` should cost almost nothing (issue #3's benchmark).
    """
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), document)]
    while stack:
        at, node = stack.pop()
        if isinstance(node, dict):
            stack.extend(((*at, key), value) for key, value in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend(((*at, i), value) for i, value in reversed(list(enumerate(node))))
        elif isinstance(node, str) and _PLACEHOLDER.search(node):
            field = at[-1] if at else "value"
            yield Problem(pointer(at), f"'{field}' still holds a placeholder ({node!r}); fill in the real value")


def semantic_problems(idx: Index) -> list[Problem]:
    checks: list[Callable[[Index], Iterator[Problem]]] = [
        _references,
        _tenant_loras_fit_model,
        _compositions_fit,
        _backends,
        _artifact_files,
        _artifact_safety,
        _hosts_serve,
        _weights_fit,
        _routes,
        _peers,
        _registry_metadata,
        _aliases,
        _embedding_tenants,
        _remote_tenants,
    ]
    return [problem for check in checks for problem in check(idx)]


def _unknown(kind: str, name: str, known: Mapping[str, object]) -> str:
    listed = ", ".join(sorted(known)) or "none"
    return f"unknown {kind} '{name}' (declared {kind}s: {listed})"


def _references(idx: Index) -> Iterator[Problem]:
    for tid, tenant in idx.tenants.items():
        if tenant.model not in idx.models and tenant.model:  # none at all: _remote_tenants says what it needs
            yield Problem(pointer(("tenants", tid, "model")), _unknown("model", tenant.model, idx.models))
        for i, lora in enumerate(tenant.loras):
            if lora not in idx.loras:
                yield Problem(pointer(("tenants", tid, "loras", i)), _unknown("lora", lora, idx.loras))
        if len(set(tenant.loras)) != len(tenant.loras):
            yield Problem(pointer(("tenants", tid, "loras")), "lists an adapter more than once")
        if tenant.adapter_selection is not None and tenant.adapter_selection.embedding_model not in idx.models:
            yield Problem(pointer(("tenants", tid, "adapter_selection", "embedding_model")),
                          _unknown("model", tenant.adapter_selection.embedding_model, idx.models))
    for lid, adapter in idx.loras.items():
        if adapter.base_model not in idx.models:
            yield Problem(pointer(("loras", lid, "base_model")), _unknown("model", adapter.base_model, idx.models))
    for hid, host in idx.hosts.items():
        if host.resident is not None and host.resident not in idx.tenants:
            yield Problem(pointer(("hosts", hid, "resident")), _unknown("tenant", host.resident, idx.tenants))
        for i, tid in enumerate(host.tenants):
            if tid not in idx.tenants:
                yield Problem(pointer(("hosts", hid, "tenants", i)), _unknown("tenant", tid, idx.tenants))
        for i, model in enumerate(host.available):
            if model not in idx.models:
                yield Problem(pointer(("hosts", hid, "available", i)), _unknown("model", model, idx.models))


def _compositions_fit(idx: Index) -> Iterator[Problem]:
    """A composition needs all its adapters loaded at once (issue #21): more than max_loras could never be built."""
    for tid, tenant in idx.tenants.items():
        selection = tenant.adapter_selection
        if selection is not None and selection.max_adapters > tenant.resources.max_loras:
            yield Problem(pointer(("tenants", tid, "adapter_selection", "max_adapters")),
                          f"composes up to {selection.max_adapters} adapters, more than resources.max_loras ({tenant.resources.max_loras}) keeps loaded")


def _tenant_loras_fit_model(idx: Index) -> Iterator[Problem]:
    for tid, tenant in idx.tenants.items():
        if tenant.model not in idx.models:
            continue  # already reported as an unknown model; don't cascade
        for i, lid in enumerate(tenant.loras):
            lora = idx.loras.get(lid)
            if lora is not None and lora.base_model != tenant.model:
                yield Problem(
                    pointer(("tenants", tid, "loras", i)),
                    f"adapter '{lid}' is built for model '{lora.base_model}', but the tenant runs '{tenant.model}'",
                )


def _backends(idx: Index) -> Iterator[Problem]:
    for tid, tenant in idx.tenants.items():
        model = idx.models.get(tenant.model)
        if model is None or tenant.backend == "openai":
            continue  # a remote tenant: _remote_tenants
        is_ollama = model.source.type == "ollama"
        if tenant.backend == "ollama" and not is_ollama:
            yield Problem(pointer(("tenants", tid, "backend")), f"backend 'ollama' needs a model with an 'ollama' source; '{tenant.model}' has '{model.source.type}'")
        if tenant.backend == "transformers" and is_ollama:
            yield Problem(pointer(("tenants", tid, "backend")), f"model '{tenant.model}' comes from Ollama; set backend to 'ollama'")
        if tenant.backend == "transformers" and not is_ollama and model.format not in TRANSFORMERS_FORMATS:
            yield Problem(pointer(("tenants", tid, "backend")),
                          f"backend 'transformers' loads safetensors (or pickle) weights; model '{tenant.model}' has format '{model.format}'")
        if tenant.backend == "ollama" and tenant.loras:
            yield Problem(pointer(("tenants", tid, "loras")), "the 'ollama' backend cannot attach LoRA adapters at runtime")
        if tenant.backend == "llama.cpp" and model.format != "gguf":
            yield Problem(pointer(("tenants", tid, "backend")),
                          f"backend 'llama.cpp' loads a 'gguf' model; model '{tenant.model}' has format '{model.format}'")
        for i, lid in enumerate(tenant.loras):
            lora = idx.loras.get(lid)
            if lora is None or lora.source.type == "ollama" or tenant.backend not in ("transformers", "llama.cpp"):
                continue  # reported elsewhere
            if tenant.backend == "llama.cpp" and lora.format != "gguf":
                yield Problem(pointer(("tenants", tid, "loras", i)),
                              f"backend 'llama.cpp' loads GGUF adapters (convert_lora_to_gguf.py); adapter '{lid}' has format '{lora.format}'")
            if tenant.backend == "transformers" and lora.format == "gguf":
                yield Problem(pointer(("tenants", tid, "loras", i)),
                              f"backend 'transformers' loads peft adapters (safetensors); adapter '{lid}' has format 'gguf'")
        if tenant.backend not in ("llama.cpp", "openai"):  # a remote tenant's resources: _remote_tenants
            for field in ("gpu_layers", "kv_cache_type"):
                if getattr(tenant.resources, field) is not None:
                    yield Problem(pointer(("tenants", tid, "resources", field)),
                                  f"applies to backend 'llama.cpp' only; this tenant's backend is '{tenant.backend}'")
        if tenant.adapter_selection is not None:
            at = pointer(("tenants", tid, "adapter_selection", "embedding_model"))
            yield from _embedder_problems(idx, tenant.adapter_selection.embedding_model, at, "adapter selection")
    for lid, lora in idx.loras.items():
        if lora.source.type == "ollama":
            yield Problem(pointer(("loras", lid, "source", "type")), "an adapter cannot come from an 'ollama' source")
        elif lora.format not in (*TRANSFORMERS_FORMATS, "gguf"):
            yield Problem(pointer(("loras", lid, "format")),
                          f"an adapter is loaded by peft (safetensors or pickle) or llama.cpp (gguf); got '{lora.format}'")
    for where, entry in _artifacts(idx):
        if entry.format == "gguf" and entry.source.type != "ollama" and entry.files:
            yield from _gguf_files(entry, where)


#: llama.cpp's split files (``gguf-split``): NAME-00001-of-00003.gguf ... NAME-00003-of-00003.gguf.
_GGUF_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _gguf_files(entry: ArtifactEntry, at: tuple[str, str]) -> Iterator[Problem]:
    """A 'gguf' entry loads one GGUF file, or every part of one split set: llama-server is given
    the first part and opens the others beside it, so a missing part fails only at load."""
    ggufs = [f.path for f in entry.files if f.path.lower().endswith(".gguf")]
    where = pointer((*at, "files"))
    if not ggufs:
        yield Problem(where, "format 'gguf' needs a .gguf file among the files")
        return
    stems = {(m["stem"], int(m["count"])) if (m := _GGUF_SPLIT.match(p)) else (p, 1) for p in ggufs}
    if len(stems) > 1:
        yield Problem(where, f"format 'gguf' loads one model file (or one split set); found {len(stems)}: "
                             + ", ".join(sorted(s for s, _ in stems)) + "; list one and its parts only")  # fmt: skip
        return
    stem, count = next(iter(stems))
    if count > 1:
        parts = {int(m["part"]) for p in ggufs if (m := _GGUF_SPLIT.match(p))}
        if missing := sorted(set(range(1, count + 1)) - parts):
            yield Problem(where, f"split GGUF '{stem}' has {count} parts; missing part {', '.join(str(n) for n in missing)}")
        elif max(parts) > count:
            yield Problem(where, f"split GGUF '{stem}' has {count} parts; a part numbered beyond that is listed")


def _embedder_problems(idx: Index, mid: str, at: str, who: str) -> Iterator[Problem]:
    """An embedding model is loaded by transformers from safetensors (``use_safetensors=True``)."""
    model = idx.models.get(mid)
    if model is None:
        return  # reported as an unknown model
    if model.source.type == "ollama":
        yield Problem(at, f"{who} embeds with transformers; model '{mid}' has an 'ollama' source")
    elif model.format != "safetensors":
        yield Problem(at, f"{who} embeds with transformers from safetensors; model '{mid}' has format '{model.format}'")


#: What an embedding tenant (issue #36) cannot have: each names the field and why.
_NOT_FOR_EMBEDDING: dict[str, str] = {
    "loras": "an embedding tenant has no adapters; remove 'loras'",
    "adapter_selection": "an embedding tenant has no adapters to choose; remove 'adapter_selection'",
    "generation": "an embedding tenant generates nothing; remove 'generation'",
    "sessions": "an embedding tenant keeps no conversations; remove 'sessions'",
}


def _embedding_tenants(idx: Index) -> Iterator[Problem]:
    """An embedding tenant (``kind: "embedding"``) is a transformers model answering ``/v1/embeddings``
    where it is served: whatever only generation uses is refused by name, and routes never name it."""
    embedding = {tid for tid, t in idx.tenants.items() if t.kind == "embedding"}
    for tid in sorted(embedding):
        tenant = idx.tenants[tid]
        for name, why in _NOT_FOR_EMBEDDING.items():
            if name in tenant.model_fields_set and (name != "loras" or tenant.loras):
                yield Problem(pointer(("tenants", tid, name)), why)
        if "max_loras" in tenant.resources.model_fields_set:
            yield Problem(pointer(("tenants", tid, "resources", "max_loras")), "an embedding tenant has no adapters; remove 'max_loras'")
        if tenant.backend != "transformers":
            yield Problem(pointer(("tenants", tid, "backend")),
                          f"an embedding tenant is served by the 'transformers' backend; '{tenant.backend}' serves generation only")
        elif (model := idx.models.get(tenant.model)) is not None and model.source.type != "ollama":
            yield from _embedder_problems(idx, tenant.model, pointer(("tenants", tid, "model")), f"embedding tenant '{tid}'")
        if tenant.overflow == "peers":
            yield Problem(pointer(("tenants", tid, "overflow")),
                          "an embedding tenant is answered where it is served (peers take generations only); set 'never'")
    for rid, route in idx.routes.items():
        named: list[tuple[tuple[str | int, ...], str]] = [(("rules", i, "tenant"), r.tenant) for i, r in enumerate(route.rules)]
        named += [(("default",), route.default)] + [(("fallback", i), t) for i, t in enumerate(route.fallback)]
        named += [(("summarizer",), route.summarizer)] if route.summarizer is not None else []
        for where, tid in named:
            if tid in embedding:
                yield Problem(pointer(("routes", rid, *where)), f"tenant '{tid}' is an embedding tenant; a route names tenants that generate")


def _artifacts(idx: Index) -> Iterator[tuple[tuple[str, str], ArtifactEntry]]:
    for mid, model in idx.models.items():
        yield ("models", mid), model
    for lid, lora in idx.loras.items():
        yield ("loras", lid), lora


def _artifact_files(idx: Index) -> Iterator[Problem]:
    for at, entry in _artifacts(idx):
        if entry.source.type == "ollama":
            if entry.files:
                yield Problem(pointer((*at, "files")), "must be empty for an 'ollama' source (the daemon keeps the blobs; the digest pins them)")
            if entry.format != "ollama":
                yield Problem(pointer((*at, "format")), f"an 'ollama' source has format 'ollama', got '{entry.format}'")
            continue
        if entry.source.type == "file" and (problem := _source_dir_problem(entry.source.path)):
            yield Problem(pointer((*at, "source", "path")), problem)
        if not entry.files:
            yield Problem(pointer((*at, "files")), "lists no files; every file needs a path, size and sha256")
        seen: dict[str, int] = {}
        for i, file in enumerate(entry.files):
            here = (*at, "files", i)
            problem = _path_problem(file.path)
            if problem:
                yield Problem(pointer((*here, "path")), problem)
            elif file.path in seen:
                yield Problem(pointer((*here, "path")), f"duplicate of /{'/'.join(map(str, at))}/files/{seen[file.path]}/path ('{file.path}')")
            else:
                seen[file.path] = i
            yield from _sha256_problems(file.sha256, (*here, "sha256"))
        yield from _layout_problems(at, [f.path for f in entry.files], seen)


#: Names the store writes inside a version directory: a declared file there would be
#: overwritten after its bytes were verified (and every later check would fail).
RESERVED_NAMES = frozenset({"manifest.json"})
NAME_MAX = 255  # bytes per path component on ext4, xfs, btrfs, zfs, apfs


def _layout_problems(at: tuple[str, str], paths: list[str], valid: dict[str, int]) -> Iterator[Problem]:
    """What would fail mid-apply instead of here: reserved names, a file where another
    file needs a directory, components longer than a filesystem allows."""
    for i, path in enumerate(paths):
        if valid.get(path) != i:
            continue  # malformed or a duplicate: already reported
        here = pointer((*at, "files", i, "path"))
        if path in RESERVED_NAMES:
            yield Problem(here, f"'{path}' is the name the zoo keeps its own manifest under; put the file in a subdirectory or rename it")
        if long := next((c for c in path.split("/") if len(c.encode()) > NAME_MAX), None):
            yield Problem(here, f"the name {long[:24]!r}... is {len(long.encode())} bytes; filesystems allow {NAME_MAX} per component")
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in valid:
                yield Problem(here, f"needs '{parent}' to be a directory, but /{'/'.join(at)}/files/{valid[parent]}/path declares it as a file")
                break


def _source_dir_problem(path: str) -> str | None:
    """A relative directory stays under the index's own directory (a reviewer sees where it
    points); a directory elsewhere is written absolute, which is as plain in a diff."""
    if "\x00" in path:
        return "contains a NUL character"
    if not path.startswith("/") and ".." in path.split("/"):
        return f"must not climb out of the index's directory with '..' ({path!r}); write a directory elsewhere as an absolute path"
    return None


def _path_problem(path: str) -> str | None:
    if "\x00" in path:
        return "contains a NUL character"
    if "\\" in path:
        return f"uses a backslash; separate directories with '/' ({path!r})"
    if path.startswith("/"):
        return f"must be relative to the version directory, got {path!r}"
    if ".." in path.split("/"):
        return f"must not climb out with '..', got {path!r}"
    if posixpath.normpath(path) != path or path == ".":
        return f"is not normalized (write {posixpath.normpath(path)!r}), got {path!r}"
    return None


def _sha256_problems(digest: str, at: tuple[str | int, ...]) -> Iterator[Problem]:
    if digest == _EMPTY_SHA256:
        yield Problem(pointer(at), "is the sha256 of an empty file, but the size is positive")
        return
    for period in (1, 2, 4, 8, 16):  # "000…", "abab…", "deadbeef…": typed, not computed
        if digest == digest[:period] * (64 // period):
            yield Problem(pointer(at), f"is a placeholder ({digest[:16]}…), not a real digest; pin the file's sha256")
            return


def _artifact_safety(idx: Index) -> Iterator[Problem]:
    for at, entry in _artifacts(idx):
        if not entry.allow_pickle:
            if entry.format == "pickle":
                yield Problem(pointer((*at, "format")), "pickle weights run code when loaded; set allow_pickle: true on this entry to accept that")
            for i, file in enumerate(entry.files):
                if file.path.lower().endswith(PICKLE_SUFFIXES):
                    yield Problem(pointer((*at, "files", i, "path")), f"'{file.path}' is a pickle file, which runs code when loaded; remove it or set allow_pickle: true")
        if not entry.allow_code:
            for i, file in enumerate(entry.files):
                if file.path.lower().endswith(".py"):
                    yield Problem(pointer((*at, "files", i, "path")), f"'{file.path}' is repository code; remove it or set allow_code: true")


def _hosts_serve(idx: Index) -> Iterator[Problem]:
    """One spelling per host, each tenant once, and a pinned tenant on disk before the resident starts."""
    for hid, host in idx.hosts.items():
        if host.resident is not None and host.tenants:
            yield Problem(pointer(("hosts", hid, "resident")),
                          f"set 'tenants' only, not both it and 'resident': list '{host.resident}' in 'tenants' if it should be served, and remove 'resident'")
        first: dict[str, int] = {}
        for i, tid in enumerate(host.tenants):
            if tid in first:
                yield Problem(pointer(("hosts", hid, "tenants", i)), f"lists tenant '{tid}' again (already /hosts/{hid}/tenants/{first[tid]})")
            first.setdefault(tid, i)
        yield from _max_loaded(idx, hid)
    for tid, tenant in idx.tenants.items():
        if tenant.pinned and tenant.fetch == "on-demand":
            yield Problem(pointer(("tenants", tid, "fetch")),
                          "a pinned tenant is loaded at start, so it must be on disk before: use fetch 'eager' or unpin it")
        if tenant.pinned and tenant.keep_alive is not None:
            yield Problem(pointer(("tenants", tid, "keep_alive")), "a pinned tenant is never unloaded: remove keep_alive or unpin it")


def _max_loaded(idx: Index, hid: str) -> Iterator[Problem]:
    """Pinned tenants are never paged out: they must fit under the cap, and leave room for the others (issue #34)."""
    host = idx.hosts[hid]
    if host.max_loaded is None:
        return
    pinned = pinned_tenants(idx, hid)
    others = [t for t in dict.fromkeys(host.served()) if t not in pinned and not (t in idx.tenants and idx.tenants[t].is_remote)]  # never loaded here
    at = pointer(("hosts", hid, "max_loaded"))
    if len(pinned) > host.max_loaded:
        yield Problem(at, f"{host.max_loaded} is fewer than the {len(pinned)} pinned tenants ({', '.join(pinned)}), which are never paged out")
    elif others and len(pinned) == host.max_loaded:
        yield Problem(at, f"the pinned tenants ({', '.join(pinned)}) fill all {host.max_loaded}: {', '.join(others)} could never load; "
                          "raise max_loaded or unpin one")


def _weights_fit(idx: Index) -> Iterator[Problem]:
    """From declared sizes alone, a lower bound: the KV cache needs config.json, which
    ``plan``/``apply`` read (zoo_agent.index.fit). A failure here is a failure there too."""
    for hid, host in idx.hosts.items():
        if host.memory_budget is not None:
            yield from check_host(idx, hid, {}, weights_only=True)


def _accepting(idx: Index) -> dict[str, list[str]]:
    """For each tenant, the hosts that serve it and accept it from peers (issue #22)."""
    return {tid: [hid for hid, h in idx.hosts.items() if tid in h.accept_from_peers and tid in h.served()] for tid in idx.tenants}


def _routes(idx: Index) -> Iterator[Problem]:
    """A route names served tenants (never a route: no chains, so no cycles) and has no rule that can never match."""
    for rid, route in idx.routes.items():
        at = ("routes", rid)
        if rid in idx.tenants:
            yield Problem(pointer(at), f"'{rid}' is also a tenant id; a request's model must name one or the other")
        named: list[tuple[tuple[str | int, ...], str]] = [(("rules", i, "tenant"), r.tenant) for i, r in enumerate(route.rules)]
        named += [(("default",), route.default)] + [(("fallback", i), t) for i, t in enumerate(route.fallback)]
        for where, tid in named:
            if tid in idx.routes:
                yield Problem(pointer((*at, *where)), f"names route '{tid}'; routes name tenants, not routes (so a route never loops)")
            elif tid not in idx.tenants:
                yield Problem(pointer((*at, *where)), _unknown("tenant", tid, idx.tenants))
        if route.summarizer is not None and route.summarizer not in idx.tenants:
            yield Problem(pointer((*at, "summarizer")), _unknown("tenant", route.summarizer, idx.tenants))
        always = None
        for i, rule in enumerate(route.rules):
            w = rule.when
            if always is not None:
                yield Problem(pointer((*at, "rules", i)), f"can never match: rule {always} before it matches every request")
                continue
            if w.min_words is not None and w.max_words is not None and w.min_words > w.max_words:
                yield Problem(pointer((*at, "rules", i, "when")), f"can never match: min_words {w.min_words} > max_words {w.max_words}")
            if w.min_messages is not None and w.max_messages is not None and w.min_messages > w.max_messages:
                yield Problem(pointer((*at, "rules", i, "when")), f"can never match: min_messages {w.min_messages} > max_messages {w.max_messages}")
            if w.min_similarity is not None and w.similar_to is None:
                yield Problem(pointer((*at, "rules", i, "when", "min_similarity")), "needs 'similar_to', the described task it measures the message against")
            if w.similar_to is not None and route.embedding_model is None:
                yield Problem(pointer((*at, "rules", i, "when", "similar_to")), "a similarity rule needs the route's 'embedding_model' (a declared model id)")
            if w == type(w)():
                always = i
        yield from _route_embedding(idx, rid, route)
    accepting = _accepting(idx)
    for hid, host in idx.hosts.items():
        served = set(host.served())
        for i, rid in enumerate(host.routes):
            entry = idx.routes.get(rid)
            if entry is None:
                yield Problem(pointer(("hosts", hid, "routes", i)), _unknown("route", rid, idx.routes))
                continue
            named_here = entry.tenants() + ([entry.summarizer] if entry.summarizer else [])
            # A tenant another host answers for peers is served through it (issue #22).
            missing = [t for t in dict.fromkeys(named_here) if t not in served and not set(accepting.get(t, ())) - {hid}]
            if missing:
                yield Problem(pointer(("hosts", hid, "routes", i)),
                              f"route '{rid}' names tenant{'s' if len(missing) > 1 else ''} {', '.join(missing)}, which host {hid} does not serve "
                              "and no other host accepts from peers")


def _route_embedding(idx: Index, rid: str, route: RouteEntry) -> Iterator[Problem]:
    """The route's embedding model exists, can be loaded by the resident, and some rule uses it (else it is fetched for nothing)."""
    mid = route.embedding_model
    if mid is None:
        return
    at = pointer(("routes", rid, "embedding_model"))
    if mid not in idx.models:
        yield Problem(at, _unknown("model", mid, idx.models))
    yield from _embedder_problems(idx, mid, at, "the router")
    if not any(r.when.similar_to is not None for r in route.rules):
        yield Problem(at, "no rule has 'similar_to', so nothing uses it; remove it or add a similarity rule")


def endpoint_problem(url: str) -> str | None:
    """What is wrong with a host's ``endpoint``, if anything: a base URL that a path is
    appended to (``/v1/models``), so only scheme, host and port (issue #22); a host that
    an HTTP client can connect to as written: a DNS name in ASCII, an IPv4 address or an
    IPv6 one in brackets (issue #31: a non-ASCII or over-long label was a traceback in
    ``fleet status``)."""
    if any(c.isspace() for c in url):
        return f"must not contain whitespace ({url!r})"
    if any(not c.isprintable() for c in url):
        return f"must not contain control characters ({url!r})"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a URL ({exc}): {url!r}"
    if parts.scheme not in ("http", "https") or not url.startswith(f"{parts.scheme}://"):
        return f"must start with 'http://' or 'https://', got {url!r}"
    if "@" in parts.netloc:
        return "must not carry a user or password; peers authenticate with the fleet key"
    if not parts.hostname:
        return f"names no host, got {url!r}"
    if problem := _host_problem(parts.hostname, bracketed=parts.netloc.rpartition("@")[2].startswith("[")):
        return problem
    if parts.path or parts.query or parts.fragment or url.endswith(("?", "#")):
        base = f"{parts.scheme}://{parts.netloc}"
        return f"must be a base URL with no path, query or fragment (write {base!r}), got {url!r}"
    if port == 0:
        return f"port 0 cannot be reached, got {url!r}"
    return None


_LABEL = re.compile(r"[a-z0-9_-]+")


def _host_problem(host: str, *, bracketed: bool) -> str | None:
    """What keeps ``host`` (urlsplit's ``hostname``: lowercase, brackets removed) from being connected to."""
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"the host {host!r} in brackets is not an IPv6 address"
        return None
    if not host.isascii():
        try:
            hint = repr(host.encode("idna").decode("ascii"))
        except UnicodeError:
            hint = "punycode"
        return f"the host {host!r} is not ASCII; write it in its xn-- form ({hint})"
    name = host.removesuffix(".")
    if all(c.isdigit() or c == "." for c in name):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return f"the host {host!r} is not an IPv4 address (each part is 0-255)"
        return None
    if len(name) > 253:
        return f"the host is {len(name)} characters; a DNS name has at most 253"
    for label in name.split("."):
        if not label:
            return f"the host {host!r} has an empty label; write a DNS name such as 'sprout.lan'"
        if bad := next((c for c in label if not _LABEL.fullmatch(c)), None):
            return f"the host {host!r} holds {bad!r}; a host name is letters, digits, '-' and '.' (or an IP address)"
        if len(label) > 63:
            return f"the label {label!r} is {len(label)} characters; a DNS label has at most 63"
        if label.startswith("-") or label.endswith("-"):
            return f"the label {label!r} starts or ends with '-'; a DNS label does not"
    return None


def endpoint_key(url: str) -> tuple[str, str, int]:
    """Scheme, host and port as a peer connects to them: ``http://A`` and ``http://a:80`` are one endpoint."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def _peers(idx: Index) -> Iterator[Problem]:
    """Federation (issue #22): endpoints peers can reach, each once; a host accepts only
    tenants it serves; a tenant that may overflow has somewhere to overflow to."""
    seen: dict[tuple[str, str, int], str] = {}
    for hid, host in idx.hosts.items():
        if host.endpoint is not None:
            if problem := endpoint_problem(host.endpoint):
                yield Problem(pointer(("hosts", hid, "endpoint")), problem)
            elif (other := seen.setdefault(endpoint_key(host.endpoint), hid)) != hid:
                yield Problem(pointer(("hosts", hid, "endpoint")), f"is also the endpoint of /hosts/{other}/endpoint; each host needs its own")
        served = set(host.served())
        first: dict[str, int] = {}
        for i, tid in enumerate(host.accept_from_peers):
            if tid in first:
                yield Problem(pointer(("hosts", hid, "accept_from_peers", i)), f"lists tenant '{tid}' again (already /hosts/{hid}/accept_from_peers/{first[tid]})")
            elif tid not in served:
                listed = ", ".join(host.served()) or "none"
                yield Problem(pointer(("hosts", hid, "accept_from_peers", i)), f"host {hid} does not serve tenant '{tid}' (it serves: {listed}); add it to /hosts/{hid}/tenants or remove it here")
            first.setdefault(tid, i)
        if host.accept_from_peers and host.endpoint is None:
            yield Problem(pointer(("hosts", hid, "accept_from_peers")), f"peers cannot reach host {hid}: set /hosts/{hid}/endpoint, or accept nothing")
    accepting = _accepting(idx)
    for tid, tenant in idx.tenants.items():
        if tenant.overflow != "peers":
            continue
        serving = [hid for hid, h in idx.hosts.items() if tid in h.served()]
        stranded = next((hid for hid in serving if not set(accepting[tid]) - {hid}), None)
        if not accepting[tid] or stranded is not None:
            where = f"no host other than {stranded}" if stranded is not None else "no host"
            yield Problem(pointer(("tenants", tid, "overflow")),
                          f"is 'peers', but {where} accepts tenant '{tid}' from peers; list it in another host's accept_from_peers, or set 'never'")


def _registry_metadata(idx: Index) -> Iterator[Problem]:
    """Tags once each; a free-form provenance key that is a near miss of a typed part is a
    typo, not a fact (issue #35: the typed parts would silently go unrecorded)."""
    typed = list(Provenance.model_fields)
    for at, entry in _artifacts(idx):
        tags: list[str] = list(getattr(entry, "tags", ()))
        for i, tag in enumerate(tags):
            if tag in tags[:i]:
                yield Problem(pointer((*at, "tags", i)), f"lists tag '{tag}' again (already /{'/'.join(at)}/tags/{tags.index(tag)})")
        for key in entry.provenance.model_extra or {}:
            near = difflib.get_close_matches(key.lower().replace("-", "_"), typed, n=1, cutoff=0.8)
            if near:
                yield Problem(pointer((*at, "provenance", key)),
                              f"is not a provenance part; did you mean '{near[0]}'? (typed parts: {', '.join(typed)}; other keys are free-form strings)")


def _aliases(idx: Index) -> Iterator[Problem]:
    """An alias is one more name for one model: never an id a request, a link or the store
    already means (a model, adapter, tenant or route), never another model's alias. So an
    alias always names an id, never an alias: there is no chain, hence no cycle (issue #35)."""
    taken: dict[str, str] = {}
    for kind, ids in (("model", idx.models), ("adapter", idx.loras), ("tenant", idx.tenants), ("route", idx.routes)):
        for name in ids:
            taken.setdefault(name, f"{kind} '{name}'")
    owner: dict[str, tuple[str, int]] = {}
    for mid, model in idx.models.items():
        for i, alias in enumerate(model.aliases):
            at = pointer(("models", mid, "aliases", i))
            if alias == mid:
                yield Problem(at, f"alias '{alias}' of model '{mid}' is its own id")
            elif alias in taken:
                yield Problem(at, f"alias '{alias}' of model '{mid}' is also the id of {taken[alias]}; rename one of them")
            elif alias in owner:
                other, j = owner[alias]
                again = "listed twice" if other == mid else f"already an alias of model '{other}'"
                yield Problem(at, f"alias '{alias}' of model '{mid}' is {again} (/models/{other}/aliases/{j})")
            else:
                owner[alias] = (mid, i)

#: What a remote tenant's ``resources`` may set: the rest sizes a local model and its process.
_REMOTE_RESOURCES = frozenset({"max_queue", "max_context"})


def _remote_tenants(idx: Index) -> Iterator[Problem]:
    """A remote tenant (``backend: "openai"``, issue #36) names its server in ``remote`` and no model; it has
    no adapters, nothing to fetch or pin, no process to size, and no peer relays it; a local one names its model."""
    for tid, tenant in idx.tenants.items():
        at = ("tenants", tid)
        if tenant.backend != "openai":
            if tenant.remote is not None:
                yield Problem(pointer((*at, "remote")), f"only for backend 'openai' (a remote server); this tenant's backend is '{tenant.backend}'")
            if not tenant.model:
                yield Problem(pointer((*at, "model")), f"missing required field 'model' (backend '{tenant.backend}' serves a model of 'models'; "
                                                       "only backend 'openai' names none)")  # fmt: skip
            continue
        if tenant.remote is None:
            yield Problem(pointer((*at, "remote")), "backend 'openai' needs 'remote': the server's base_url and model (and its key_file)")
        else:
            yield from _remote_problems(tenant.remote.base_url, tenant.remote.key_file, at)
        if tenant.model:
            yield Problem(pointer((*at, "model")), "a remote tenant (backend 'openai') serves no model of 'models'; its name at the remote "
                                                   "is remote.model: remove this")  # fmt: skip
        refused = {"loras": "has no adapters here", "adapter_selection": "has no adapters here",
                   "pinned": "is never paged (no process, no memory here): there is nothing to pin",
                   "keep_alive": "is never paged (no process, no memory here): there is nothing to unload",
                   "fetch": "has nothing to fetch", "sessions": "keeps no sessions here (its answers are the remote's)",
                   "overflow": "is asked directly by every host that serves it; peers do not relay it"}  # fmt: skip
        for field, why in refused.items():
            if field in tenant.model_fields_set and getattr(tenant, field) != type(tenant).model_fields[field].default:
                yield Problem(pointer((*at, field)), f"a remote tenant (backend 'openai') {why}")
        for field in sorted(tenant.resources.model_fields_set - _REMOTE_RESOURCES):
            yield Problem(pointer((*at, "resources", field)), "does not apply to a remote tenant (backend 'openai'): it sizes a local model; "
                                                              "the remote's limits are in 'remote'")  # fmt: skip
    for hid, host in idx.hosts.items():
        for i, tid in enumerate(host.accept_from_peers):
            if tid in idx.tenants and idx.tenants[tid].backend == "openai":
                yield Problem(pointer(("hosts", hid, "accept_from_peers", i)),
                              f"tenant '{tid}' is remote (backend 'openai'): each host that serves it asks the remote itself")


def _remote_problems(url: str, key_file: str | None, at: tuple[str, ...]) -> Iterator[Problem]:
    """The base URL's host is one a client can connect to; the key is no credential of the resident's own."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        yield Problem(pointer((*at, "remote", "base_url")), f"is not a URL ({exc}): {url!r}")
        return
    if port == 0:
        yield Problem(pointer((*at, "remote", "base_url")), f"port 0 cannot be reached, got {url!r}")
    elif problem := _host_problem(parts.hostname or "", bracketed=parts.netloc.startswith("[")):
        yield Problem(pointer((*at, "remote", "base_url")), problem)
    if key_file in OWN_CREDENTIALS:
        yield Problem(pointer((*at, "remote", "key_file")),
                      f"'{key_file}' is a credential of the resident's own (its clients', its peers' or the hub's key); "
                      "a remote tenant's key is a credential of its own")  # fmt: skip
