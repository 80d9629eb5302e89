"""The ``zoo-agent`` command line: thin click wrappers over typed functions.

The only place that exits: a ``ZooError`` becomes one line on stderr (every line, for an
invalid index) and its exit code; ``--debug`` adds the traceback. With ``--json`` the
error is also the one JSON document on stdout.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

import click

from zoo_agent._version import __version__
from zoo_agent.cli import chat, demo, export, fleet, host, index, registry, resident, sessions, systemd, zoo
from zoo_agent.cli.options import emit_json
from zoo_agent.errors import EXIT_CODES, InvalidIndex, ZooError

__all__ = ["cli", "main"]

log = logging.getLogger("zoo_agent")


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


# Every command, in the order of the data flow; each module holds one family.
for _command in (
    index.validate, index.schema, index.fmt, zoo.add_cmd, registry.registry_group,
    zoo.plan_cmd, zoo.apply_cmd, zoo.status_cmd, zoo.verify_cmd, zoo.rollback_cmd, zoo.gc_cmd, export.export_group,
    host.host_group, host.log_cmd, host.backup_cmd, host.restore_cmd,
    resident.resident, fleet.fleet_group, sessions.sessions_group, chat.chat_cmd, systemd.systemd_group, demo.demo_cmd,
):  # fmt: skip
    cli.add_command(_command)


def main() -> None:
    try:
        cli(prog_name="zoo-agent")
    except BrokenPipeError:
        # The reader went away (`| head`); keep Python from complaining at exit.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        sys.exit(1)
