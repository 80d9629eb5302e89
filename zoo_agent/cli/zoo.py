"""The zoo commands (plan, apply, status, verify, rollback, gc): thin click wrappers.

They share one option set (``--root``, ``--index``, ``--host``, ``--json``) and one
way to load the host's slice, so every command reads its inputs the same way.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from zoo_agent.cli.options import (
    Target,
    emit_json,
    fetch_options,
    json_option,
    net_option,
    tenant_option,
    textfile_option,
    wait_option,
    zoo_options,
)
from zoo_agent.errors import StoreError, UsageError, ZooError
from zoo_agent.formats import human_bytes
from zoo_agent.pin import Selection, add_directory, describe_entry, existing, pin_hf, read_provenance, weights_format, write_entry
from zoo_agent.plan import (
    Action,
    Desired,
    Plan,
    desired_for_host,
    desired_for_tenant,
    Observed,
    plan,
    plan_aliases,
    plan_gc,
    plan_versions,
)
from zoo_agent.reconcile.apply import Result, apply, rollback
from zoo_agent.reconcile.footprints import TenantFit, fit_document, prove_fit, tenant_fits
from zoo_agent.reconcile.observe import observe
from zoo_agent.reconcile.progress import make_progress
from zoo_agent.reconcile.sequence import planned
from zoo_agent.reconcile.status import artifact_status, healthy, with_digests
from zoo_agent.reconcile.textfile import Recorder, recording
from zoo_agent.reconcile.verify import Report, resolve, select, verify, wants_to_rebuild
from zoo_agent.resident.reports import resident_status
from zoo_agent.sources import FetchSettings
from zoo_agent.store.durable import FILE_MODE, write_atomic

__all__ = ["add_cmd", "apply_cmd", "gc_cmd", "plan_cmd", "rollback_cmd", "status_cmd", "verify_cmd"]

log = logging.getLogger("zoo_agent")


def _remember_index(target: Target) -> None:
    """host/applied-index.json: the index the zoo now matches (backups carry it); rewritten only when it changed."""
    data = target.index.read_bytes()
    path = target.zoo.applied_index
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, data, FILE_MODE)


def _step_rows(plan_: Plan) -> list[dict[str, Any]]:
    return [{
        "action": s.action.value, "kind": s.kind, "id": s.id, "version": s.version, "size": s.size, "reason": s.reason,
        "description": s.describe("plan"),
        **({"reuse": [{"path": r.path, "size": r.size, "from": {"kind": r.origin.kind, "id": r.origin.id, "version": r.origin.version,
                                                              "path": r.origin.path}} for r in s.reuse],
            "reused_bytes": s.reused_size, "fetch_bytes": s.size - s.reused_size} if s.action is Action.FETCH else {}),
    } for s in plan_]  # fmt: skip


def _result_rows(result: Result) -> list[dict[str, Any]]:
    return [{
        "action": o.step.action.value, "kind": o.step.kind, "id": o.step.id, "version": o.step.version,
        "ok": o.ok, "error": o.error, "bytes": o.bytes, "seconds": round(o.seconds, 4),
        **({"fetched_bytes": o.moved.fetched, "reused_bytes": o.moved.reused, "reused_files": o.moved.reused_files}
           if o.step.action is Action.FETCH else {}),
    } for o in result.outcomes]  # fmt: skip


def _plan(target: Target, desired: Desired, observed: Observed) -> Plan:
    """Links of aliases no longer declared go first (a model may now have that name: it must never be
    fetched through the old link), then the artifacts' steps, then the alias links (issue #35)."""
    aliases = plan_aliases(desired, target.zoo.alias_links(desired.aliases or {})).steps
    removals = tuple(s for s in aliases if not s.version)
    return Plan(removals + plan(desired, observed).steps + tuple(s for s in aliases if s.version))


def _fetch_total(the_plan: Plan) -> int:
    """What progress counts: the bytes that come over a source; reused ones take no time worth a bar."""
    return sum(s.size - s.reused_size for s in the_plan if s.action is Action.FETCH)


