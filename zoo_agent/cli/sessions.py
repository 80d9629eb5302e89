"""`zoo-agent sessions list|show|export|import|prune` (issue #9) and `checkpoint|restore|delete-checkpoint`
(issue #36): conversations as files in the zoo.

They work on `resident/tenants/<tenant>/sessions/` directly, so they run with or without a
resident (and without torch). Backups include them (they live under `resident/`).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from zoo_agent.cli.options import Target, emit_json, json_option, zoo_options
from zoo_agent.errors import Problem, UsageError, ZooError
from zoo_agent.index.load import load_index
from zoo_agent.index.model import ID_PATTERN, CheckpointRetention
from zoo_agent.resident.sessions.checkpoints import CheckpointRecord, Checkpoints
from zoo_agent.resident.sessions.store import cache_files, remove_session
from zoo_agent.resident.sessions.transcript import SessionDamaged, SessionError, SessionFile, read_session, valid_id
from zoo_agent.store.durable import DIR_MODE, FILE_MODE, write_atomic

__all__ = ["sessions_group"]

log = logging.getLogger("zoo_agent.sessions")


def _tenant_dir(target: Target, tenant: str | None) -> tuple[str, Path]:
    """The tenant's directory in the zoo. ``--tenant`` becomes a path component, so it must be
    a tenant id of the index: a path (absolute, ``../..``) would read, write and delete
    outside the zoo (issue #17). The id is checked before the index is read."""
    if tenant is not None and not re.fullmatch(ID_PATTERN, tenant):
        raise UsageError(f"--tenant {_shown(tenant)}: not a tenant id (lowercase letters, digits, '.', '_', '-'; at most 64)")
    idx = load_index(target.index, str(target.index))
    if tenant is None:
        host = idx.hosts.get(target.host.lower())
        if host is None or not host.served():
            raise UsageError(f"host '{target.host}' serves no tenant in {target.index}; pass --tenant")
        tenant = host.served()[0]  # the host's first tenant is its default
    elif tenant not in idx.tenants:
        raise UsageError(f"--tenant '{tenant}': no such tenant in {target.index} (tenants: {', '.join(sorted(idx.tenants)) or 'none'})")
    return tenant, target.zoo.tenant_dir(tenant)


def _scope(target: Target, tenant: str | None, route: str | None) -> tuple[str, Path, str]:
    """``(id, directory, "tenant" | "route")``: a route's sessions move between its tenants (issue #21)."""
    if route is None:
        return (*_tenant_dir(target, tenant), "tenant")
    if tenant is not None:
        raise UsageError("--tenant and --route: pass one (a session is a tenant's or a route's)")
    if not re.fullmatch(ID_PATTERN, route):
        raise UsageError(f"--route {_shown(route)}: not a route id (lowercase letters, digits, '.', '_', '-'; at most 64)")
    idx = load_index(target.index, str(target.index))
    if route not in idx.routes:
        raise UsageError(f"--route '{route}': no such route in {target.index} (routes: {', '.join(sorted(idx.routes)) or 'none'})")
    return route, target.zoo.route_dir(route), "route"


def _shown(text: str) -> str:
    """A user's string in a one-line message: quoted, escaped, bounded."""
    return repr(text[:80])[:100]


def _load(path: Path, vocab_size: int | None = None) -> SessionFile:
    try:
        return read_session(path, vocab_size=vocab_size)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such session") from None
    except SessionDamaged as exc:
        raise UsageError(str(exc)) from exc


def _stored(base: Path, sid: str) -> SessionFile:
    """A session of the tenant; its file must hold that session."""
    path = base / "sessions" / f"{_id(sid)}.json"
    session = _load(path)
    if session.id != sid:
        raise UsageError(Problem("/id", f"is '{session.id}', but the file is {sid}.json").line(str(path)))
    return session


def _policy(target: Target, tid: str, kind: str) -> CheckpointRetention:
    """The index's ``sessions.checkpoints`` for a tenant, or for a route (its default tenant's)."""
    idx = load_index(target.index, str(target.index))
    return idx.tenants[tid if kind == "tenant" else idx.routes[tid].default].sessions.checkpoints


def _record(record: CheckpointRecord) -> dict[str, Any]:
    return record.model_dump(mode="json")


def _rows(base: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The tenant's sessions, and its damaged session files (reported and skipped, never fatal)."""
    rows, damaged = [], []
    for path in sorted((base / "sessions").glob("*.json")):
        try:
            data = _stored(base, path.stem)
        except UsageError as exc:
            log.warning("%s; skipped", exc)
            damaged.append({"file": str(path), "error": str(exc)})
            continue
        turns = data.turns
        rows.append({"id": data.id, "turns": len(turns), "created": data.created, "updated": data.updated,
                     "model": turns[-1].model if turns else None, "adapter": turns[-1].adapter if turns else None,
                     "cached": bool(cache_files(base / "kv-cache", data.id))})  # fmt: skip
    return rows, damaged


def _vocab_size(target: Target, tid: str) -> int | None:
    """The vocabulary of the tenant's current model, from its config.json, when the zoo has it
    (the resident checks token ids again on load)."""
    try:
        idx = load_index(target.index, str(target.index))
        config = json.loads((target.zoo.root / "models" / idx.tenants[tid].model / "current" / "config.json").read_text())
    except (ZooError, OSError, ValueError, KeyError):
        return None
    size = config.get("vocab_size") if isinstance(config, dict) else None
    if size is None and isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        size = config["text_config"].get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _id(sid: str) -> str:
    try:
        return valid_id(sid)
    except SessionError as exc:
        raise UsageError(str(exc)) from exc

tenant_option = click.option("--tenant", default=None, help="Tenant id (default: the host's resident tenant).")
route_option = click.option("--route", default=None, help="Route id: the sessions that move between the route's tenants.")

@click.group("sessions")
def sessions_group() -> None:
    """Conversations kept by the resident: list, show, export, import, prune."""

@sessions_group.command("list")
@zoo_options
@tenant_option
@route_option
@json_option
def list_cmd(target: Target, tenant: str | None, route: str | None, as_json: bool) -> None:
    """Every session of the tenant, most recently used last."""
    tid, base, kind = _scope(target, tenant, route)
    rows, damaged = _rows(base)
    rows.sort(key=lambda r: r["updated"] or "")
    checkpoints, damaged_sets = Checkpoints(base, route=kind == "route").listed()
    for r in rows:
        r["checkpoints"] = [c.name for c in checkpoints if c.session == r["id"]]
    if as_json:
        emit_json({kind: tid, "sessions": rows, "checkpoints": [_record(c) for c in checkpoints], "damaged": damaged + damaged_sets})
        return
    for r in rows:
        frozen = f"  ({len(r['checkpoints'])} checkpoints)" if r["checkpoints"] else ""
        click.echo(f"{r['id']:<24} {r['turns']:>4} turns  {r['updated']}  {r['model']}{' +' + r['adapter'] if r['adapter'] else ''}"
                   f"{'  (cache)' if r['cached'] else ''}{frozen}")  # fmt: skip
    for d in damaged:
        click.echo(f"{Path(d['file']).stem:<24} damaged (skipped): {d['error']}")
    if checkpoints:
        click.echo("checkpoints:")
    for c in checkpoints:
        click.echo(f"  {c.name:<40} of {c.session:<24} {c.turns:>4} turns  {c.created}  {c.kind}")
    for d in damaged_sets:
        click.echo(f"checkpoints of {Path(d['file']).parent.name}: damaged (skipped): {d['error']}")
    if not rows and not damaged and not checkpoints:
        click.echo(f"no sessions for {kind} {tid}")

@sessions_group.command("show")
@zoo_options
@tenant_option
@route_option
@click.argument("session_id")
@json_option
def show_cmd(target: Target, tenant: str | None, route: str | None, session_id: str, as_json: bool) -> None:
    """The conversation, turn by turn."""
    _, base, _ = _scope(target, tenant, route)
    data = _stored(base, session_id)
    if as_json:
        emit_json(data.document())
        return
    for n, turn in enumerate(data.turns, 1):
        click.echo(f"--- turn {n} · {turn.model}{' +' + turn.adapter if turn.adapter else ''} · {turn.time}")
        for message in turn.messages:
            click.echo(f"{message.role}: {message.content}")

@sessions_group.command("export")
@zoo_options
@tenant_option
@route_option
@click.argument("session_id")
def export_cmd(target: Target, tenant: str | None, route: str | None, session_id: str) -> None:
    """The session's transcript as one JSON document on stdout (the cache stays: it is only an accelerator)."""
    _, base, _ = _scope(target, tenant, route)
    click.echo(json.dumps(_stored(base, session_id).document(), indent=1))

@sessions_group.command("import")
@zoo_options
@tenant_option
@route_option
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace a session with the same id.")
@json_option
def import_cmd(target: Target, tenant: str | None, route: str | None, file: Path, force: bool, as_json: bool) -> None:
    """Add an exported transcript; the resident re-prefills it on its next turn.

    The file is validated as the resident writes sessions (and its token ids against the
    tenant's vocabulary when the zoo has the model): a damaged one is refused here, in one
    line naming the file and the JSON pointer, not left to fail the resident later."""
    tid, base, kind = _scope(target, tenant, route)
    data = _load(file, _vocab_size(target, tid) if kind == "tenant" else None)  # a route's turns: checked per model on load
    sid = data.id
    dest = base / "sessions" / f"{sid}.json"
    if dest.exists() and not force:
        raise UsageError(f"{dest}: session '{sid}' exists; pass --force to replace it")
    dest.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    write_atomic(dest, (json.dumps(data.document(), indent=1) + "\n").encode(), FILE_MODE)
    for cache in cache_files(base / "kv-cache", sid):  # a cache of the replaced session must not be used
        cache.unlink(missing_ok=True)
    if as_json:
        emit_json({kind: tid, "id": sid, "turns": len(data.turns)})
    else:
        click.echo(f"imported session {sid} ({len(data.turns)} turns) for {kind} {tid}")

@sessions_group.command("prune")
@zoo_options
@tenant_option
@route_option
@click.option("--dry-run", is_flag=True, help="Say what would be removed.")
@json_option
def prune_cmd(target: Target, tenant: str | None, route: str | None, dry_run: bool, as_json: bool) -> None:
    """Apply the tenant's `sessions` retention (count and age) from the index."""
    tid, base, kind = _scope(target, tenant, route)
    idx = load_index(target.index, str(target.index))
    if kind == "tenant" and tid not in idx.tenants:
        raise UsageError(f"tenant '{tid}' is not in {target.index}")
    keep = idx.tenants[tid if kind == "tenant" else idx.routes[tid].default].sessions  # a route keeps as its default tenant does
    cutoff = (datetime.now(UTC) - timedelta(days=keep.max_age_days)).isoformat()
    rows, damaged = _rows(base)  # damaged files are left for a person to look at
    rows.sort(key=lambda r: r["updated"] or "", reverse=True)
    doomed = [r["id"] for i, r in enumerate(rows) if i >= keep.keep or (r["updated"] or "") < cutoff.replace("+00:00", "Z")]
    if not dry_run:
        for sid in doomed:
            remove_session(base, sid)
    if as_json:
        emit_json({kind: tid, "dry_run": dry_run, "removed": doomed, "kept": len(rows) - len(doomed), "damaged": [d["file"] for d in damaged]})
    else:
        verb = "would remove" if dry_run else "removed"
        click.echo(f"{verb} {len(doomed)} of {len(rows)} sessions (keep {keep.keep}, at most {keep.max_age_days} days)"
                   + (f"; {len(damaged)} damaged skipped" if damaged else ""))  # fmt: skip

@sessions_group.command("checkpoint")
@zoo_options
@tenant_option
@route_option
@click.argument("session_id")
@click.option("--name", default=None, help="The checkpoint's name (default: the session's id and the time); unique among the tenant's.")
@json_option
def checkpoint_cmd(target: Target, tenant: str | None, route: str | None, session_id: str, name: str | None, as_json: bool) -> None:
    """Freeze the session's transcript and KV caches under a name (issue #36).

    The session keeps going; `restore` makes a new session from the checkpoint, which continues
    from the frozen cache. Each session keeps the index's `sessions.checkpoints.keep` newest."""
    tid, base, kind = _scope(target, tenant, route)
    record, dropped = Checkpoints(base, route=kind == "route").create(session_id, name, keep=_policy(target, tid, kind).keep)
    if as_json:
        emit_json({kind: tid, "checkpoint": _record(record), "dropped": dropped})
    else:
        click.echo(f"checkpoint {record.name} of session {record.session} ({record.turns} turns, {record.caches} cache files)"
                   + (f"; dropped {', '.join(dropped)} (keep {_policy(target, tid, kind).keep})" if dropped else ""))  # fmt: skip

@sessions_group.command("restore")
@zoo_options
@tenant_option
@route_option
@click.argument("checkpoint")
@click.option("--as", "new_id", default=None, help="The new session's id (default: the checkpoint's session id and 8 random hex digits).")
@json_option
def restore_cmd(target: Target, tenant: str | None, route: str | None, checkpoint: str, new_id: str | None, as_json: bool) -> None:
    """Make a new session from a checkpoint: its transcript and its caches, as they were (issue #36)."""
    tid, base, kind = _scope(target, tenant, route)
    sid, record = Checkpoints(base, route=kind == "route").restore(checkpoint, new_id)
    if as_json:
        emit_json({kind: tid, "id": sid, "checkpoint": _record(record)})
    else:
        click.echo(f"restored checkpoint {record.name} of session {record.session} as session {sid} ({record.turns} turns)")

@sessions_group.command("delete-checkpoint")
@zoo_options
@tenant_option
@route_option
@click.argument("checkpoint")
@json_option
def delete_checkpoint_cmd(target: Target, tenant: str | None, route: str | None, checkpoint: str, as_json: bool) -> None:
    """Remove a checkpoint (its session, and the sessions restored from it, stay)."""
    tid, base, kind = _scope(target, tenant, route)
    record = Checkpoints(base, route=kind == "route").delete(checkpoint)
    if as_json:
        emit_json({kind: tid, "deleted": _record(record)})
    else:
        click.echo(f"deleted checkpoint {record.name} of session {record.session}")
