"""`zoo-agent registry update-pr | check-pins`: the index as a model registry, from CI (issue #35).

``update-pr`` is what the ``model-update`` workflow runs: ``zoo-agent add --update`` for one
entry (the same command, in-process), validation, the new pins against the hub's LFS
metadata, then a commit on ``ci/model-update-<id>`` and a pull request titled
``Add model artifact: <id>`` whose body lists every file's sha256 and size and the run's
metrics. ``check-pins`` is what the ``index`` workflow runs on a pull request.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import click

from zoo_agent import jsonbound
from zoo_agent.cli.options import emit_json, index_argument, json_option
from zoo_agent.cli.zoo import add_cmd
from zoo_agent.errors import IntegrityError, UsageError
from zoo_agent.index.load import load_index, read_document
from zoo_agent.pin import existing
from zoo_agent.registry import github, hubcheck, pull
from zoo_agent.registry.pins import EntryChange, changes
from zoo_agent.sources import FetchSettings
from zoo_agent.store.durable import write_atomic

__all__ = ["registry_group"]

#: A metrics file is a few names and numbers.
METRICS_LIMIT = 1 << 20


@click.group("registry")
def registry_group() -> None:
    """The index as a model registry, from CI: update pull requests, pins checked against the hub."""


def _read_metrics(path: Path) -> dict[str, int | float]:
    """``--metrics FILE``: a JSON object of name -> number; a problem is one line naming the file and the name."""
    try:
        with open(path, "rb") as f:
            data = f.read(METRICS_LIMIT + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the metrics file: {exc.strerror or exc}") from None
    try:
        document = jsonbound.loads(data, limit=METRICS_LIMIT)
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path}: expected a JSON object of metric name -> number")
    metrics = pull.metrics_of({"provenance": {"run": {"metrics": document}}})
    for name in document:
        if name not in metrics:
            raise UsageError(f"{path}: /{name}: expected a number")
    return metrics


def _repo_path(index_path: Path, root: Path) -> str:
    """The index's path in the repository (its real file, as ``add`` writes through a link)."""
    real, top = Path(os.path.realpath(index_path)), Path(os.path.realpath(root))
    if not real.is_relative_to(top):
        raise UsageError(f"{index_path}: is outside the repository at {root} (--repo-root)")
    return real.relative_to(top).as_posix()