def _run_plan(target: Target, the_plan: Plan, desired: Desired, what: str, fetching: FetchSettings | None = None,
              strict: bool = False, rec: Recorder | None = None) -> None:  # fmt: skip
    progress = make_progress(_fetch_total(the_plan), machine_output=target.as_json)
    result = apply(the_plan, target.zoo, desired, target.index.resolve().parent, progress, fetching, strict=strict)
    if rec is not None:
        rec.result(result)
    failures = result.failures
    progress.notifier.status(f"{what}: {len(failures)} of {len(result.outcomes)} steps failed" if failures
                             else f"{what}: the zoo matches the index ({len(result.outcomes)} steps done)")
    if target.as_json:
        emit_json({"host": desired.host, "root": str(target.zoo.root), "ok": not failures, "steps": _result_rows(result)})
    elif failures:
        click.echo(f"{what}: {len(failures)} of {len(result.outcomes)} steps failed:", err=True)
        for o in failures:
            click.echo(f"  {o.step.describe('plan').removeprefix('would ')}: {o.error}", err=True)
    else:
        done = f"{len(result.outcomes)} steps done" if result.outcomes else "nothing to do"
        click.echo(f"{what}: {done}; the zoo at {target.zoo.root} matches the index for host {desired.host}")
    if failures:
        sys.exit(result.exit_code)

def _host_label(target: Target) -> str:
    """The host id for the textfile's ``host`` label: the index's, else the name we were given."""
    try:
        return target.resolve()[1]
    except (ZooError, OSError):
        return target.host


@click.command("plan")
@zoo_options
@tenant_option
@json_option
def plan_cmd(target: Target, tenant: str | None, as_json: bool) -> None:
    """Show what apply would do; changes nothing."""
    idx, host = target.resolve()
    desired = desired_for_tenant(idx, host, tenant) if tenant else desired_for_host(idx, host)
    target.zoo.check_root(allow_network_fs=True)
    observed = observe(target.zoo)
    the_plan = _plan(target, desired, observed)
    fits = tenant_fits(idx, host, target.zoo, observed)  # what the zoo holds; apply reads the rest from the sources
    prove_fit(idx, host, fits, str(target.index))
    if as_json:
        emit_json({"host": desired.host, "root": str(target.zoo.root), "changes": len(the_plan.changes), "steps": _step_rows(the_plan),
                   "fit": fit_document(idx, host, fits)})  # fmt: skip
        return
    for step in the_plan:
        click.echo(step.describe("plan"))
    if not the_plan.changes:
        click.echo(f"nothing to do: the zoo matches the index for host {desired.host}")
    if (budget := idx.hosts[host].memory_budget) is not None:
        _echo_fit(budget, fit_document(idx, host, fits), fits)


def _echo_fit(budget: str, doc: dict[str, Any], fits: dict[str, TenantFit]) -> None:
    pinned = f"; pinned {', '.join(doc['pinned'])}: {human_bytes(doc['pinned_total'])}" if doc["pinned"] else ""
    click.echo(f"memory budget {budget} ({human_bytes(doc['budget'])}){pinned}")
    for tid, f in fits.items():
        if f.kv_known:
            click.echo(f"  tenant {tid}: {f.footprint.describe()}")
        else:
            click.echo(f"  tenant {tid}: {human_bytes(f.footprint.weights)} of weights; KV cache unknown until its config.json is fetched (apply reads it first)")

@click.command("apply")
@zoo_options
@wait_option
@net_option
@click.option("--jobs", type=click.IntRange(min=1), default=4, show_default=True, help="Files fetched in parallel.")
@click.option("--strict", is_flag=True, envvar="ZOO_STRICT",
              help="Re-hash files reused from other versions too (default: trust their manifest and stat; $ZOO_STRICT=1).")
