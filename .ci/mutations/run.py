"""Hand-written mutations for the invariants that need processes (issue #24).

mutmut covers the pure core; what only shows with real processes, sockets and files
(READY after a real generation, a watchdog fed by progress, a publish that compares
sha256) is kept here as one ``*.mutation`` file per invariant. Each names one source
file, one regular expression that must match exactly once (a line-number diff would
break under every rewrite of the code it mutates; a pattern that no longer matches fails
loudly instead), its replacement, and the tests that must fail once it is applied:

    # what the mutation breaks, and why it is kept
    file: zoo_agent/resident/worker/main.py
    test: tests/integration/test_ready.py
    find:
    ^(\\s*)backend\\.warmup\\(\\)$
    replace:
    \\1pass

Each mutation is applied to its own scratch copy of the tree (never to the caller's), and
the tests run against that copy (PYTHONPATH, so the processes the tests start import the
mutated package too). Killed means pytest exited 1 (a test failed); 0 is a survivor; any
other exit (no tests collected, an import error) is a broken mutation, reported as such.
Usage: python .ci/mutations/run.py [--python .venv/bin/python] [--no-baseline] [--check] [NAME ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Mutation:
    name: str
    reason: str
    file: str
    tests: tuple[str, ...]
    find: str
    replace: str


def parse(path: Path) -> Mutation:
    """One ``*.mutation`` file: comment lines, ``key: value`` headers, then find and replace blocks."""
    reason: list[str] = []
    fields: dict[str, list[str]] = {"file": [], "test": []}
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines) and lines[i] != "find:":
        line = lines[i]
        if line.startswith("#"):
            reason.append(line.lstrip("# "))
        elif line.strip():
            key, _, value = line.partition(":")
            if key not in fields:
                raise SystemExit(f"{path}: unknown header {key!r} (file, test, find, replace)")
            fields[key].append(value.strip())
        i += 1
    try:
        end = lines.index("replace:", i)
    except ValueError:
        raise SystemExit(f"{path}: needs a 'find:' block and a 'replace:' block") from None
    if len(fields["file"]) != 1 or not fields["test"]:
        raise SystemExit(f"{path}: needs exactly one 'file:' and at least one 'test:'")
    return Mutation(path.stem, " ".join(reason), fields["file"][0], tuple(fields["test"]),
                    "\n".join(lines[i + 1 : end]), "\n".join(lines[end + 1 :]))  # fmt: skip


def copy_tree(dest: Path, ref: str | None) -> None:
    """Tracked and untracked-but-not-ignored files: the tree as the caller has it, no venvs or
    caches; or, with ``ref``, that commit as git has it."""
    dest.mkdir(parents=True)
    if ref:
        archive = subprocess.run(["git", "archive", ref], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-xf", "-", "-C", str(dest)], input=archive, check=True)
        return
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() or src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)


def mutate(tree: Path, m: Mutation) -> None:
    target = tree / m.file
    text = target.read_text()
    found = list(re.finditer(m.find, text, re.M))
    if len(found) != 1:
        raise SystemExit(f"{m.name}: the pattern matches {len(found)} times in {m.file} (needs exactly 1); "
                         f"the code moved: update .ci/mutations/{m.name}.mutation")  # fmt: skip
    target.write_text(text[: found[0].start()] + found[0].expand(m.replace) + text[found[0].end() :])


def pytest(python: str, tree: Path, tests: tuple[str, ...]) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    where = subprocess.run([python, "-c", "import zoo_agent; print(zoo_agent.__file__)"], cwd=tree, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    if not Path(where).is_relative_to(tree):
        raise SystemExit(f"the tests would import {where}, not the scratch copy {tree}")
    args = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rf", *tests]
    return subprocess.run(args, cwd=tree, env=env).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=str(REPO / ".venv/bin/python"), help="the interpreter with the project's dependencies")
    parser.add_argument("--no-baseline", action="store_true", help="skip running each test unmutated first")
    parser.add_argument("--check", action="store_true", help="only check that every mutation still applies, run no tests")
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    args = parser.parse_args()
    args.python = os.path.abspath(args.python)  # the tests run in the scratch copy; not resolve(): a venv's python is a link
    paths = sorted(HERE.glob("*.mutation"))
    if args.names:
        paths = [HERE / f"{n}.mutation" for n in args.names]
    mutations = [parse(p) for p in paths]
    results: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="zoo-hand-mutants-") as scratch:
        base = Path(scratch) / "base"
        copy_tree(base, os.environ.get("MUTATE_REF"))
        if args.check:
            for m in mutations:
                tree = Path(scratch) / m.name
                shutil.copytree(base, tree, symlinks=True)
                mutate(tree, m)
                print(f"  applies    {m.name:28} {m.file}")
            return 0
        if not args.no_baseline:
            for tests in sorted({m.tests for m in mutations}):
                print(f"\n==> baseline: {' '.join(tests)}", file=sys.stderr, flush=True)
                if (rc := pytest(args.python, base, tests)) != 0:
                    raise SystemExit(f"the unmutated tree fails {' '.join(tests)} (pytest exit {rc}): fix that first")
        for m in mutations:
            tree = Path(scratch) / m.name
            shutil.copytree(base, tree, symlinks=True)
            mutate(tree, m)
            print(f"\n==> {m.name}: {m.reason}", file=sys.stderr, flush=True)
            rc = pytest(args.python, tree, m.tests)
            results[m.name] = {0: "SURVIVED", 1: "killed"}.get(rc, f"BROKEN (pytest exit {rc})")
            shutil.rmtree(tree)
    print("\n==> hand-written mutations")
    for m in mutations:
        print(f"  {results[m.name]:10} {m.name:28} {' '.join(m.tests)}")
    return 0 if all(r == "killed" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
