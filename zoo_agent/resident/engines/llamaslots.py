"""llama-server's own HTTP over its socket, and its slots as a session's hibernation (issue #33).

A session's conversation lives in one of the engine's slots (its KV cache) while the engine runs;
after each committed turn that slot is saved (``POST /slots/N?action=save``) into the tenant's
``slots/`` directory under a name keyed by model@version, cache type and adapters, with a sha256
beside it, and a new engine (after a page-out, a restart, a crash) restores it into an idle slot
before the session's next turn. ``llamasessions`` decides when; this module holds the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any

from zoo_agent.jsonbound import loads
from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.engines.front import HEAD_LIMIT, Dechunker, _Closed, _Conn, _head
from zoo_agent.resident.sessions.store import valid_id
from zoo_agent.store.durable import FILE_MODE, write_atomic

__all__ = ["SLOT_SECONDS", "EngineError", "SlotFiles", "ask", "exchange"]

log = logging.getLogger("zoo_agent.resident")

SLOT_SECONDS = 30.0  # a slot's save or restore: its KV cache written or read (asked only of a slot that is idle)


class EngineError(Exception):
    """The engine did not answer a tokenizer's question (gone, or an error): the turn is not served."""


def exchange(engine: str, target: str, body: dict[str, Any] | None, timeout: float, limit: int = 64 << 20) -> Any:
    """One request to the engine's socket (a POST of ``body``, or a GET) and its JSON answer (``EngineError`` for anything but a 200)."""
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{'POST' if body is not None else 'GET'} {target} HTTP/1.1\r\nhost: llama-server\r\nconnection: close\r\n"
    if body is not None:
        head += f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(engine)
            sock.sendall(head.encode("latin-1") + b"\r\n" + data)
            conn = _Conn(sock)
            line, fields = _head(conn.head(HEAD_LIMIT))
            raw = bytearray(conn.buffer)
            while len(raw) <= limit and (chunk := sock.recv(65536)):
                raw += chunk
        chunked = any(k == "transfer-encoding" and "chunked" in v.lower() for k, v in fields)
        payload = Dechunker().feed(bytes(raw)) if chunked else bytes(raw)
    except (OSError, _Closed) as exc:
        raise EngineError(f"{target}: {exc}") from None
    if line.split(" ", 2)[1:2] != ["200"]:
        raise EngineError(f"{target} answered {line[9:60]!r}: {payload[:200].decode('utf-8', 'replace')}")
    try:
        document = loads(payload, limit=limit)
    except ValueError as exc:
        raise EngineError(f"{target}: {exc}") from None
    return document


