"""`zoo-agent export hf-cache DIR`: the zoo where other tools look for models (issue #35)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from zoo_agent.cli.options import emit_json, json_option
from zoo_agent.store.hfcache import export_hf_cache
from zoo_agent.store.zoo import Zoo

__all__ = ["export_group"]


@click.group("export")
def export_group() -> None:
    """Views of the zoo for other tools (links to its verified files, never copies)."""


@export_group.command("hf-cache")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--root", type=click.Path(path_type=Path), envvar="ZOO_ROOT", default="/var/lib/model-zoo", show_default=True,
              help="The zoo's directory ($ZOO_ROOT).")
@json_option
def hf_cache_cmd(directory: Path, root: Path, as_json: bool) -> None:
    """Lay out DIRECTORY as a Hugging Face hub cache of the zoo's hub-sourced models and adapters.

    \b
    HF_HUB_CACHE=DIRECTORY then lets transformers, sentence-transformers and diffusers load
    them by repository id offline: from_pretrained("org/name", local_files_only=True). Each
    file is a link to the zoo's read-only file of the current version, checked against its
    manifest first; refs/main names that commit. Run it again after apply: a version gc
    removed leaves its links dangling until then."""
    result = export_hf_cache(Zoo(root), directory)
    if as_json:
        emit_json({"directory": str(directory), "root": str(root), "ok": not result.problems,
                   "repos": [{"repo": s.repo, "revision": s.revision, "artifact": s.artifact, "files": len(s.files)} for s in result.snapshots],
                   "removed": result.removed, "problems": result.problems})  # fmt: skip
    else:
        for line in result.problems:
            click.echo(line, err=True)
        for s in result.snapshots:
            click.echo(f"{s.repo}@{s.revision[:12]}: {len(s.files)} files of {s.artifact}")
        click.echo(f"{directory}: {len(result.snapshots)} hub repositories" + (f", {len(result.problems)} left out" if result.problems else ""))
    if result.problems:
        sys.exit(1)
