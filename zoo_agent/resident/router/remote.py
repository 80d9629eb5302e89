"""Remote tenants (issue #36): a tenant answered by an OpenAI-compatible server elsewhere (a cloud
provider, a vLLM server, another llama-server), beside the local ones.

Such a tenant has no worker and no memory here, and is never paged: the pager marks its slot
(``take_remote_slot``) and leaves it; this module keeps its phase, path and refusal. It counts
toward routes, fallbacks, admission and its priority queue, ``/metrics``, ``Status:`` and
``/health`` like any tenant: its slot's ``path`` is a marker (``remote:<tenant>``) that admission
hands out as it hands out a worker's socket, and the router sends what admission placed here.

- Health: every ``poll_seconds`` its ``<base_url>/models`` is asked (with its key, within
  ``POLL_TIMEOUT``, at most ``MAX_POLL_BYTES``) whether it lists the tenant's model. While that
  fails, or a request could not connect, the tenant is ``unavailable``: its requests get 503 at
  once (a route's next candidate answers), ``/health`` and ``Status:`` say why, and it is asked
  again sooner (1 s, 2 s, 4 s, ... up to ``poll_seconds``); it serves again when a poll succeeds.
- Requests: at most ``max_concurrent`` at once; more wait here, best priority first (aged, as a
  worker's queue), up to ``resources.max_queue``, then 429. The body is ours, written from the
  parsed request: the remote's model name, our own fields (``session``, ``priority``, ``x_zoo``)
  left out, ``max_tokens`` capped. The headers are ours: none of the client's (its key, its
  cookies) goes out, only the tenant's key as ``Authorization: Bearer``, to its ``base_url`` only.
  The answer is relayed as a peer's is (``relay``: no redirect followed, no encoding header
  relayed, bounded size and depth, well-formed events only), in ``timeout_seconds`` at most.

Everything but ``take_index`` (the supervisor's thread: it replaces the table in one assignment and
reads the key files) runs on the router's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import CollectorRegistry, Gauge

from zoo_agent._version import __version__
from zoo_agent.errors import UsageError
from zoo_agent.jsonbound import loads
from zoo_agent.keyfile import read_key_file
from zoo_agent.resident.inbound import GENERATE, Parsed
from zoo_agent.resident.router.admission import Admission, QueueFull, Unavailable
from zoo_agent.resident.router.relay import relay
from zoo_agent.resident.router.upstream import Fallback, WorkerFailed, bounded, decoded
from zoo_agent.resident.slots import Slot, SlotTable
from zoo_agent.resident.wire.documents import Card, CardZoo, HealthTenant
from zoo_agent.resident.wire.http import Receive, Scope, Send, disconnected, error, respond
from zoo_agent.resident.wire.priority import PriorityQueue
from zoo_agent.resident.worker.daemon import backoff

if TYPE_CHECKING:
    from zoo_agent.index.model import Index, RemoteEntry, TenantEntry
    from zoo_agent.resident.crew import Crew

__all__ = ["MAX_POLL_BYTES", "POLL_TIMEOUT", "Remote", "Remotes", "listed", "outgoing_body", "take_remote_slot"]

log = logging.getLogger("zoo_agent.resident")

#: The most one health poll may take, and its answer's size (OpenAI's whole model list is ~100 kB).
POLL_TIMEOUT = 5.0
MAX_POLL_BYTES = 4 << 20
#: The request fields that are ours, never the remote's: the router and the workers read them.
OURS = frozenset({"session", "priority", "x_zoo"})
#: How often the poller looks whether a poll is due, and the least time between two polls of one remote.
_TICK = 0.25
_RECHECK = 1.0


def take_remote_slot(slot: Slot, tenant: TenantEntry, crew: Crew) -> None:
    """The pager's part (under the table's lock): the slot of a remote tenant holds no memory and is never
    loaded; a worker it had (a local tenant until this index) is drained. The router does the rest."""
    assert tenant.remote is not None
    for worker in slot.workers:
        crew.drain(slot, worker, "now remote")
    if not slot.remote:
        slot.phase, slot.path, slot.refusal, slot.error = "loading", None, None, ""  # until the router's first poll
    slot.remote = label(tenant.remote)
    slot.pinned, slot.fetch, slot.pins, slot.fetched, slot.fetch_failed = False, "eager", "", "", ""
    slot.capacity = tenant.remote.max_concurrent + tenant.resources.max_queue
    slot.estimate = slot.measured = 0


def label(spec: RemoteEntry) -> str:
    """How a remote tenant is named to operators: ``gpt-4o-mini at api.openai.com``."""
    return f"{spec.model} at {urllib.parse.urlsplit(spec.base_url).netloc}"


def outgoing_body(document: dict[str, Any], spec: RemoteEntry, defaults: dict[str, Any]) -> bytes:
    """What the remote is sent for a request ``document``: the remote's model name, ``defaults`` (the
    generation fields the index sets) where the request names none, ``max_tokens`` (and
    ``max_completion_tokens``) at most ``spec.max_tokens`` (that many when it names neither), and
    none of our own fields. ``ValueError`` for a number JSON cannot carry (``1e999``)."""
    out = {k: v for k, v in document.items() if k not in OURS}
    out["model"] = spec.model
    for key, value in defaults.items():
        out.setdefault(key, value)
    if (cap := spec.max_tokens) is not None:
        asked = [k for k in ("max_tokens", "max_completion_tokens") if k in out]
        for key in asked:
            if isinstance(out[key], int) and not isinstance(out[key], bool) and out[key] > cap:
                out[key] = cap  # another type is the remote's 400 to give
        if not asked:
            out["max_tokens"] = cap
    return json.dumps(out, allow_nan=False).encode()


def listed(status: int, document: Any, model: str) -> str:
    """Why a remote's ``GET /models`` answer says it cannot serve ``model`` ('' when it lists it): one short line."""
    if status in (401, 403):
        return f"refused the tenant's key ({status})"
    if status != 200:
        return f"answered {status} to GET /models"
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return "answered GET /models with no model list"
    ids = [d["id"] for d in data if isinstance(d, dict) and isinstance(d.get("id"), str)]
    if model in ids:
        return ""
    shown = ", ".join(_shown(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return f"does not list model {_shown(model)} (it lists {shown or 'none'})"


def _shown(text: str, most: int = 80) -> str:
    """Someone else's word as we repeat it (a 503, /health, Status:, the journal): printable, short, quoted."""
    return repr("".join(c if c.isprintable() else "?" for c in text[:most]))


def _key(tid: str, spec: RemoteEntry, own: frozenset[str]) -> tuple[str | None, str]:
    """The tenant's key, or why there is none to use ('' when it needs none or it was read)."""
    if spec.key_file is None:
        return None, ""
    flag = f"tenants.{tid}.remote.key_file"
    if spec.key_file.startswith("/"):
        path = Path(spec.key_file)
    elif (credentials := os.environ.get("CREDENTIALS_DIRECTORY")) is not None:
        path = Path(credentials) / spec.key_file
    else:
        return None, (f"{flag} '{spec.key_file}' names a systemd credential, but the resident has none ($CREDENTIALS_DIRECTORY is "
                      f"unset): load it with LoadCredential={spec.key_file}:PATH (NixOS: services.model-zoo.resident.credentials)")  # fmt: skip
    try:
        key = read_key_file(path, flag)
    except UsageError as exc:
        return None, str(exc)
    if key in own:
        return None, f"{flag} holds a key of the resident's own (its clients', its peers' or the priority key); a remote tenant's key is its own"
    return key, ""


@dataclass
class Remote:
    """One remote tenant: its server, its key, its health, its places (on the router's loop)."""

    tenant: str
    spec: RemoteEntry
    key: str | None
    defaults: dict[str, Any]  # the generation fields the index sets, for requests that name none
    aging_seconds: float
    why: str = ""  # why it is unavailable now, a sentence naming its base_url or its key file ('' while it answers)
    up: bool | None = None  # None: not polled yet
    failures: int = 0
    next_poll: float = 0.0
    last_poll: float = 0.0
    polling: asyncio.Future[None] | None = None
    running: int = 0
    waiting: PriorityQueue[asyncio.Future[None]] = field(init=False)
    client: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.waiting = PriorityQueue(self.aging_seconds)
        # No cookie is ever kept: an answer's Set-Cookie must not ride along with the next client's request.
        jar = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.client = httpx.AsyncClient(base_url=self.spec.base_url.rstrip("/"), follow_redirects=False, cookies=jar,
                                        timeout=httpx.Timeout(None, connect=min(10.0, self.spec.first_token_seconds), write=10.0),
                                        limits=httpx.Limits(max_connections=self.spec.max_concurrent + 2))  # fmt: skip

    @property
    def netloc(self) -> str:
        return urllib.parse.urlsplit(self.spec.base_url).netloc

    def headers(self, stream: bool) -> list[tuple[bytes, bytes]]:
        """Ours only: what the body is, what we read, who asks, and the tenant's own key."""
        out = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream" if stream else b"application/json"),
               (b"accept-encoding", b"identity"), (b"user-agent", f"model-zoo/{__version__}".encode())]  # fmt: skip
        if self.key is not None:
            out.append((b"authorization", b"Bearer " + self.key.encode()))
        return out

    # -- places ---------------------------------------------------------------------------------
    async def turn(self, priority: int, gone: asyncio.Future[None], seconds: float) -> bool:
        """One of the ``max_concurrent`` places (give it back with ``release``); False when the client left first.
        ``Fallback`` when none came within ``seconds``."""
        if self.running < self.spec.max_concurrent and not len(self.waiting):
            self.running += 1
            return True
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.push(mine, priority, time.monotonic())
        done, _ = await asyncio.wait({mine, gone}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        if mine in done:
            return True
        self.waiting.remove(mine)
        mine.cancel()
        if gone in done:
            return False
        raise Fallback(f"none of its {self.spec.max_concurrent} places came free within {seconds:g}s", "queue_full")

    def release(self) -> None:
        self.running -= 1
        while len(self.waiting) and self.running < self.spec.max_concurrent:
            nxt = self.waiting.pop_best()
            if not nxt.done():
                self.running += 1
                nxt.set_result(None)


class Remotes:
    """The host's remote tenants: their health polls, their requests, what ``/health``, ``/v1/models``
    and ``/metrics`` say of them."""

    def __init__(self, table: SlotTable, admission: Admission, registry: CollectorRegistry, own_keys: frozenset[str], aging_seconds: float,
                 load_wait: float, on_answer: Callable[[str, int], None]) -> None:  # fmt: skip
        self.table, self.admission, self.own_keys, self.aging_seconds, self.load_wait = table, admission, own_keys, aging_seconds, load_wait
        self.on_answer = on_answer  # the router's request counter
        self.by_tenant: dict[str, Remote] = {}
        self.retired: list[Remote] = []  # replaced by a reload: closed once their requests are done
        self.loop: asyncio.AbstractEventLoop | None = None
        self.up = Gauge("zoo:remote_up", "1 while the remote tenant's server lists its model (its last poll, or its last request, "
                        "succeeded); 0 while it is unavailable.", ["tenant"], registry=registry)  # fmt: skip

    def __contains__(self, tenant: str) -> bool:
        return tenant in self.by_tenant

    def get(self, tenant: str) -> Remote | None:
        return self.by_tenant.get(tenant)

    # -- the supervisor's thread ---------------------------------------------------------------------
    def take_index(self, idx: Index, order: list[str]) -> None:
        """The remote tenants of ``order`` under ``idx``: a changed server, key or limit is a new ``Remote``
        (asked again at once); the key files are read again (a reload rotates a key)."""
        new: dict[str, Remote] = {}
        for tid in order:
            tenant = idx.tenants[tid]
            if tenant.remote is None:
                continue
            key, why = _key(tid, tenant.remote, self.own_keys)
            defaults = {k: getattr(tenant.generation, k) for k in sorted(tenant.generation.model_fields_set)}
            old = self.by_tenant.get(tid)
            if old is not None and (old.spec, old.key, old.defaults) == (tenant.remote, key, defaults) and why == "":
                new[tid] = old
                continue
            remote = Remote(tid, tenant.remote, key, defaults, self.aging_seconds)
            new[tid] = remote
            if why:
                log.error("%s: %s", tid, why)
                remote.up, remote.why, remote.next_poll = False, why, float("inf")  # asked again after a reload, not before
            else:
                log.info("%s: answered by %s", tid, label(tenant.remote))
            self._show(remote, pump=False)
            self.up.labels(tid).set(0)
        self.retired += [r for tid, r in self.by_tenant.items() if new.get(tid) is not r]
        for tid in set(self.by_tenant) - set(new):
            with contextlib.suppress(KeyError):
                self.up.remove(tid)
        self.by_tenant = new

    # -- the router's loop: health -----------------------------------------------------------------
    async def poll_forever(self) -> None:
        self.loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            for remote in list(self.by_tenant.values()):
                if remote.polling is None and now >= remote.next_poll:
                    remote.polling = asyncio.ensure_future(self._poll(remote))
            for remote in [r for r in self.retired if r.running == 0 and not len(r.waiting) and r.polling is None]:
                self.retired.remove(remote)
                await remote.client.aclose()
            await asyncio.sleep(_TICK)

    async def _poll(self, remote: Remote) -> None:
        try:
            why = await self._ask(remote)
        except Exception as exc:  # noqa: BLE001 - whatever happened, the tenant is unavailable until a poll succeeds
            why = f"failed its health poll ({type(exc).__name__})"
        finally:
            remote.polling = None
        self._polled(remote, why)

    async def _ask(self, remote: Remote) -> str:
        """Why the remote cannot serve the tenant now ('' when it can): one bounded ``GET <base_url>/models``."""
        headers = [(k, v) for k, v in remote.headers(False) if k != b"content-type"]
        try:
            async with asyncio.timeout(POLL_TIMEOUT), remote.client.stream("GET", "/models", headers=headers) as response:
                data = bytearray()
                async for chunk in decoded(response):
                    data += chunk
                    if len(data) > MAX_POLL_BYTES:
                        return f"answered GET /models with more than {MAX_POLL_BYTES} bytes"
        except TimeoutError:
            return f"did not answer GET /models within {POLL_TIMEOUT:g}s"
        except Fallback as exc:
            return f"answered GET /models with {exc}"
        except (httpx.HTTPError, OSError) as exc:
            return f"is unreachable ({type(exc).__name__})"
        try:
            document = await bounded(len(data), loads, bytes(data)) if response.status_code == 200 else None
        except ValueError:
            document = None
        return listed(response.status_code, document, remote.spec.model)

    def _polled(self, remote: Remote, reason: str) -> None:
        """A poll's outcome: it serves (``reason`` empty), or it is unavailable (asked again with backoff)."""
        why = f"{remote.spec.base_url} {reason}" if reason else ""
        now = time.monotonic()
        remote.last_poll = now
        if self.by_tenant.get(remote.tenant) is not remote:
            return  # replaced by a reload meanwhile
        if why:
            remote.failures += 1
            remote.next_poll = now + backoff(remote.failures, remote.spec.poll_seconds)
            if remote.up is not False or remote.why != why:
                log.warning("%s: unavailable: %s", remote.tenant, why)
        else:
            if remote.up is False:
                log.info("%s: %s answers again", remote.tenant, remote.spec.base_url)
            remote.failures = 0
            remote.next_poll = now + remote.spec.poll_seconds
        remote.up, remote.why = not why, why
        self.up.labels(remote.tenant).set(0 if why else 1)
        self._show(remote)

    def _failed(self, remote: Remote, reason: str) -> None:
        """A request could not reach the remote: unavailable now, and asked again soon."""
        if self.by_tenant.get(remote.tenant) is not remote:
            return
        self._polled(remote, reason)

    def _recheck(self, remote: Remote) -> None:
        """A request failed in a way a poll may explain (its key refused, a 5xx): ask soon, not every request."""
        remote.next_poll = min(remote.next_poll, max(time.monotonic(), remote.last_poll + _RECHECK))

    def _show(self, remote: Remote, pump: bool = True) -> None:
        """The slot says what the remote's health is: serving (admission places requests), unavailable
        (503 at once, saying why), or loading (not polled yet: requests wait for the first poll)."""
        with self.table.lock:
            slot = self.table.slots.get(remote.tenant)
            if slot is None or not slot.remote:
                return
            if remote.up is None:
                slot.phase, slot.path, slot.refusal = "loading", None, None
            elif remote.up:
                slot.phase, slot.path, slot.refusal = "serving", f"remote:{remote.tenant}", None
            else:
                slot.phase, slot.path = "serving", None
                slot.refusal = f"tenant '{remote.tenant}' is unavailable: {remote.why}"
        if pump:
            self.admission.pump(remote.tenant)

    # -- the router's loop: requests ---------------------------------------------------------------
    async def forward(self, scope: Scope, receive: Receive, send: Send, parsed: Parsed, priority: int, size: int) -> None:
        """A request for the remote tenant itself (a route's goes through ``attempt``): a place here, then its answer."""
        tenant = parsed.tenant
        if (problem := self._refusal(scope["path"], parsed)) is not None:
            await respond(send, *problem)
            return
        gone = asyncio.ensure_future(disconnected(receive))
        code = 0
        try:
            placing = asyncio.ensure_future(self.admission.place(tenant, priority))
            try:
                where = await self.admission.wait(placing, gone, tenant, None)
            except (Unavailable, QueueFull, TimeoutError) as exc:
                code = 429 if isinstance(exc, QueueFull) else 503
                message = str(exc) or f"tenant '{tenant}': its remote was not polled within {self.load_wait:.0f}s"
                await respond(send, *error(code, message, code="queue_full" if code == 429 else "model_unavailable"),
                              headers=[(b"retry-after", b"1" if code == 429 else b"5")])  # fmt: skip
                return
            if where is None:
                return  # the client left while it waited
            try:
                code = await self.attempt(tenant, scope["path"], parsed.document, size, send, gone, parsed.stream, priority, {}, lambda: None, None)
            except ValueError:
                code = 400
                await respond(send, *error(400, "body: holds a number too large for JSON to carry (such as 1e999)", param="body"))
            except Fallback as exc:
                code = 429 if exc.kind == "queue_full" else 503
                await respond(send, *error(code, f"tenant '{tenant}': {exc}", code="queue_full" if code == 429 else "model_unavailable"),
                              headers=[(b"retry-after", b"1" if code == 429 else b"5")])  # fmt: skip
            finally:
                self.admission.release(tenant)
        finally:
            gone.cancel()
            if code:
                self.on_answer(tenant, code)

    def _refusal(self, path: str, parsed: Parsed) -> tuple[int, bytes] | None:
        """What a remote tenant cannot be asked here: no sessions, no adapters, generations only."""
        tenant = parsed.tenant
        if path not in GENERATE:
            what = "sessions" if parsed.session is not None else "adapters" if "lora" in path else "path"
            return error(404 if parsed.session is not None else 400, f"{what}: tenant '{tenant}' is remote (backend 'openai'); it answers "
                         f"{' and '.join(GENERATE)} only", param="session" if parsed.session is not None else None)  # fmt: skip
        model = parsed.document.get("model")
        if isinstance(model, str) and model != tenant:
            return error(404, f"model: {model[:100]!r}: tenant '{tenant}' is remote (backend 'openai') and has no adapters here", param="model",
                         code="model_not_found")  # fmt: skip
        if parsed.in_session:
            return error(400, f"session: tenant '{tenant}' is remote (backend 'openai'); its conversations are not kept here: send the "
                         "whole conversation", param="session")  # fmt: skip
        return None

    async def attempt(self, tenant: str, path: str, document: dict[str, Any], size: int, send: Send, gone: asyncio.Future[None], stream: bool,
                      priority: int, x_zoo: dict[str, Any], committed_to: Callable[[], None], first_token: float | None) -> int:  # fmt: skip
        """One exchange with the tenant's remote (a place among its ``max_concurrent`` first), relayed as a
        peer's answer is; ``Fallback`` while nothing reached the client (a route's next candidate may answer).
        ``size``: the request body's bytes; ``first_token``: a route's, else the tenant's."""
        remote = self.by_tenant.get(tenant)
        if remote is None:
            raise Fallback(f"tenant '{tenant}' is no longer remote here", "unavailable")
        spec = remote.spec
        wait = (first_token or spec.first_token_seconds) if stream else spec.timeout_seconds
        body = await bounded(size, outgoing_body, document, spec, remote.defaults)  # ValueError: the caller's 400
        if not await remote.turn(priority, gone, wait):
            return 499
        try:
            return await relay(remote.client, path.removeprefix("/v1"), remote.headers(stream), body, send, gone, stream, wait,
                               {**x_zoo, "remote": remote.netloc}, committed_to, f"remote {remote.netloc}", spec.timeout_seconds)  # fmt: skip
        except Fallback as exc:
            cause = exc.__cause__.__cause__ if isinstance(exc.__cause__, WorkerFailed) else None
            if isinstance(cause, (httpx.ConnectError, httpx.ConnectTimeout)):
                self._failed(remote, f"is unreachable ({type(cause).__name__})")
            elif exc.kind in ("failed", "crashed"):
                self._recheck(remote)
            raise
        finally:
            remote.release()

    # -- what the router says of them --------------------------------------------------------------
    def health(self, slot: Slot, now: float) -> HealthTenant:
        """``/health``'s entry for a remote tenant's slot (under the table's lock)."""
        remote = self.by_tenant.get(slot.tenant)
        state = "loading" if remote is None or remote.up is None else "serving" if remote.up else "unavailable"
        return HealthTenant.model_validate({
            "state": state, "pinned": False, "model": remote.spec.model if remote else None, "running": remote.running if remote else 0,
            "waiting": (len(remote.waiting) if remote else 0) + slot.queued, "inflight": slot.inflight,
            "idle_seconds": round(now - slot.last_used, 1) if slot.last_used else None, "footprint": 0,
            **({"error": slot.refusal} if slot.refusal else {})})  # fmt: skip

    def card(self, tid: str, tenant: TenantEntry, phase: str) -> Card:
        """``/v1/models``'s card for a remote tenant: its name at the remote is its root."""
        assert tenant.remote is not None
        remote = self.by_tenant.get(tid)
        state = "unavailable" if remote is not None and remote.up is False else phase
        return Card(id=tid, object="model", created=0, owned_by="model-zoo", root=tenant.remote.model, parent=None,
                    x_zoo=CardZoo(kind="tenant", state=state, backend="openai", task="generate", max_context=tenant.resources.max_context,
                                  adapters=[], description=tenant.description or None))  # fmt: skip

    async def close(self) -> None:
        for remote in [*self.by_tenant.values(), *self.retired]:
            if remote.polling is not None:
                remote.polling.cancel()
            await remote.client.aclose()