@tenant_option
@fetch_options
@textfile_option
@json_option
def apply_cmd(target: Target, wait: float, allow_network_fs: bool, jobs: int, strict: bool, tenant: str | None, fetching: FetchSettings,
              textfile_dir: Path | None, as_json: bool) -> None:  # fmt: skip
    """Reconcile the host's models and adapters into the zoo (idempotent)."""
    with recording(textfile_dir, "apply", _host_label(target) if textfile_dir else target.host) as rec:
        _apply(target, wait, allow_network_fs, strict, tenant, fetching, rec)


def _apply(target: Target, wait: float, allow_network_fs: bool, strict: bool, tenant: str | None, fetching: FetchSettings,
           rec: Recorder) -> None:  # fmt: skip
    idx, host = target.resolve()
    desired = desired_for_tenant(idx, host, tenant) if tenant else desired_for_host(idx, host)
    target.zoo.check_root(allow_network_fs=allow_network_fs, create=True)
    served = (tenant,) if tenant else idx.hosts[host].served()
    with planned(target.zoo, idx, host, desired, target.index, fetching, served, wait, lambda d, o: _plan(target, d, o)) as the_plan:
        whole = desired_for_host(idx, host)
        rec.artifacts = lambda: artifact_status(whole, observe(target.zoo))
        _run_plan(target, the_plan, desired, "apply", fetching, strict, rec)
        if tenant is None:  # the zoo matches the whole index only after a whole apply
            _remember_index(target)

@click.command("gc")
@zoo_options
@click.option("--dry-run", is_flag=True, help="Print what would be removed; change nothing.")
@wait_option
@net_option
@textfile_option
@json_option
def gc_cmd(target: Target, dry_run: bool, wait: float, allow_network_fs: bool, textfile_dir: Path | None, as_json: bool) -> None:
    """Remove versions beyond retention and artifacts no longer declared for this host."""
    directory = None if dry_run else textfile_dir  # a dry run changes nothing, so it reports nothing
    with recording(directory, "gc", _host_label(target) if directory else target.host) as rec:
        _gc(target, dry_run, wait, allow_network_fs, as_json, rec)


def _gc(target: Target, dry_run: bool, wait: float, allow_network_fs: bool, as_json: bool, rec: Recorder) -> None:
    desired = target.desired()
    target.zoo.check_root(allow_network_fs=allow_network_fs)
    if not target.zoo.root.exists():
        raise UsageError(f"{target.zoo.root}: no zoo here")
    with target.zoo.lock(wait):
        if not dry_run:
            target.zoo.sweep_versions()
        the_plan = plan_gc(desired, observe(target.zoo))
        if dry_run:
            if as_json:
                emit_json({"host": desired.host, "root": str(target.zoo.root), "dry_run": True, "steps": _step_rows(the_plan)})
            else:
                for step in the_plan:
                    click.echo(step.describe("plan"))
            return
        _run_plan(target, the_plan, desired, "gc", rec=rec)

@click.command("status")
@zoo_options
@json_option
def status_cmd(target: Target, as_json: bool) -> None:
    """Per artifact: declared version, current, previous, verified-at, size, state."""
    desired = target.desired()
    target.zoo.check_root(allow_network_fs=True)
    rows = with_digests(target.zoo, artifact_status(desired, observe(target.zoo)))
    ok = all(healthy(r["state"]) for r in rows)
    try:
        resident = resident_status(target.zoo)
    except StoreError as exc:  # a state.json no resident wrote: said in one line; the zoo's own state still shows
        click.echo(str(exc), err=True)
        resident = None
    if as_json:
        emit_json({"host": desired.host, "root": str(target.zoo.root), "ok": ok, "artifacts": rows, "resident": resident})
    else:
        click.echo(f"host {desired.host}, zoo {target.zoo.root}")
        for r in rows:
            click.echo(
                f"  {r['kind'][:-1]:<5} {r['id']:<24} declared {r['declared'] or '-':<12} current {r['current'] or '-':<12} "
                f"previous {r['previous'] or '-':<12} {human_bytes(r['size']):>9}  verified {r['verified_at'] or '-'}  {r['state']}"
            )
        if resident is not None:  # what the resident last reported; `zoo-agent resident status` asks it now
            click.echo(f"resident: {resident['status'] if resident['running'] else 'not running'}")
            for tid, t in resident["tenants"].items():
                served = f"{t['model']}@{t['version']}" if t.get("model") else "-"
                click.echo(f"  tenant {tid:<23} {t['state'] or '?':<10} {served:<24}{'  pinned' if t.get('pinned') else ''}"
                           f"{'  ' + t['error'] if t.get('error') else ''}")  # fmt: skip
    if not ok:
        sys.exit(1)

