"""`zoo-agent fleet status` (issue #22): ask every endpoint the index declares what it
serves, and compare with what the index pins. Read-only; hosts never coordinate state.

Each endpoint is asked ``/health`` and ``/v1/models``, all at once (threads, at most
``_PARALLEL``), and each host's whole exchange, both requests from the first byte to the
last, has ``--timeout`` seconds of wall time: a server that trickles one byte at a time
cannot hold the run (issue #31), so it takes about one timeout however many hosts are
down or slow. Every answer is read through the one bounded JSON reader
(``zoo_agent.jsonbound``), then as the typed documents of ``resident/wire/documents.py``
(a field of the wrong type is that host's error, naming the field). The comparison (``fleet_rows``) is pure; only ``_ask`` touches
the network.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from zoo_agent.cli.options import emit_json, json_option, printable
from zoo_agent.errors import UsageError
from zoo_agent.index.load import load_index
from zoo_agent.index.model import Index
from zoo_agent.jsonbound import loads
from zoo_agent.resident.listener import read_api_key
from zoo_agent.resident.router.peers import pinned, served_state, tenant_digest
from zoo_agent.resident.wire.documents import Card, Health, Malformed, ModelList, validate
from zoo_agent.resident.wire.headers import PEER

__all__ = ["Answer", "fleet_group", "fleet_rows"]

_PARALLEL = 16
_MAX_ANSWER = 4 << 20  # a /v1/models list is a few kB; a larger answer is not a resident's
_MAX_MESSAGE = 200  # characters of a host's error message shown in a row


@dataclass(frozen=True)
class Answer:
    """What one endpoint said: its ``/health`` state and its tenant cards, or why it did not."""

    error: str | None = None
    health: str | None = None
    cards: Mapping[str, Card] = field(default_factory=dict)


class _Unanswered(Exception):
    pass


_LATE = "late"  # a thread past its deadline says so; _ask_all words it with the timeout


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the fleet key to wherever it points: not followed."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _read(response: Any, deadline: float) -> bytes:
    """The body, at most one byte past ``_MAX_ANSWER``, read in pieces until ``deadline``: a
    trickling server leaves this thread soon after the run has stopped waiting for it."""
    chunks: list[bytes] = []
    size = 0
    while size <= _MAX_ANSWER:
        if time.monotonic() >= deadline:
            raise _Unanswered(_LATE)
        chunk = response.read1(min(1 << 16, _MAX_ANSWER + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _get(url: str, key: str | None, deadline: float) -> tuple[int, Any]:
    # With X-Zoo-Peer the key is checked as the fleet key (a host's client key may differ).
    headers = {"Accept": "application/json", **({"Authorization": f"Bearer {key}", PEER: "fleet-status"} if key else {})}
    timeout = max(0.01, deadline - time.monotonic())  # each socket operation; the whole exchange is bounded by _ask_all
    try:
        request = urllib.request.Request(url, headers=headers)
        with _OPENER.open(request, timeout=timeout) as response:
            status, raw = response.status, _read(response, deadline)
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, _read(exc, deadline)
    except http.client.HTTPException as exc:  # not HTTP at all (BadStatusLine, IncompleteRead)
        raise _Unanswered(f"not an HTTP answer ({type(exc).__name__})") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Unanswered(str(getattr(reason, "strerror", None) or reason)) from exc
    except ValueError as exc:  # a URL urllib cannot use (validate refuses these; an index read elsewhere may not)
        raise _Unanswered(f"not a usable URL ({type(exc).__name__})") from exc
    try:
        return status, loads(raw, limit=_MAX_ANSWER)
    except ValueError as exc:
        raise _Unanswered(f"HTTP {status}, not a resident's JSON answer ({exc})") from None


def _ask(endpoint: str, key: str | None, deadline: float) -> Answer:
    try:
        _, health = _get(endpoint + "/health", key, deadline)
        status, models = _get(endpoint + "/v1/models", key, deadline)
    except _Unanswered as exc:
        return Answer(error=str(exc))
    if status != 200 or not isinstance(models, dict) or not isinstance(models.get("data"), list):
        error = models.get("error") if isinstance(models, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        message = printable(message, _MAX_MESSAGE) if isinstance(message, str) else ""
        return Answer(error=f"/v1/models answered HTTP {status}" + (f": {message}" if message else ""))
    try:
        cards = validate(ModelList, models, "/v1/models").by_id()
        state = validate(Health, health, "/health").state if health is not None else None
    except Malformed as exc:  # a resident's document with a field of the wrong type: which one
        return Answer(error=f"not a resident's answer ({exc})")
    return Answer(health=state, cards=cards)


def fleet_rows(idx: Index, answers: Mapping[str, Answer]) -> list[dict[str, Any]]:
    """One row per (host with an endpoint, tenant it serves), in the index's order."""
    rows = []
    for hid, host in idx.hosts.items():
        if hid not in answers:
            continue
        answer = answers[hid]
        for tid in host.served():
            card = answer.cards.get(tid)
            served = ((card.x_zoo.model if card.x_zoo is not None else None) or card.root) if card is not None else None
            if (remote := idx.tenants[tid].remote) is not None:  # a server elsewhere answers it: no pins, its model's name there (issue #36)
                want = remote.model
                state = "unreachable" if answer.error is not None else _remote_state(remote.model, card)
            else:
                want = pinned(idx, tid)
                state = "unreachable" if answer.error is not None else served_state(want, tenant_digest(idx, tid), card)
            rows.append({"host": hid, "endpoint": host.endpoint, "tenant": tid, "served": served, "pinned": want,
                         "state": state, "health": answer.health, "error": answer.error})  # fmt: skip
    return rows


