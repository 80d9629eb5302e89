"""Host commands (issue #10): `host init`, `log`, `backup`, `restore`. Thin click wrappers."""

from __future__ import annotations

from pathlib import Path

import click

from zoo_agent.cli.options import Target, emit_json, json_option, wait_option, zoo_options
from zoo_agent.errors import UsageError
from zoo_agent.store.backup import backup, check_backup, restore
from zoo_agent.store.host import import_state, init_identity, parse_since, read_actions

__all__ = ["backup_cmd", "host_group", "log_cmd", "restore_cmd"]

@click.group("host")
def host_group() -> None:
    """The host's own state: identity and imported application state (never touched by gc)."""

@host_group.command("init")
@zoo_options
@click.option("--name", default=None, help="The host's name (default: its id in the index, --host).")
@click.option("--import", "import_dir", type=click.Path(path_type=Path), default=None, help="Copy an existing host state directory into host/.")
@click.option("--force", is_flag=True, help="Overwrite existing files (and a new identity id).")
@wait_option
@json_option
def init_cmd(target: Target, name: str | None, import_dir: Path | None, force: bool, wait: float, as_json: bool) -> None:
    """Create host/identity.json, or import a state directory from another machine."""
    if import_dir is not None and not import_dir.is_dir():
        raise UsageError(f"--import {import_dir}: not a directory")
    target.zoo.check_root(create=True)
    with target.zoo.lock(wait):
        imported = import_state(target.zoo, import_dir, force=force) if import_dir else []
        identity, created = init_identity(target.zoo, name or target.host, force=force and not import_dir)
    if as_json:
        emit_json({"identity": identity, "created": created, "imported": imported})
        return
    if imported:
        click.echo(f"imported {len(imported)} files from {import_dir} into {target.zoo.root / 'host'}")
    verb = "created" if created else "kept"
    click.echo(f"{verb} host identity {identity['name']} ({identity['id']}) in {target.zoo.identity_file}")

@click.command("log")
@zoo_options
@click.option("--since", default=None, help="2026-11-21, 2026-11-21T08:00, or a span: 30m, 2h, 7d.")
@json_option
def log_cmd(target: Target, since: str | None, as_json: bool) -> None:
    """What the agent did to this zoo, oldest first (host/actions.jsonl and its rotations)."""
    records = list(read_actions(target.zoo, parse_since(since) if since else None))
    if as_json:
        emit_json({"root": str(target.zoo.root), "actions": records})
        return
    for r in records:
        size = f" {r['bytes']} B" if r.get("bytes") else ""
        error = f": {r['error']}" if r.get("error") else ""
        click.echo(f"{r['time']}  {r['result']:<6} {r['action']} {r['kind'][:-1]} {r['id']} {r['version']}{size} in {r.get('duration_s', 0):.2f}s{error}")
    if not records:
        click.echo("no actions recorded" + (f" since {since}" if since else ""))

@click.command("backup")
@zoo_options
@click.option("--to", "dest", type=click.Path(path_type=Path), required=True, help="Backup directory (created; incremental when it holds an earlier backup).")
@click.option("--include-models", is_flag=True, help="Also the model and adapter files (otherwise apply fetches them again).")
@wait_option
@json_option
def backup_cmd(target: Target, dest: Path, include_models: bool, wait: float, as_json: bool) -> None:
    """Copy host state, resident state, the applied index and every manifest."""
    if not target.zoo.root.is_dir():
        raise UsageError(f"{target.zoo.root}: no zoo here (run zoo-agent apply first, or pass --root)")
    with target.zoo.lock(wait):
        summary = backup(target.zoo, dest, host=target.host, include_models=include_models)
    if as_json:
        emit_json({"to": str(dest), **summary.as_dict()})
    else:
        click.echo(f"backed up {summary.files} files ({summary.bytes} B) to {dest}; {summary.bytes_written} B written this time")

@click.command("restore")
@zoo_options
@click.option("--from", "source", type=click.Path(path_type=Path), required=True, help="A directory written by zoo-agent backup.")
@wait_option
@json_option
def restore_cmd(target: Target, source: Path, wait: float, as_json: bool) -> None:
    """Check every file of a backup, then restore it; `apply` fetches the rest."""
    manifest = check_backup(source)  # every byte, before the zoo (or its root) is touched
    target.zoo.check_root(create=True)
    with target.zoo.lock(wait):
        summary = restore(target.zoo, source, manifest)
    if as_json:
        emit_json({"from": str(source), **summary.as_dict()})
        return
    click.echo(f"restored {summary.files} files from {source}")
    if summary.skipped:
        click.echo(f"not in the backup, to fetch: {', '.join(summary.skipped)}; next: zoo-agent apply")
