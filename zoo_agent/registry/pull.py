"""Pure: the branch, title, commit message and body of a model-update pull request (issue #35).

Every string that came from an index or a hub (ids, paths, metric names) is written as
a code span with its control characters escaped and its table pipes escaped, so a
path cannot break the tables, start a heading, or mention (notify) anyone. The body
stays under GitHub's limit: long file lists are cut with a count of what was left out.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from zoo_agent.errors import UsageError
from zoo_agent.index.model import ID_PATTERN
from zoo_agent.formats import human_bytes
from zoo_agent.registry.hubcheck import Finding
from zoo_agent.registry.pins import EntryChange, totals

__all__ = ["BRANCH_PREFIX", "body", "branch_name", "code", "commit_message", "describe_source", "metrics_of", "title"]

BRANCH_PREFIX = "ci/model-update-"
#: Rows of the file table; the rest is counted (a repository can hold thousands of files).
FILES_SHOWN = 200
#: GitHub refuses a pull request body over 65536 characters.
BODY_LIMIT = 60_000

_CONTROL = {c: f"\\u{c:04x}" for c in [*range(0x20), 0x7F, 0x85, 0x2028, 0x2029]} | {0x0A: "\\n", 0x09: "\\t"}


def branch_name(aid: str) -> str:
    """``ci/model-update-<id>``, refused where the id could not name a git branch."""
    if not re.match(ID_PATTERN, aid) or aid.endswith((".", ".lock")) or ".." in aid:
        raise UsageError(f"--id {aid!r}: not an index id that can name a branch ({BRANCH_PREFIX}<id>)")
    return BRANCH_PREFIX + aid


def title(aid: str) -> str:
    return f"Add model artifact: {aid}"


def code(text: str) -> str:
    """``text`` as one inline code span that is safe in a table cell."""
    text = text.translate(_CONTROL).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def describe_source(source: Mapping[str, Any] | None) -> str:
    """A source in the spelling ``zoo-agent add`` takes (hf:REPO@COMMIT, file:PATH), or its URL or digest."""
    if not isinstance(source, Mapping):
        return "(none)"
    kind = source.get("type")
    if kind == "hf":
        return f"hf:{source.get('repo')}@{source.get('revision')}"
    if kind == "file":
        return f"file:{source.get('path')}"
    if kind == "url":
        return str(source.get("base_url"))
    if kind == "ollama":
        return f"ollama:{source.get('name')}@{source.get('digest')}"
    return str(kind)


def metrics_of(entry: Mapping[str, Any] | None) -> dict[str, int | float]:
    """The entry's ``provenance.run.metrics`` (name -> number), read defensively: an older,
    flat provenance of strings has none, and anything not a finite number is left out."""
    provenance = entry.get("provenance") if entry is not None else None
    run = provenance.get("run") if isinstance(provenance, Mapping) else None
    metrics = run.get("metrics") if isinstance(run, Mapping) else None
    if not isinstance(metrics, Mapping):
        return {}
    return {
        k: v for k, v in metrics.items()
        if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }  # fmt: skip


def _version(entry: Mapping[str, Any] | None) -> str:
    version = entry.get("version") if entry is not None else None
    return str(version) if version is not None else "(new)"


def _size(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "(new)"
    count, total = totals(entry)
    return f"{count} files, {human_bytes(total)} ({total} bytes)"


def commit_message(change: EntryChange) -> str:
    moved = f"{_version(change.before)} -> {_version(change.after)} ({describe_source(change.source)})"
    return f"{title(change.id)}\n\n{change.kind[:-1]} {change.id}: {moved}\n"


def _files_table(change: EntryChange) -> list[str]:
    rows = ["| file | size (bytes) | sha256 | |", "|---|---:|---|---|"]
    for pin in change.files[:FILES_SHOWN]:
        status = "" if pin.status == "same" else pin.status
        rows.append(f"| {code(pin.path)} | {pin.size} | {code(pin.sha256)} | {status} |")
    if len(change.files) > FILES_SHOWN:
        rows.append(f"\n… and {len(change.files) - FILES_SHOWN} more files: see the diff.")
    if change.removed:
        shown = ", ".join(code(p) for p in change.removed[:FILES_SHOWN])
        more = f" and {len(change.removed) - FILES_SHOWN} more" if len(change.removed) > FILES_SHOWN else ""
        rows.append(f"\nNo longer pinned: {shown}{more}.")
    return rows


def _metrics_table(metrics: Mapping[str, int | float]) -> list[str]:
    if not metrics:
        return ["None recorded: the entry's provenance has no `run.metrics`, and none came with the update."]
    rows = ["| metric | value |", "|---|---:|"]
    rows += [f"| {code(name)} | {value!r} |" for name, value in sorted(metrics.items())[:FILES_SHOWN]]
    return rows


def _checks(findings: Sequence[Finding]) -> list[str]:
    counts = Counter(f.checked for f in findings)
    lines = ["- the index validates (`zoo-agent validate`), written in canonical form"]
    if n := counts["lfs"]:
        lfs = "LFS file matches" if n == 1 else "LFS files match"
        lines.append(f"- {n} {lfs} the hub's LFS metadata (sha256 and size), asked without downloading")
    if n := counts["size"]:
        small = "small file kept in git matches" if n == 1 else "small files kept in git match"
        lines.append(f"- {n} {small} by size; the sha256 is checked by `apply` as it fetches")
    if counts["skipped"]:
        lines.append("- the source is not the hub: `apply` checks the bytes as it fetches")
    return lines


def body(change: EntryChange, metrics: Mapping[str, int | float], findings: Sequence[Finding]) -> str:
    """The pull request's description: what moved, every pinned file's sha256 and size, the metrics, the checks."""
    before_source = change.before.get("source") if change.before else None
    same = change.before is not None and _version(change.before) == _version(change.after)
    what = "Updates the metadata (the pinned bytes are unchanged)" if same else "Pins a new version"
    lines = [
        (f"{what} of {change.kind[:-1]} {code(change.id)}. Opened by `zoo-agent registry update-pr`; "
         "nothing reaches a host until this is merged and the host runs `apply`."),
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| version | {code(_version(change.before))} | {code(_version(change.after))} |",
        f"| source | {code(describe_source(before_source))} | {code(describe_source(change.source))} |",
        f"| files | {_size(change.before)} | {_size(change.after)} |",
        "",
        "### Files",
        "",
        *_files_table(change),
        "",
        "### Metrics",
        "",
        *_metrics_table(metrics),
        "",
        "### Checked",
        "",
        *_checks(findings),
        "",
    ]
    text = "\n".join(lines)
    if len(text) > BODY_LIMIT:
        text = text[:BODY_LIMIT].rsplit("\n", 1)[0] + "\n\n… (cut at GitHub's limit: see the diff)\n"
    return text
