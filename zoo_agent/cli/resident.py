"""`zoo-agent resident` (the Type=notify main process), and what asks the running one: `reload`,
`status`, `load` and `unload` (issue #34)."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from zoo_agent.cli.options import Target, emit_json, json_option, printable, zoo_options
from zoo_agent.errors import SourceError, StoreError, UsageError
from zoo_agent.jsonbound import loads
from zoo_agent.resident.reports import read_state
from zoo_agent.resident.wire.documents import Health, HealthTenant, Malformed, ResidentState, salvage

__all__ = ["resident"]

EXTRA = ("torch", "transformers", "fastapi", "uvicorn", "prometheus_client")

@click.group("resident", invoke_without_command=True)
@zoo_options
@click.option("--listen", default="127.0.0.1:8000", show_default=True, envvar="ZOO_LISTEN",
              help="host:port, or unix:/path; a socket from systemd (LISTEN_FDS) wins.")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None, help="Bearer token for /v1/* (required beyond loopback).")
@click.option("--fleet-key-file", type=click.Path(path_type=Path), default=None,
              help="The fleet key: presented to peers and required of them (issue #22); separate from client keys.")
@click.option("--priority-key-file", type=click.Path(path_type=Path), default=None,
              help="A client key that may also ask for priority classes above 'default' (X-Zoo-Priority: realtime, system).")
@click.option("--peer-poll-seconds", type=click.FloatRange(min=0.1, max=60), default=1.0, show_default=True, hidden=True,
              help="How often each peer's /health and /v1/models are asked.")
@click.option("--strict", is_flag=True, envvar="ZOO_STRICT",
              help="Refuse to start (or reload) unless the declared versions are current and verify ($ZOO_STRICT=1).")
@click.option("--paging-policy", type=click.Choice(["lru", "oldest"]), default="lru", show_default=True, hidden=True,
              help="Which idle tenant makes room: least recently used, or the first loaded (the benchmark's naive baseline).")
@click.pass_context
def resident(ctx: click.Context, target: Target, listen: str, api_key_file: Path | None, fleet_key_file: Path | None, priority_key_file: Path | None,
             peer_poll_seconds: float, strict: bool, paging_policy: str) -> None:  # fmt: skip
    """Serve the host's tenants: a router in front of one worker per loaded tenant, report to systemd."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = target
        return
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"the resident needs the 'resident' extra ({', '.join(missing)} missing): pip install 'zoo-agent[resident]'")
    from zoo_agent.resident.config import ResidentConfig
    from zoo_agent.resident.supervisor import Supervisor

    config = ResidentConfig(root=target.zoo.root, index=target.index, host=target.host, listen=listen, api_key_file=api_key_file, strict=strict,
                            paging_policy=paging_policy, fleet_key_file=fleet_key_file, peer_poll_seconds=peer_poll_seconds,
                            priority_key_file=priority_key_file)  # fmt: skip
    supervisor = Supervisor(config)
    supervisor.install_signal_handlers()
    sys.exit(supervisor.run())