def ask(engine: str, target: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    """``exchange`` whose answer must be a JSON object."""
    document = exchange(engine, target, body, timeout)
    if not isinstance(document, dict):
        raise EngineError(f"{target}: answered no JSON object")
    return document


class SlotFiles:
    """A llama.cpp tenant's saved slots (``slots/``, llama-server's ``--slot-save-path``, which
    ``llamaserver.slots_dir`` made, not a link), and which session's conversation each slot of this
    engine holds now."""

    def __init__(self, config: WorkerConfig, engine: str) -> None:
        assert config.sessions_dir is not None
        self.tenant, self.engine = config.tenant, engine
        self.slots = config.sessions_dir / "slots"
        self.base_key = f"{config.model}@{config.version}\0{config.kv_cache_type or 'f16'}\0{','.join(a.label for a in config.adapters)}"
        self._warm: dict[str, int] = {}  # session -> the slot of this engine its conversation was last in
        self._warm_lock = threading.Lock()
        self.corrupt = 0  # saved slots that did not match their digest

    def file(self, sid: str, lora: object = None) -> str:
        """The file of a session's slot (in ``slots/``), keyed by model@version, the cache type and the
        adapters (the tenant's, at their versions, and the turn's ``lora`` field): a slot that another
        version, cache type or adapter choice saved is never restored. Built from a valid id and a
        digest, never from input as it came."""
        key = hashlib.sha256(f"{self.base_key}\0{json.dumps(lora, sort_keys=True)}".encode()).hexdigest()[:16]
        return f"{valid_id(sid)}+{key}.bin"

    def save(self, sid: str, slot: int, lora: object) -> None:
        """Save the slot that served the turn: written by llama-server under a temporary name, renamed
        here, so a file of ours is whole or absent. A failure is logged: the next turn re-prefills."""
        name = self.file(sid, lora)
        tmp = f".{name}.tmp"
        if ".." in sid:  # a valid id that llama-server refuses as a file name
            return
        try:
            if slot not in self.idle():  # another request took it when ours ended: the save would wait for that one
                log.debug("%s: session %s: slot %d is busy again; its saved slot stays the turn before's", self.tenant, sid, slot)
                return
            _unlink_planted(self.slots, tmp)
            saved = ask(self.engine, f"/slots/{slot}?action=save", {"filename": tmp}, SLOT_SECONDS)
            if _regular(self.slots / tmp) is None:
                raise EngineError(f"llama-server saved no {tmp}")
            # Its digest first: a SIGKILL between the two leaves a digest that matches no file (a re-prefill), never a wrong file.
            _unlink_planted(self.slots, f"{name}.sha256")
            write_atomic(self.slots / f"{name}.sha256", _digest(self.slots / tmp).encode(), FILE_MODE)
            os.replace(self.slots / tmp, self.slots / name)
        except (EngineError, OSError) as exc:
            log.warning("%s: session %s: its slot was not saved (the next turn after a restart re-prefills): %s", self.tenant, sid, exc)
            with suppress(OSError):
                (self.slots / tmp).unlink()
            return
        with self._warm_lock:
            for other in [s for s, k in self._warm.items() if k == slot]:
                del self._warm[other]
            self._warm[sid] = slot
        log.debug("%s: session %s: slot %d saved (%s tokens)", self.tenant, sid, slot, saved.get("n_saved"))

    def restore(self, sid: str, lora: object) -> int | None:
        """A session whose conversation is in no slot of this engine (a new engine: after a page-out, a
        restart, a crash) and whose slot was saved: restored into an idle slot; which one, or None (then
        the engine's prompt cache, or a re-prefill from the transcript)."""
        with self._warm_lock:
            if sid in self._warm:
                return None
        path = self.slots / self.file(sid, lora)
        if _regular(path) is None:
            return None
        try:
            sidecar = self.slots / f"{path.name}.sha256"
            expected = sidecar.read_bytes()[:64].decode("ascii", "replace") if _regular(sidecar) is not None else ""
            if _digest(path) != expected:  # damaged, or not ours: llama-server checks the sizes, not the bytes of the cache
                self.corrupt += 1
                log.warning("%s: session %s: its saved slot %s does not match its digest; ignored, re-prefilling", self.tenant, sid, path.name)
                return None
        except OSError as exc:
            log.warning("%s: session %s: its saved slot cannot be read (%s); re-prefilling", self.tenant, sid, exc)
            return None
        try:
            free = self.idle()
            with self._warm_lock:
                held = set(self._warm.values())
            if not free:
                return None
            slot = next((k for k in free if k not in held), free[0])  # a slot no warm session holds, if any
            ask(self.engine, f"/slots/{slot}?action=restore", {"filename": path.name}, SLOT_SECONDS)
        except EngineError as exc:
            log.warning("%s: session %s: its saved slot was not restored (re-prefilled instead): %s", self.tenant, sid, exc)
            return None
        with self._warm_lock:
            for other in [s for s, k in self._warm.items() if k == slot]:
                del self._warm[other]
            self._warm[sid] = slot
        return slot

    def idle(self) -> list[int]:
        """The engine's slots that serve no request now (``GET /slots``)."""
        listed = exchange(self.engine, "/slots", None, SLOT_SECONDS)
        idle = [s.get("id") for s in listed if isinstance(s, dict) and s.get("is_processing") is False] if isinstance(listed, list) else []
        return [k for k in idle if isinstance(k, int) and not isinstance(k, bool)]

    def forget(self, sid: str) -> bool:
        """A deleted session's saved slots (of every version); whether there were any."""
        with self._warm_lock:
            self._warm.pop(sid, None)
        found = False
        try:
            names = [p.name for p in self.slots.iterdir() if p.name.startswith(f"{sid}+") and p.name.endswith((".bin", ".bin.sha256"))]
        except OSError:
            return False
        for name in names:
            with suppress(FileNotFoundError):
                (self.slots / name).unlink()
                found = True
        return found


def _regular(path: Path) -> os.stat_result | None:
    """Its status when it is a regular file (a link is not followed, and is none)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _digest(path: Path) -> str:
    """sha256 of a regular file (a link is not followed: ``OSError``)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path.name}: not a regular file")
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _unlink_planted(directory: Path, name: str) -> None:
    """Whatever is at ``name`` in our directory and is no regular file (a planted link), removed: llama-server
    opens its files by name and would write through a link."""
    try:
        st = os.lstat(directory / name)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        (directory / name).unlink()
