"""The ``zoo-agent`` command line: thin click wrappers over typed functions.

The only place that exits: a ``ZooError`` becomes one line on stderr (every line, for an
invalid index) and its exit code; ``--debug`` adds the traceback. With ``--json`` the
error is also the one JSON document on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from zoo_agent import __version__

from zoo_agent.cli import zoo as commands
from zoo_agent.errors import EXIT_CODES, InvalidIndex, ZooError
from zoo_agent.index.fmt import canonical_text, diff, write_index
from zoo_agent.index.schema import render_schema
from zoo_agent.index.load import check_document, read_document

__all__ = ["cli", "main"]

log = logging.getLogger("zoo_agent")


def emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=False))


class _Stderr(logging.Handler):
    """Logs to whatever sys.stderr is now (not the one seen at start-up), one line each."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ZooError as exc:
            if ctx.meta.get("zoo.debug"):
                traceback.print_exc()
            if ctx.meta.get("zoo.json"):
                problems = [p.__dict__ for p in exc.problems] if isinstance(exc, InvalidIndex) else []
                emit_json({"error": {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code, "problems": problems}})
            lines = [str(exc)]
            if isinstance(exc, InvalidIndex):
                lines = exc.lines()
                if len(lines) > 1:
                    lines.append(f"{exc.file}: invalid ({len(lines)} problems)")
            try:
                for line in lines:
                    click.echo(line, err=True)
            except BrokenPipeError:  # `zoo-agent validate | head`: the exit code still counts
                pass
            ctx.exit(exc.exit_code)


def _exit_code_table() -> str:
    return "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items())


@click.group(cls=_Group, epilog="\b\nExit codes:\n" + _exit_code_table())
@click.version_option(__version__, prog_name="zoo-agent")
@click.option("--debug", is_flag=True, envvar="ZOO_DEBUG", help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Declarative model zoo: validate an index, reconcile a host's zoo, serve its model."""
    ctx.meta["zoo.debug"] = debug
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("zoo-agent: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)


def json_option(func: Any) -> Any:
    def remember(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        ctx.meta["zoo.json"] = value
        return value

    return click.option(
        "--json", "as_json", is_flag=True, expose_value=True, is_eager=True, callback=remember,
        help="Print one JSON document on stdout.",
    )(func)  # fmt: skip


index_argument = click.argument(
    "index", required=False, default="index.json", envvar="ZOO_INDEX", type=click.Path(path_type=Path, dir_okay=True)
)


@cli.command()
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
        (("model", idx.models), ("lora", idx.loras), ("tenant", idx.tenants), ("host", idx.hosts))
    )  # fmt: skip
    click.echo(f"{index}: valid ({counts})")


@cli.command()
def schema() -> None:
    """Print the index's JSON Schema (the checked-in schema.json)."""
    click.echo(render_schema(), nl=False)


@cli.command()
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


commands.register(cli, json_option, emit_json)


def main() -> None:
    try:
        cli(prog_name="zoo-agent")
    except BrokenPipeError:
        # The reader went away (`| head`); keep Python from complaining at exit.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        sys.exit(1)
