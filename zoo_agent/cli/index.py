"""`zoo-agent validate | schema | fmt`: the index file itself, before any zoo is involved."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from zoo_agent.cli.options import emit_json, index_argument, json_option
from zoo_agent.errors import InvalidIndex
from zoo_agent.index.fmt import canonical_text, diff
from zoo_agent.index.load import check_document, read_document
from zoo_agent.index.schema import render_schema
from zoo_agent.pin import write_index

__all__ = ["fmt", "schema", "validate"]


@click.command()
@index_argument
@json_option
def validate(index: Path, as_json: bool) -> None:
    """Check INDEX (default ./index.json or $ZOO_INDEX) against the schema and the rules."""
    idx, problems = check_document(read_document(index, str(index)))
    if as_json:
        emit_json({"valid": not problems, "errors": [{"pointer": p.pointer, "message": p.message} for p in problems]})
        if problems:
            sys.exit(InvalidIndex.exit_code)
        return
    if problems:
        raise InvalidIndex(str(index), problems)
    assert idx is not None
    counts = ", ".join(
        f"{len(entries)} {kind}{'' if len(entries) == 1 else 's'}" for kind, entries in
        (("model", idx.models), ("lora", idx.loras), ("tenant", idx.tenants), *((("route", idx.routes),) if idx.routes else ()), ("host", idx.hosts))
    )  # fmt: skip
    click.echo(f"{index}: valid ({counts})")


@click.command()
def schema() -> None:
    """Print the index's JSON Schema (the checked-in schema.json)."""
    click.echo(render_schema(), nl=False)


@click.command()
@click.option("--check", is_flag=True, help="Change nothing; exit 1 and show a diff if not canonical.")
@index_argument
@json_option
def fmt(index: Path, check: bool, as_json: bool) -> None:
    """Rewrite INDEX in canonical form (sorted ids, fixed key order, 2-space indent)."""
    document = read_document(index, str(index))
    before = index.read_bytes().decode("utf-8-sig")
    after = canonical_text(document)
    canonical = before == after
    if as_json:
        emit_json({"file": str(index), "canonical": canonical, "changed": not canonical and not check})
    if check:
        if not canonical:
            if not as_json:
                click.echo(diff(before, after, str(index)), nl=False)
            click.echo(f"{index}: not in canonical form; run: zoo-agent fmt {index}", err=True)
            sys.exit(1)
        return
    if not canonical:
        write_index(index, after)
    if not as_json:
        click.echo(f"{index}: {'reformatted' if not canonical else 'already canonical'}")
