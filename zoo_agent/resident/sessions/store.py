"""Conversations that survive restarts and swaps (issue #9).

The transcript is the source of truth: each committed turn (the new messages and the
reply, the reply's token ids, the sampling parameters and seed, model@version, adapter,
the chat template's digest) is written with temp file + fsync + rename before the answer
completes, so a SIGKILL loses no committed turn.

The KV cache is only an accelerator: after each turn the session's cache is saved as
per-layer key/value tensors (safetensors) with the token ids it covers, keyed by
model@version, adapter and dtype. On the next turn it is used only when that key matches,
and then only for the longest prefix of token ids it shares with the new prompt; any
mismatch or damage means a re-prefill from the transcript, never a wrong cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo_agent.errors import ZooError
from zoo_agent.resident.sessions.checkpoints import CheckpointPolicy, Checkpoints
from zoo_agent.resident.sessions.transcript import (
    SESSION_ID,
    SessionDamaged,
    SessionError,
    SessionFile,
    SessionSummary,
    SessionTurn,
    read_session,
    valid_id,
)
from zoo_agent.formats import now
from zoo_agent.store.durable import DIR_MODE, FILE_MODE, fsync_dir, write_atomic

__all__ = ["SESSION_ID", "SessionDamaged", "SessionError", "SessionStats", "Sessions", "Turn", "cache_files", "remove_session", "session_lock", "valid_id"]

log = logging.getLogger("zoo_agent.resident")

#: Set by the router on a routed request (a client's own is dropped): the session is that route's (issue #21).


@dataclass
class Turn:
    """What one request adds to a session (filled in as the request is served)."""

    id: str
    new_messages: list[dict[str, str]]
    dropped_turns: int = 0  # oldest turns left out of the prompt to fit the context window
    history: list[SessionTurn] = field(default_factory=list)  # the committed turns in the prompt
    cache: str = "none"  # restored | re-prefilled | none (first turn)
    cached_tokens: int = 0
    prompt_ids: list[int] | None = None  # built (off the event loop) when the request was accepted
    summary: str = "none"  # a route session (issue #21): new | reused | marker (turns left out, none summarized them) | none
    new_summary: SessionSummary | None = None  # committed with the turn
    store: Sessions | None = None  # a route's sessions (else: the tenant's)


@dataclass
class SessionStats:
    restores: int = 0
    reprefills: int = 0
    corrupt: int = 0
    restore_seconds: list[float] = field(default_factory=list)


def cache_files(kv_dir: Path, sid: str) -> list[Path]:
    """Every saved KV cache of a session: ``<sid>.safetensors`` (a tenant's) and
    ``<sid>+<key>.safetensors`` (a route's, one per model@version and adapter; '+' is not in a session id)."""
    try:
        return sorted(p for p in kv_dir.iterdir() if p.name == f"{sid}.safetensors" or (p.name.startswith(f"{sid}+") and p.suffix == ".safetensors"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_session(base_dir: Path, sid: str) -> bool:
    """Delete a session's transcript and every cache of it under ``base_dir`` (a tenant's or a
    route's directory; ``sid`` already valid); whether there was anything to delete."""
    found = False
    for path in (base_dir / "sessions" / f"{sid}.json", *cache_files(base_dir / "kv-cache", sid)):
        with suppress(FileNotFoundError):
            path.unlink()
            found = True
    return found


@contextmanager
def session_lock(sessions_dir: Path) -> Iterator[None]:
    """The lock of a route's sessions directory (``.lock``, flock): commits and deletes take it."""
    sessions_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fd = os.open(sessions_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Sessions:
    """The sessions of one tenant (`resident/tenants/<tenant>/{sessions,kv-cache}/`), or of a
    route (`resident/routes/<route>/...`, ``route`` set): there a session moves between the
    route's tenants, so its turns come from several models, several workers may commit to it
    (a lock serializes them), and its KV caches are kept per model@version and adapter, so
    that returning to a model restores its cache (issue #21)."""

    def __init__(self, base_dir: Path, *, model_key: str, dtype: str, template: str, vocab_size: int | None = None,
                 route: str | None = None, checkpoints: CheckpointPolicy | None = None) -> None:  # fmt: skip
        self.dir = base_dir / "sessions"
        self.kv_dir = base_dir / "kv-cache"
        self.route = route
        self.checkpoints = checkpoints  # the index's sessions.checkpoints: timed checkpoints (issue #36)
        self.model_key, self.dtype = model_key, dtype
        self.vocab_size = vocab_size  # token ids of a transcript must be below it
        self.template = hashlib.sha256(template.encode()).hexdigest()[:16]
        self.stats = SessionStats()

    def native(self, turn: SessionTurn) -> bool:
        """Whether a turn's ids are this model's own (its reply's ids can be reused as they are)."""
        return turn.model == self.model_key and turn.template == self.template

    def cache_path(self, sid: str, adapter: str | None) -> Path:
        if self.route is None:
            return self.kv_dir / f"{sid}.safetensors"
        key = hashlib.sha256(f"{self.model_key}\0{adapter or ''}\0{self.dtype}".encode()).hexdigest()[:16]
        return self.kv_dir / f"{sid}+{key}.safetensors"

    # -- transcripts -------------------------------------------------------------------
    def path(self, sid: str) -> Path:
        return self.dir / f"{valid_id(sid)}.json"

    def load(self, sid: str) -> SessionFile | None:
        """The session, or None; ``SessionDamaged`` (logged) when its file holds no valid session."""
        path = self.path(sid)
        try:
            session = read_session(path, vocab_size=self.vocab_size, model=self.model_key.split("@", 1)[0] if self.route else None)
            if session.id != sid:
                raise SessionDamaged(str(path), "/id", f"is '{session.id}', but the file is {sid}.json")
        except FileNotFoundError:
            return None
        except SessionDamaged as exc:
            log.warning("session %s is damaged: %s", sid, exc)
            raise
        return session

    @staticmethod
    def messages(transcript: SessionFile | None, first_turn: int = 0) -> list[dict[str, str]]:
        return [m.model_dump() for turn in (transcript.turns if transcript else [])[first_turn:] for m in turn.messages]

    def commit(self, turn: Turn, reply: str, completion_ids: list[int], meta: dict[str, Any]) -> SessionFile:
        """Append the turn durably; only then may the answer complete."""
        self.dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        with self._locked():
            transcript = self.load(turn.id) or SessionFile(id=turn.id, created=now(), turns=[])
            transcript.turns.append(SessionTurn.model_validate({
                "messages": [*turn.new_messages, {"role": "assistant", "content": reply}],
                "completion_ids": completion_ids, "template": self.template, "model": self.model_key,
                "dropped_turns": turn.dropped_turns, "time": now(), **meta,
            }))  # fmt: skip
            if turn.new_summary is not None and all(s.covers < turn.new_summary.covers for s in transcript.summaries):
                transcript.summaries = [*transcript.summaries, turn.new_summary]  # assigned: then the file has the field
            transcript.updated = now()
            write_atomic(self.path(turn.id), (json.dumps(transcript.document(), indent=1) + "\n").encode(), FILE_MODE)
            fsync_dir(self.dir)
        return transcript

    def timed_checkpoint(self, transcript: SessionFile) -> None:
        """After a committed turn and its cache: a checkpoint of its own when ``checkpoints.every`` says
        one is due (issue #36). An idle session is not checkpointed again; a failure is logged, never the turn's."""
        policy = self.checkpoints
        if policy is None or policy.every is None:
            return
        try:
            store = Checkpoints(self.dir.parent, route=self.route is not None, wait=1.0)  # the model thread: skipped, not held, when busy
            if store.due(transcript.id, policy.every, transcript.created):
                record, dropped = store.create(transcript.id, keep=policy.keep, kind="timed")
                log.info("session %s: timed checkpoint %s (%d turns)%s", transcript.id, record.name, record.turns,
                         f"; dropped {', '.join(dropped)}" if dropped else "")  # fmt: skip
        except (ZooError, OSError) as exc:
            log.warning("session %s: timed checkpoint not taken: %s", transcript.id, exc)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """A route session is shared by the workers of the route's tenants: read, append and
        rename under one lock, so that two turns committed at once are both kept."""
        if self.route is None:  # one worker, and its one model thread, writes a tenant's sessions
            yield
            return
        with session_lock(self.dir):
            yield

    def delete(self, sid: str) -> bool:
        return remove_session(self.dir.parent, sid)

    def open_count(self) -> int:
        try:
            return sum(1 for p in self.dir.iterdir() if p.suffix == ".json")
        except FileNotFoundError:
            return 0

    # -- the KV cache ------------------------------------------------------------------
    def save_cache(self, sid: str, ids: list[int], cache: Any, adapter: str | None) -> None:
        """Per-layer keys and values plus the token ids they cover; written by rename."""
        import torch
        from safetensors.torch import save_file

        n = cache.get_seq_length()
        tensors = {"ids": torch.tensor(ids[:n], dtype=torch.int64)}
        for i, layer in enumerate(cache.layers):
            tensors[f"k{i}"] = layer.keys[:, :, :n].contiguous().cpu()
            tensors[f"v{i}"] = layer.values[:, :, :n].contiguous().cpu()
        meta = {"model": self.model_key, "adapter": adapter or "", "dtype": self.dtype, "tokens": str(n),
                "ids_sha256": _ids_digest(ids[:n]), "tensors_sha256": _tensors_digest(tensors)}  # fmt: skip
        self.kv_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        target = self.cache_path(sid, adapter)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, target)

    def restore(self, turn: Turn, ids: list[int], adapter: str | None, config: Any, device: str) -> Any:
        """A DynamicCache for the longest usable prefix of ``ids``, or None (then: re-prefill)."""
        path = self.cache_path(turn.id, adapter)
        if not path.exists():
            return None
        started = time.perf_counter()
        try:
            from safetensors import safe_open
            from transformers import DynamicCache

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if (meta.get("model"), meta.get("adapter"), meta.get("dtype")) != (self.model_key, adapter or "", self.dtype):
                    log.info("session %s: cache is for %s/%s, serving %s/%s: re-prefilling", turn.id, meta.get("model"), meta.get("adapter") or "base",
                             self.model_key, adapter or "base")  # fmt: skip
                    return None
                if not meta.get("tensors_sha256"):
                    log.info("session %s: cache has no digest of its tensors (an older resident wrote it): re-prefilling", turn.id)
                    return None
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            if _tensors_digest(tensors) != meta["tensors_sha256"]:
                raise ValueError("tensor bytes do not match their digest")
            cached_ids = tensors["ids"].tolist()
            if _ids_digest(cached_ids) != meta.get("ids_sha256") or str(len(cached_ids)) != meta.get("tokens"):
                raise ValueError("token ids do not match their digest")
            layers = [(tensors[f"k{i}"].to(device), tensors[f"v{i}"].to(device)) for i in range(config.num_hidden_layers)]
            if any(k.shape[2] != len(cached_ids) or v.shape != k.shape for k, v in layers):
                raise ValueError("layer shapes do not match the token count")
            shared = 0
            for a, b in zip(cached_ids, ids, strict=False):
                if a != b:
                    break
                shared += 1
            usable = min(shared, len(ids) - 1)  # generate must feed at least one token itself
            if usable <= 0:
                return None
            cache = DynamicCache([(k[:, :, :usable], v[:, :, :usable]) for k, v in layers], config=config)
        except Exception as exc:  # noqa: BLE001 - any damage means: not used, logged, re-prefilled
            self.stats.corrupt += 1
            log.warning("session %s: cache file %s is damaged (%s); ignored, re-prefilling", turn.id, path, " ".join(str(exc).split())[:200])
            return None
        turn.cached_tokens = usable
        self.stats.restore_seconds.append(time.perf_counter() - started)
        return cache


def _ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def _tensors_digest(tensors: dict[str, Any]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (issue #17).

    safetensors checks the header, not the data: a flipped bit in a key or value tensor
    loads fine and silently changes the next answer. This digest, kept in the file's
    metadata, is checked before a cache is used."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