def _remote_state(model: str, card: Card | None) -> str:
    """A remote tenant's card: its name at the remote, and whether that remote answers now."""
    if card is None:
        return "not served"
    if card.root != model:
        return "wrong version"
    return "unavailable" if card.x_zoo is not None and card.x_zoo.state == "unavailable" else "ok"


def _asked(future: Future[Answer], endpoint: str, key: str | None, deadline: float) -> None:
    try:
        future.set_result(_ask(endpoint, key, deadline))
    except Exception as exc:  # noqa: BLE001 - a bug: raised again in the main thread, with its traceback
        future.set_exception(exc)


def _ask_all(endpoints: Mapping[str, str], key: str | None, timeout: float) -> dict[str, Answer]:
    """Every endpoint's answer; each host's whole exchange gets ``timeout`` seconds of wall time.

    Daemon threads, ``_PARALLEL`` at a time: one that has not answered by its deadline is
    left behind (it cannot hold the process at exit) and its host reported as too slow, so
    neither a slow name lookup, a trickling server nor one that never ends its body holds the run."""
    answers: dict[str, Answer] = {}
    items = list(endpoints.items())
    for first in range(0, len(items), _PARALLEL):
        deadline = time.monotonic() + timeout
        futures: dict[str, Future[Answer]] = {}
        for hid, url in items[first : first + _PARALLEL]:
            futures[hid] = Future()
            threading.Thread(target=_asked, args=(futures[hid], url, key, deadline), name=f"fleet-status {hid}", daemon=True).start()
        for hid, future in futures.items():
            try:
                answers[hid] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                answers[hid] = Answer(error=_LATE)
            if answers[hid].error == _LATE:
                answers[hid] = Answer(error=f"timed out: no whole answer within {timeout:g}s")
    return answers


def fleet_status(idx: Index, key: str | None, timeout: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Ask every endpoint at once; the rows, and the hosts that declare none (not asked)."""
    endpoints = {hid: h.endpoint for hid, h in idx.hosts.items() if h.endpoint is not None}
    return fleet_rows(idx, _ask_all(endpoints, key, timeout)), [hid for hid in idx.hosts if hid not in endpoints]


@click.group("fleet")
def fleet_group() -> None:
    """The hosts of one index, seen from outside (issue #22)."""


@fleet_group.command("status")
@click.option("--index", "index_path", type=click.Path(path_type=Path), envvar="ZOO_INDEX", default="index.json", show_default=True,
              help="The fleet's index ($ZOO_INDEX).")
@click.option("--key-file", type=click.Path(path_type=Path), default=None, help="The fleet key (the residents' --fleet-key-file), sent as a bearer token.")
@click.option("--timeout", type=click.FloatRange(min=0.1, max=60), default=3.0, show_default=True,
              help="Seconds each host has for its whole answer (both requests, wall time).")
@json_option
def status_cmd(index_path: Path, key_file: Path | None, timeout: float, as_json: bool) -> None:
    """Ask every host's endpoint what it serves; compare with what INDEX pins.

    Exit 0 when every served tenant is ok, 1 when one differs, is not served or is
    unreachable, 2 for a bad index or flag."""
    idx = load_index(index_path, str(index_path))
    key = read_api_key(key_file, "--key-file") if key_file is not None else None
    if not any(h.endpoint for h in idx.hosts.values()):
        raise UsageError(f"{index_path}: no host declares an 'endpoint'; set hosts.<host>.endpoint for the hosts to ask")
    rows, not_asked = fleet_status(idx, key, timeout)
    ok = all(r["state"] == "ok" for r in rows)
    if as_json:
        emit_json({"index": str(index_path), "ok": ok, "tenants": rows, "not_asked": not_asked})
    else:
        _print_table(rows, not_asked)
    if not ok:
        click.get_current_context().exit(1)


def _print_table(rows: list[dict[str, Any]], not_asked: list[str]) -> None:
    header = ("HOST", "TENANT", "SERVED", "PINNED", "STATE")
    cells = [(r["host"], r["tenant"], printable(str(r["served"] or "-"), _MAX_MESSAGE), r["pinned"], r["state"] + (f" ({printable(r['error'])})" if r["error"] else ""))
             for r in rows]  # fmt: skip
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header) - 1)]
    for line in [header, *cells]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])
    counts = Counter(r["state"] for r in rows)
    click.echo("fleet: " + ", ".join(f"{n} {state}" for state, n in counts.items()) if rows else "fleet: no served tenants")
    if not_asked:
        click.echo(f"not asked (no endpoint): {', '.join(not_asked)}")