@resident.command("reload")
@click.option("--pid", type=int, default=None, help="The resident's pid (systemd: $MAINPID); default: from the zoo.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True)
@click.pass_obj
def reload(target: Target, pid: int | None, timeout: float) -> None:
    """Swap to the current version now; return when the swap is done (for ExecReload=)."""
    state_file = target.zoo.resident_state
    before = read_state(state_file) or ResidentState()
    pid = pid or before.pid
    if not pid:
        raise UsageError(f"{state_file}: no running resident recorded; pass --pid")
    try:
        os.kill(int(pid), signal.SIGHUP)
    except ProcessLookupError:
        raise UsageError(f"no resident runs as pid {pid}") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = read_state(state_file) or ResidentState()
        if now.attempts > before.attempts and now.state == "ready":
            if now.reloads > before.reloads:
                swapped = now.swapped
                click.echo(f"reloaded: {', '.join(swapped)}" if swapped else "reloaded: every tenant already served its current version")
                return
            if now.last_error:
                raise StoreError(now.last_error)
        if before.attempts == now.attempts and time.monotonic() > deadline - timeout + 5:
            click.echo("nothing to reload: already serving the current version")
            return
        time.sleep(0.2)
    raise StoreError(f"reload did not finish within {timeout:.0f}s")


@resident.command("status")
@click.option("--url", default=None, envvar="ZOO_URL", help="The resident's address (default: where the zoo's resident listens).")
@json_option
@click.pass_obj
def status(target: Target, url: str | None, as_json: bool) -> None:
    """Ask the running resident what it serves: every tenant, loaded or paged out (its /health)."""
    url = _url(target, url)
    document = _health(url)
    if as_json:
        emit_json(document)
        return
    try:
        health, dropped = salvage(Health, document)
    except Malformed as exc:
        raise SourceError(f"{url}/health: not a resident's answer ({exc})") from None
    for line in dropped:  # what this resident says that this command cannot read: named, the rest still shown
        click.echo(printable(f"{url}/health: {line}; not shown", _SHOWN), err=True)
    click.echo(printable(f"{health.state or '?'}: {health.status}", _SHOWN))
    for tid, t in health.tenants.items():
        click.echo(_tenant_row(tid, t))


def _url(target: Target, url: str | None) -> str:
    """``--url``, else where the zoo's resident listens (its state.json)."""
    if url is None:
        recorded = read_state(target.zoo.resident_state)
        listen = recorded.listen if recorded is not None and recorded.listen else "127.0.0.1:8000"
        if listen.startswith(("unix:", "/")):
            raise UsageError(f"the resident listens on {listen}; pass --url for a TCP address")
        url = "http://" + listen.removeprefix("http://")
    return url.rstrip("/")


_url_option = click.option("--url", default=None, envvar="ZOO_URL", help="The resident's address (default: where the zoo's resident listens).")
_key_option = click.option("--api-key-file", type=click.Path(path_type=Path), default=None, envvar="ZOO_API_KEY_FILE",
                           help="The resident's API key, for a resident that needs one ($ZOO_API_KEY_FILE).")  # fmt: skip
_wait_option = click.option("--timeout", type=click.FloatRange(min=1, max=3600), default=600.0, show_default=True,
                            help="Seconds to wait for the answer (the resident itself waits at most 300 s for a load).")  # fmt: skip


@resident.command("load")
@click.argument("tenant")
@click.option("--evict", is_flag=True, help="Page out idle tenants if it cannot fit otherwise (without it, the answer names them).")
@_url_option
@_key_option
@_wait_option
@click.pass_obj
def load(target: Target, tenant: str, evict: bool, url: str | None, api_key_file: Path | None, timeout: float) -> None:
    """Load TENANT now (POST /models/load); return once it serves."""
    click.echo(_order(_url(target, url), "load", {"model": tenant, **({"evict": True} if evict else {})}, api_key_file, timeout))


@resident.command("unload")
@click.argument("tenant")
@_url_option
@_key_option
@_wait_option
@click.pass_obj
def unload(target: Target, tenant: str, url: str | None, api_key_file: Path | None, timeout: float) -> None:
    """Unload TENANT (POST /models/unload): what it is answering completes; return once its worker exited."""
    click.echo(_order(_url(target, url), "unload", {"model": tenant}, api_key_file, timeout))


def _order(url: str, action: str, body: dict[str, Any], api_key_file: Path | None, timeout: float) -> str:
    """Ask the resident for a load or unload; its answer's message, or the error it gave as one line."""
    import json
    import urllib.error
    import urllib.request

    from zoo_agent.keyfile import read_key_file

    headers = {"content-type": "application/json"}
    if api_key_file is not None:
        headers["authorization"] = "Bearer " + read_key_file(api_key_file, "--api-key-file")
    request = urllib.request.Request(f"{url}/models/{action}", data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read(_MAX_HEALTH + 1)
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read(_MAX_HEALTH + 1) or b"{}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceError(f"{url}: the resident does not answer ({getattr(exc, 'reason', exc)}); is zoo-agent resident running?") from exc
    try:
        answer = loads(raw, limit=_MAX_HEALTH)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise SourceError(f"{url}/models/{action}: not a resident's answer (HTTP {status})")
    if status == 200:
        return printable(str(answer.get("message") or f"{action}: done"), _SHOWN)
    error = answer.get("error")
    error = error if isinstance(error, dict) else {}
    message = printable(str(error.get("message") or f"HTTP {status}"), _SHOWN)
    if error.get("code") == "would_evict":
        message = message.replace("ask again with evict to do it", "pass --evict to do it")
    if status == 401:
        message += " (pass --api-key-file)"
    raise (UsageError if status < 500 and status != 429 else SourceError)(f"{action} {body['model']}: {message}")


_MAX_HEALTH = 4 << 20  # a /health document is kilobytes
_SHOWN = 1200  # characters of the resident's own words on one line (its STATUS= line is at most 1024)


def _health(url: str) -> dict[str, Any]:
    """The resident's /health document, read through the one bounded JSON reader (issue #31)."""
    import urllib.error
    import urllib.request

    try:
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as response:
                raw = response.read(_MAX_HEALTH + 1)
        except urllib.error.HTTPError as exc:  # 503 while starting or stopping: the body still says what it serves
            raw = exc.read(_MAX_HEALTH + 1) or b"{}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceError(f"{url}: the resident does not answer ({getattr(exc, 'reason', exc)}); is zoo-agent resident running?") from exc
    try:
        health = loads(raw, limit=_MAX_HEALTH)
    except ValueError as exc:
        raise SourceError(f"{url}/health: not a resident's answer ({exc})") from None
    if not isinstance(health, dict):
        raise SourceError(f"{url}/health: not a resident's answer (not a JSON object)")
    return health


def _tenant_row(tid: str, t: HealthTenant) -> str:
    """One tenant of /health as a line (a field the resident sent of another type was left out: its default shows)."""
    served = f"{t.model}@{t.version}" if t.model else "-"
    idle = f"{t.idle_seconds:.0f}s" if t.idle_seconds is not None else "-"
    line = (f"  {tid:<20} {t.state or '?':<10} {served:<24} {t.running:>3} running {t.waiting:>3} waiting  "
            f"idle {idle:<6} {t.footprint / (1 << 20):>8.1f} MiB{'  pinned' if t.pinned else ''}{'  ' + t.error if t.error else ''}")  # fmt: skip
    return printable(line, _SHOWN)
