"""`zoo-agent systemd render|install`: one option per UnitSettings field, parsed into that one model."""

from __future__ import annotations

import functools
import logging
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from zoo_agent.cli.options import emit_json, json_option
from zoo_agent.errors import UsageError
from zoo_agent.index.load import load_index
from zoo_agent.systemd.install import activate, install
from zoo_agent.systemd.units import UnitSettings, default_exec, hidden_by_sandbox, render, sysusers

__all__ = ["systemd_group"]

log = logging.getLogger("zoo_agent")


# UnitSettings fields whose flag is not "--" + the field's name.
_FLAGS = {"exec_start": "--exec", "environment": "--env", "extra_args": "--extra-arg", "credentials": "--credential"}


#: One option per UnitSettings field (and the few that make one).
_OPTIONS = [
    click.option("--exec", "exec_start", default=None, help="Command that runs zoo-agent (default: this installation's)."),
    click.option("--index", type=click.Path(path_type=Path), envvar="ZOO_INDEX", default="index.json", show_default=True,
                 help="The index the units apply (made absolute)."),
    click.option("--root", type=click.Path(path_type=Path), default=Path("/var/lib/model-zoo"), show_default=True),
    click.option("--host", default=None, help="Host id in the index (default: the machine's hostname, at run time)."),
    click.option("--user", default="model-zoo", show_default=True),
    click.option("--group", default="model-zoo", show_default=True),
    click.option("--hf-endpoint", default=None, help="A hub mirror (HF_ENDPOINT)."),
    click.option("--hf-token-file", type=click.Path(path_type=Path), default=None, help="Passed with LoadCredential=, never copied."),
    click.option("--offline", is_flag=True),
    click.option("--no-resident", is_flag=True, help="Only fetch and verify: no serving unit."),
    click.option("--listen", default="127.0.0.1:8000", show_default=True, help="host:port or unix:/path"),
    click.option("--api-key-file", type=click.Path(path_type=Path), default=None),
    click.option("--fleet-key-file", type=click.Path(path_type=Path), default=None, help="The fleet key for peers (issue #22); LoadCredential=."),
    click.option("--priority-key-file", type=click.Path(path_type=Path), default=None,
                 help="A client key that may also ask for priority above 'default' (issue #31); LoadCredential=."),
    click.option("--credential", "credentials", multiple=True, metavar="NAME=PATH",
                 help="A credential of the resident (LoadCredential=NAME:PATH), e.g. a remote tenant's key its key_file names (issue #36)."),
    click.option("--watchdog-sec", type=click.IntRange(min=0), default=30, show_default=True, help="0 disables the watchdog."),
    click.option("--memory-max", default=None, help="MemoryMax= of the resident (e.g. 24G)."),
    click.option("--env", "environment", multiple=True, metavar="KEY=VALUE", help="Extra environment for every unit."),
    click.option("--extra-arg", "extra_args", multiple=True, help="Appended to `zoo-agent resident`."),
    click.option("--gpu", type=click.Choice(["none", "nvidia", "rocm"]), default="none", show_default=True),
    click.option("--verify-interval", default="weekly", show_default=True, help="OnCalendar= of the verify timer; '' disables it."),
    click.option("--gc", is_flag=True, help="Run `zoo-agent gc` after every apply."),
    click.option("--ollama-host", default=None, help="An Ollama daemon (OLLAMA_HOST) for ollama sources and backends; after ollama.service."),
    click.option("--textfile-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                 help="node_exporter's textfile-collector directory: the reconcile and verify units write their metrics there."),
    click.option("--hf-cache", type=click.Path(path_type=Path, file_okay=False), default=None,
                 help="Run `zoo-agent export hf-cache DIR` after every apply (and gc): the zoo as a Hugging Face cache of links."),
    click.option("--llama-server", type=click.Path(path_type=Path, dir_okay=False), default=None,
                 help="llama.cpp's server for tenants with backend 'llama.cpp' (`resident --llama-server`; default: the one on the unit's PATH)."),
]


def _unit_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """One option per UnitSettings field; parsed into the one settings model."""

    @functools.wraps(func)
    def wrapper(*, exec_start: str | None, index: Path, no_resident: bool, environment: tuple[str, ...], credentials: tuple[str, ...],
                verify_interval: str, **kwargs: Any) -> Any:
        fields = {name: kwargs.pop(name) for name in list(kwargs) if name in UnitSettings.model_fields}
        env = {}
        for item in environment:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"--env {item!r}: expected KEY=VALUE")
            env[key] = value
        loaded: dict[str, Path] = {}
        for item in credentials:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"--credential {item!r}: expected NAME=PATH")
            if name in loaded:
                raise UsageError(f"--credential {name}: given twice")
            loaded[name] = Path(path)
        try:
            argv = tuple(shlex.split(exec_start)) if exec_start else default_exec()
        except ValueError as exc:
            raise UsageError(f"--exec: {exc}") from exc
        try:
            settings = UnitSettings(exec_start=argv, index=index.absolute(), resident=not no_resident, environment=env, credentials=loaded,
                                    verify_interval=verify_interval or None, **fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            flag = _FLAGS.get(str(first["loc"][0]), "--" + str(first["loc"][0]).replace("_", "-"))
            raise UsageError(f"{flag}: {first['msg'].removeprefix('Value error, ')}") from exc
        return func(settings=settings, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


@click.group("systemd")
def systemd_group() -> None:
    """Units for hosts without NixOS: the same ones modules/model-zoo.nix declares."""

@systemd_group.command("render")
@_unit_options
@json_option
def render_cmd(settings: UnitSettings, as_json: bool) -> None:
    """Print the units (nothing is written)."""
    for problem in hidden_by_sandbox(settings):
        log.warning("%s", problem)
    units = render(settings)
    if as_json:
        emit_json({"units": units, "sysusers": sysusers(settings)})
        return
    click.echo("\n".join(f"### {name}\n{text}" for name, text in units.items()), nl=False)

@systemd_group.command("install")
@_unit_options
@click.option("--prefix", type=click.Path(path_type=Path), default=Path("/etc/systemd/system"), show_default=True)
@click.option("--sysusers-dir", type=click.Path(path_type=Path), default=Path("/etc/sysusers.d"), show_default=True,
              help="Where the model-zoo user and group are declared (systemd-sysusers creates them).")
@click.option("--dry-run", is_flag=True, help="Say what would be written; write nothing.")
@click.option("--no-activate", is_flag=True, help="Write the files only: no systemd-sysusers, no daemon-reload.")
@json_option
def install_cmd(settings: UnitSettings, prefix: Path, sysusers_dir: Path, dry_run: bool, no_activate: bool, as_json: bool) -> None:
    """Validate the index, write the units, create the user, reload systemd."""
    load_index(settings.index, str(settings.index))
    done = install(settings, prefix, sysusers_dir, dry_run=dry_run)
    ran = [] if dry_run or no_activate else activate(settings)
    if settings.textfile_dir is not None and not dry_run:
        _make_textfile_dir(settings)
    if settings.hf_cache is not None and not dry_run:
        _make_hf_cache_dir(settings)
    if as_json:
        emit_json({"dry_run": dry_run, "files": [{"path": str(f.path), "changed": f.changed} for f in done], "ran": ran})
        return
    verb = "would write" if dry_run else "wrote"
    for f in done:
        click.echo(f"{verb if f.changed else 'unchanged'} {f.path}")
    for command in ran:
        click.echo(f"ran {command}")
    if not dry_run:
        click.echo("next: systemctl enable --now model-zoo-reconcile.service model-zoo-resident.service")


def _make_hf_cache_dir(settings: UnitSettings) -> None:
    """The HF-cache view's directory, as NixOS's tmpfiles rule makes it: the zoo's user and group, 0750
    (its readers need the zoo's group anyway, to read the files its links lead to)."""
    assert settings.hf_cache is not None
    try:
        settings.hf_cache.mkdir(mode=0o750, parents=True, exist_ok=True)
        shutil.chown(settings.hf_cache, settings.user, settings.group)
    except (LookupError, OSError) as exc:  # no such user yet (--no-activate), or not root
        log.warning("%s: could not make it writable by %s: %s (the export after apply will say it cannot write there)",
                    settings.hf_cache, settings.user, exc)


def _make_textfile_dir(settings: UnitSettings) -> None:
    """The textfile directory, writable by the zoo user and readable by node_exporter (another user)."""
    assert settings.textfile_dir is not None
    directory = settings.textfile_dir
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.chown(directory, settings.user, settings.group)
    except (LookupError, OSError) as exc:  # no such user yet (--no-activate), or not root
        log.warning("%s: could not make it writable by %s: %s (apply will log that it cannot write its metrics)",
                    directory, settings.user, exc)