@click.command("verify")
@click.argument("ids", nargs=-1)
@zoo_options
@click.option("--repair", is_flag=True, help="Move bad versions aside (quarantine) and fetch them again.")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Files hashed in parallel (default: all cores).")
@wait_option
@fetch_options
@textfile_option
@json_option
def verify_cmd(target: Target, ids: tuple[str, ...], repair: bool, jobs: int | None, wait: float, fetching: FetchSettings,
               textfile_dir: Path | None, as_json: bool) -> None:  # fmt: skip
    """Re-hash every file of the published versions of IDS (default: all)."""
    with recording(textfile_dir, "verify", _host_label(target) if textfile_dir else target.host) as rec:
        _verify(target, ids, repair, jobs, wait, fetching, as_json, rec)


def _verify(target: Target, ids: tuple[str, ...], repair: bool, jobs: int | None, wait: float, fetching: FetchSettings, as_json: bool,
            rec: Recorder) -> None:  # fmt: skip
    target.zoo.check_root(allow_network_fs=True)
    observed = observe(target.zoo)
    selection = select(observed, ids)
    report = verify(target.zoo, selection, jobs, observed)
    repaired: list[str] = []
    gone: list[str] = []
    if repair and report.findings:
        desired = target.desired()
        index_dir = target.index.resolve().parent
        with target.zoo.lock(wait):
            quarantined = {}
            for kind, aid, version in report.bad_versions():
                quarantined[(kind, aid, version)] = moved = target.zoo.quarantine(kind, aid, version)
                log.info("moved damaged %s/%s %s to %s", kind, aid, version, moved)
                repaired.append(f"{kind}/{aid}/{version}")
            # An on-demand tenant's version that was on disk goes back too (issue #20).
            hit = {(k, i) for k, i, _ in quarantined}
            desired = Desired(desired.host, desired.wants + tuple(w for w in desired.on_demand if (w.kind, w.id) in hit), desired.keep_versions)
            result = apply(plan(desired, observe(target.zoo)), target.zoo, desired, index_dir, make_progress(0, machine_output=True), fetching)
            # Then the versions kept for rollback, from what the first round put back where it can (#23).
            if rebuild := wants_to_rebuild(desired, quarantined):
                again = apply(plan_versions(rebuild, observe(target.zoo)), target.zoo, Desired(desired.host, rebuild), index_dir,
                              make_progress(0, machine_output=True), fetching)  # fmt: skip
                result.outcomes += again.outcomes
        for o in result.failures:
            log.error("repair: %s: %s", o.step.describe("plan").removeprefix("would "), o.error)
        after = verify(target.zoo, selection, jobs, observe(target.zoo))
        gone = [f"{k}/{i}/{v}" for k, i, v in report.bad_versions() if not target.zoo.version_dir(k, i, v).is_dir()]
        for ref in gone:
            log.error("repair: %s was quarantined and could not be fetched again (no longer declared for this host, "
                      "or its source is gone)", ref)  # fmt: skip
        report = Report(report.versions, report.files, report.bytes, after.findings)
        repaired = [r for r in repaired if r not in gone]
        bad = bool(after.findings or gone)
    else:
        bad = bool(report.findings)
    _record_verify(rec, report, repaired, gone)
    if as_json:
        emit_json({
            "versions": len(report.versions), "files": report.files, "bytes": report.bytes,
            "findings": [f.__dict__ for f in report.findings], "repaired": repaired, "ok": not bad,
        })  # fmt: skip
    else:
        for finding in report.findings:
            click.echo(finding.line(target.zoo), err=True)
        click.echo(f"verified {report.files} files ({human_bytes(report.bytes)}) in {len(report.versions)} version(s): "
                   f"{len(report.findings)} bad" + (f"; repaired {', '.join(repaired)}" if repaired else ""))
    if bad:
        sys.exit(1)

