"""The options every command family shares, and what they parse into (one place, one spelling).

``zoo_options`` turns ``--root/--index/--host`` into a ``Target``; ``json_option`` marks the
run so that the error handler in ``main`` prints an error as the one JSON document too.
"""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from zoo_agent.index.load import load_index
from zoo_agent.index.model import Index
from zoo_agent.plan import Desired, desired_for_host, host_id
from zoo_agent.sources import FetchSettings
from zoo_agent.store.zoo import Zoo

__all__ = ["Target", "emit_json", "fetch_options", "index_argument", "json_option", "net_option", "printable", "tenant_option", "textfile_option",
           "wait_option", "zoo_options"]


def emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=False))


def printable(text: str, limit: int | None = None) -> str:
    """Words another host or process sent, safe for a terminal: every control character (an
    escape sequence, a second line) written as its escape, and at most ``limit`` characters
    of the original, then "…" (issue #31)."""
    cut = text if limit is None else text[:limit]
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in cut)
    return shown + ("…" if len(cut) < len(text) else "")


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


@dataclass(frozen=True)
class Target:
    """What every zoo command works on: a root, an index, a host."""

    zoo: Zoo
    index: Path
    host: str
    as_json: bool

    def resolve(self) -> tuple[Index, str]:
        """The loaded index and this host's id in it (a host name with a domain falls back to its short name)."""
        idx = load_index(self.index, str(self.index))
        return idx, host_id(idx, self.host)

    def desired(self) -> Desired:
        idx, host = self.resolve()
        return desired_for_host(idx, host)


def _default_host() -> str:
    return socket.gethostname().lower()


def zoo_options(func: Callable[..., Any]) -> Callable[..., Any]:
    @click.option("--root", type=click.Path(path_type=Path), envvar="ZOO_ROOT", default="/var/lib/model-zoo", show_default=True, help="The zoo's directory ($ZOO_ROOT).")
    @click.option("--index", "index_path", type=click.Path(path_type=Path), envvar="ZOO_INDEX", default="index.json", show_default=True, help="The index ($ZOO_INDEX).")
    @click.option("--host", envvar="ZOO_HOST", default=None, help="Host id in the index ($ZOO_HOST; default: this machine's hostname).")
    @functools.wraps(func)
    def wrapper(root: Path, index_path: Path, host: str | None, **kwargs: Any) -> Any:
        target = Target(Zoo(root), index_path, host or _default_host(), bool(kwargs.get("as_json")))
        return func(target, **kwargs)

    return wrapper


def wait_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--wait", type=click.FloatRange(min=0), default=0.0, help="Seconds to wait for another run's lock (else exit 75).")(func)


def fetch_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """How to reach sources: a hub token file and offline mode. The token itself is never echoed."""

    @click.option("--hf-token-file", type=click.Path(path_type=Path), default=None,
                  help="File holding a Hugging Face token (else $CREDENTIALS_DIRECTORY/hf-token, else HF_TOKEN).")
    @click.option("--offline", is_flag=True, help="No network at all (also HF_HUB_OFFLINE=1); what is missing is reported.")
    @functools.wraps(func)
    def wrapper(*args: Any, hf_token_file: Path | None, offline: bool, **kwargs: Any) -> Any:
        jobs = kwargs.get("jobs") or 4
        return func(*args, fetching=FetchSettings.from_environment(hf_token_file, offline, jobs), **kwargs)

    return wrapper


def net_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--allow-network-fs", is_flag=True, help="Allow a zoo on NFS/CIFS/Lustre (locks and renames are not trustworthy there).")(func)


def tenant_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--tenant", default=None, metavar="TENANT",
                        help="Only this served tenant's model and adapters (an on-demand one too); no gc.")(func)


def textfile_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Where apply, verify and gc leave node_exporter textfile-collector metrics (issue #25)."""
    return click.option("--textfile-dir", type=click.Path(path_type=Path, file_okay=False), envvar="ZOO_TEXTFILE_DIR", default=None,
                        help="Write this run's metrics to DIR/model-zoo-COMMAND.prom for node_exporter ($ZOO_TEXTFILE_DIR).")(func)