def _run_add(argv: list[str]) -> None:
    """``zoo-agent add [SPEC] --update ID ...``: the very command, in-process; its report goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        try:
            add_cmd.main(argv, prog_name="zoo-agent add", standalone_mode=False)
        except click.ClickException as exc:
            raise UsageError(f"zoo-agent add: {exc.format_message()}") from None


def _hub_findings(found: list[EntryChange], settings: FetchSettings) -> list[hubcheck.Finding]:
    findings = hubcheck.check(found, settings)
    failed = [f for f in findings if not f.ok]
    for finding in failed:
        click.echo(finding.line(), err=True)
    if failed:
        raise IntegrityError(f"{len(failed)} of {len(findings)} new pins disagree with the hub")
    return findings


def _add_argv(index: Path, aid: str, spec: str | None, revision: str | None, options: dict[str, Any]) -> list[str]:
    """The `zoo-agent add` command line this update runs: SPEC (or the hf entry's repository at
    --revision), --update ID, and the options given."""
    if revision is not None:
        if spec is not None:
            raise UsageError("--revision and --source: give one (--source hf:ORG/REPO@REVISION names both)")
        kind, old = existing(index, aid)
        source = old.get("source")
        source = source if isinstance(source, dict) else {}
        if source.get("type") != "hf":
            raise UsageError(f"{index}: /{kind}/{aid}: --revision moves an hf entry, not {source.get('type')!s}")
        spec = f"hf:{source['repo']}@{revision}"
    argv = [*([spec] if spec else []), "--update", aid, "--index", str(index)]
    for flag, value in options.items():
        for one in value if isinstance(value, tuple) else [value]:
            argv += [flag, str(one)] if one else []
    return argv


@registry_group.command("update-pr")
@click.option("--id", "aid", required=True, help="The model or LoRA to move to new bytes (it must be in the index).")
@click.option("--index", type=click.Path(path_type=Path), envvar="ZOO_INDEX", default="index.json", show_default=True,
              help="($ZOO_INDEX)")
@click.option("--source", "spec", help="What to pin, as `zoo-agent add` takes it (default: the entry's own source).")
@click.option("--revision", help="For an hf entry: the branch, tag or commit to move to (default: main).")
@click.option("--include", multiple=True, envvar="ZOO_INCLUDE",
              help="Glob of files to pin (repeatable; $ZOO_INCLUDE, space-separated).")
@click.option("--exclude", multiple=True, envvar="ZOO_EXCLUDE",
              help="Glob of files to leave out (repeatable; $ZOO_EXCLUDE, space-separated).")
@click.option("--version", "label", help="Version label (default: as `zoo-agent add --update` chooses).")
@click.option("--provenance", "provenance_file", type=click.Path(path_type=Path),
              help="Passed to `zoo-agent add --provenance`.")
@click.option("--metrics", "metrics_file", type=click.Path(path_type=Path),
              help="JSON object of metric name -> number for the description (beside provenance.run.metrics).")
@click.option("--hf-token-file", type=click.Path(path_type=Path), default=None,
              help="File holding a Hugging Face token (else $CREDENTIALS_DIRECTORY/hf-token, else HF_TOKEN).")
@click.option("--repo-root", type=click.Path(path_type=Path, file_okay=False), default=".", show_default=True,
              help="The checked-out repository the index is committed to.")
@click.option("--repository", envvar="GITHUB_REPOSITORY", help="OWNER/NAME on GitHub ($GITHUB_REPOSITORY).")
@click.option("--base", envvar="GITHUB_REF_NAME", help="Branch the pull request merges into ($GITHUB_REF_NAME).")
@click.option("--base-sha", envvar="GITHUB_SHA", help="The commit checked out, the new commit's parent ($GITHUB_SHA).")
@click.option("--api-url", envvar="GITHUB_API_URL", default="https://api.github.com", show_default=True,
              help="($GITHUB_API_URL)")
@click.option("--dry-run", is_flag=True, help="Update the index and print the pull request; ask GitHub nothing.")
@json_option
def update_pr_cmd(aid: str, index: Path, spec: str | None, revision: str | None, include: tuple[str, ...],
                  exclude: tuple[str, ...], label: str | None, provenance_file: Path | None, metrics_file: Path | None,
                  hf_token_file: Path | None, repo_root: Path, repository: str | None, base: str | None,
                  base_sha: str | None, api_url: str | None, dry_run: bool, as_json: bool) -> None:  # fmt: skip
    """Move entry ID to new bytes with `add --update`, validate, check its new pins against the hub, and open
    (or update) the pull request `Add model artifact: ID` from branch ci/model-update-ID. The token is
    $GITHUB_TOKEN, never a flag."""
    branch, title = pull.branch_name(aid), pull.title(aid)
    gh = None if dry_run else github.connect(api_url, repository, os.environ.get("GITHUB_TOKEN"))
    if gh is not None and not base:
        raise UsageError("--base: the branch to merge into is not set ($GITHUB_REF_NAME)")
    if gh is not None and not github.SHA1.match(base_sha or ""):
        raise UsageError(f"--base-sha: expected the 40-hex commit checked out ($GITHUB_SHA), got {base_sha!r}")
    where = _repo_path(index, repo_root) if gh is not None else ""
    metrics = _read_metrics(metrics_file) if metrics_file is not None else {}
    argv = _add_argv(index, aid, spec, revision, {
        "--include": include, "--exclude": exclude, "--version": label, "--provenance": provenance_file,
        "--hf-token-file": hf_token_file,
    })  # fmt: skip
    before_bytes, before = index.read_bytes(), read_document(index, str(index))
    _run_add(argv)
    try:
        load_index(index, str(index))  # what `zoo-agent validate` checks: never a pull request with an invalid index
        found = [c for c in changes(before, read_document(index, str(index))) if c.id == aid]
        if not found:
            if as_json:
                emit_json({"id": aid, "changed": False, "branch": branch, "pull_request": None})
            else:
                click.echo(f"{aid}: the index already pins these bytes; no pull request")
            return
        change = found[0]
        findings = _hub_findings(found, FetchSettings.from_environment(hf_token_file))
        text = pull.body(change, {**pull.metrics_of(change.after), **metrics}, findings)
        opened = None
        if gh is not None and base is not None:
            opened = github.open_pull_request(
                gh, base=base, base_sha=base_sha or "", branch=branch, path=where, content=index.read_text("utf-8"),
                message=pull.commit_message(change), title=title, body=text,
            )  # fmt: skip
    except BaseException:
        write_atomic(Path(os.path.realpath(index)), before_bytes)  # no pull request: the index as it was, for a rerun
        raise
    if as_json:
        emit_json({
            "id": aid, "kind": change.kind, "changed": True, "version": change.after.get("version"), "branch": branch,
            "title": title, "body": text,
            "pull_request": {"number": opened.number, "url": opened.url, "created": opened.created} if opened else None,
        })  # fmt: skip
    elif opened is None:
        click.echo(f"branch: {branch}\ntitle: {title}\n\n{text}", nl=False)
    else:
        verb = "opened" if opened.created else "updated"
        click.echo(f"{verb} pull request #{opened.number} from {branch}: {opened.url}")


@registry_group.command("check-pins")
@index_argument
@click.option("--base", "base_path", type=click.Path(path_type=Path, dir_okay=False),
              help="The index the pull request starts from (default: none, so every pin is new).")
@click.option("--hf-token-file", type=click.Path(path_type=Path), default=None,
              help="File holding a Hugging Face token (else $CREDENTIALS_DIRECTORY/hf-token, else HF_TOKEN).")
@json_option
def check_pins_cmd(index: Path, base_path: Path | None, hf_token_file: Path | None, as_json: bool) -> None:
    """Check each pin INDEX adds or changes against the hub's LFS metadata (sha256, size), downloading nothing."""
    load_index(index, str(index))
    base: Any = read_document(base_path, str(base_path)) if base_path is not None else {}
    found = changes(base, read_document(index, str(index)))
    findings = hubcheck.check(found, FetchSettings.from_environment(hf_token_file))
    failed = [f for f in findings if not f.ok]
    if as_json:
        rows = [{"where": f.where, "checked": f.checked, "message": f.message} for f in findings]
        emit_json({"ok": not failed, "findings": rows})
    else:
        for finding in findings:
            click.echo(finding.line(), err=not finding.ok)
        if not findings:
            click.echo(f"{index}: no new pins to check")
    if failed:
        raise IntegrityError(f"{index}: {len(failed)} of {len(findings)} new pins disagree with the hub")