def _record_verify(rec: Recorder, report: Report, repaired: list[str], gone: list[str]) -> None:
    """The last verify's counts; ``zoo_verify_failures`` is what is still bad after any repair."""
    rec.set("versions", "Versions the last verify re-hashed.", len(report.versions))
    rec.set("files", "Files the last verify re-hashed.", report.files)
    rec.set("bytes", "Bytes the last verify re-hashed.", report.bytes)
    rec.set("failures", "Files the last verify found damaged or missing (after --repair: still bad), plus versions repair could not bring back.",
            len(report.findings) + len(gone))
    rec.set("repaired_versions", "Versions the last verify --repair quarantined and fetched again.", len(repaired))
    damaged: dict[tuple[str, str, str], int] = {}
    for f in report.findings:
        damaged[(f.kind, f.id, f.version)] = damaged.get((f.kind, f.id, f.version), 0) + 1
    for (kind, aid, version), n in sorted(damaged.items()):
        rec.set("damaged_files", "Damaged or missing files per version, found by the last verify.", n, kind=kind, id=aid, version=version)


@click.command("rollback")
@click.argument("ref")
@zoo_options
@wait_option
@json_option
def rollback_cmd(target: Target, ref: str, wait: float, as_json: bool) -> None:
    """Point REF's current back at its previous version (REF: id, models/ID or loras/ID)."""
    target.zoo.check_root(allow_network_fs=True)
    with target.zoo.lock(wait):
        kind, aid = resolve(observe(target.zoo), ref)
        was, now_ = rollback(target.zoo, kind, aid)
    if as_json:
        emit_json({"kind": kind, "id": aid, "current": now_, "previous": was})
    else:
        click.echo(f"{kind[:-1]} {aid}: current is now {now_} (was {was}); the next apply restores the declared version")

@click.command("add")
@click.argument("spec", required=False)
@click.option("--id", "aid", help="Id of the new entry.")
@click.option("--update", "update_id",
              help="Move an existing entry to new bytes: an hf entry to a newer revision (default: main); a file entry to what its "
                   "directory (or file:PATH) holds now, bumping the version unless --version is given; refused if nothing changed.")
@click.option("--index", "index_path", type=click.Path(path_type=Path), envvar="ZOO_INDEX", default="index.json", show_default=True)
@click.option("--include", multiple=True, help="Glob of files to pin (repeatable; default: all).")
@click.option("--exclude", multiple=True, help="Glob of files to leave out (repeatable).")
@click.option("--version", "label", help="Version label (default for hf: the commit's first 12 hex; for --update of a file entry: the next number).")
@click.option("--license", "license_", help="SPDX license id (default for hf: the model card's).")
@click.option("--lora-for", "base_model", help="Make it a LoRA adapter for this model id.")
@click.option("--rank", type=click.IntRange(min=1), help="LoRA rank (default: adapter_config.json's r).")
@click.option("--allow-pickle", is_flag=True, help="Pin pickle files too (they run code when loaded).")
@click.option("--allow-code", is_flag=True, help="Pin repository .py files too.")
@click.option("--provenance", "provenance_file", type=click.Path(path_type=Path),
              help="JSON file with the entry's provenance (dataset, training, run and its metrics, ...); replaces the old one.")
@click.option("--tag", "tags", multiple=True, help="A tag (repeatable; replaces the entry's tags).")
@click.option("--description", help="What it is for, in a sentence.")
@fetch_options
@json_option
def add_cmd(spec: str | None, aid: str | None, update_id: str | None, index_path: Path, include: tuple[str, ...],
            exclude: tuple[str, ...], label: str | None, license_: str | None, base_model: str | None, rank: int | None,
            allow_pickle: bool, allow_code: bool, provenance_file: Path | None, tags: tuple[str, ...], description: str | None,
            fetching: FetchSettings, as_json: bool) -> None:  # fmt: skip
    """Pin SPEC (hf:ORG/REPO[@REVISION] or file:PATH) into the index as a new entry; nothing is published until apply."""
    kind, old = existing(index_path, update_id) if update_id else ("loras" if base_model else "models", {})
    provenance = read_provenance(provenance_file) if provenance_file is not None else None
    new_id = update_id or aid
    src = old.get("source", {})
    if update_id and spec is None and src.get("type") == "hf":
        spec = f"hf:{src['repo']}"
    elif update_id and spec is None and src.get("type") != "file":
        raise UsageError(f"{index_path}: /{kind}/{update_id}: --update without SPEC moves an hf or file entry; give file:PATH")
    if not (spec or update_id) or not new_id:
        raise UsageError("usage: zoo-agent add hf:ORG/REPO[@REVISION] --id ID  (or file:PATH --id ID --version LABEL, or --update ID)")
    safety = Selection(include, exclude, allow_pickle or old.get("allow_pickle", False), allow_code or old.get("allow_code", False))
    if spec is None or spec.startswith("file:"):  # a training job's step: pin the directory, write the entry (issue #35)
        kind, entry = add_directory(index_path, Path(spec[5:]) if spec else None, new_id, update=bool(update_id), version=label,
                                    license_=license_, lora_for=base_model, rank=rank, sel=safety, provenance=provenance,
                                    provenance_file=str(provenance_file) if provenance_file else None, tags=tags, description=description)  # fmt: skip
        source, files, label = entry["source"], entry["files"], entry["version"]
    elif spec.startswith("hf:"):
        repo, _, revision = spec[3:].partition("@")
        commit, files, card_license = pin_hf(repo, revision or "main", fetching, safety)
        if update_id and old.get("source", {}).get("revision") == commit and not label:
            changed = describe_entry(index_path, kind, new_id, old, provenance=provenance, tags=tags, description=description,
                                     provenance_file=str(provenance_file) if provenance_file else None)  # fmt: skip
            written = f"; {' and '.join(changed)} written, version {old.get('version')} kept (the bytes did not change)" if changed else ""
            click.echo(f"{kind[:-1]} {new_id}: already pinned at {commit}{written}")
            return
        source = {"type": "hf", "repo": repo, "revision": commit}
        label = label or commit[:12]
        license_ = license_ or card_license or old.get("license")
        if license_ is None:
            raise UsageError(f"hf:{repo}: its model card names no SPDX license we know; pass --license SPDX (or 'other')")
        entry = {**old, "version": label, "source": source, "files": files, "license": license_}
        if fmt := weights_format(files, old):
            entry["format"] = fmt
        entry.update({k: v for k, v in (("provenance", provenance), ("tags", list(tags)), ("description", description)) if v})
        if kind == "loras":
            entry["base_model"] = base_model or old.get("base_model")
            entry["rank"] = rank or old.get("rank")
            if entry["rank"] is None:
                raise UsageError("a LoRA needs --rank (no adapter_config.json with 'r' was found)")
        write_entry(index_path, kind, new_id, entry, update=bool(update_id))
    else:
        raise UsageError(f"'{spec}': expected hf:ORG/REPO[@REVISION] or file:PATH")
    size = sum(f["size"] for f in files)
    if as_json:
        emit_json({"kind": kind, "id": new_id, "version": label, "source": source, "files": len(files), "size": size})
    else:
        click.echo(f"pinned {kind[:-1]} {new_id} {label}: {len(files)} files, {human_bytes(size)} ({spec or 'file:' + source['path']})")
