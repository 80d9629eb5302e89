"""The README and the docs site (issue #32): links that resolve, a site that builds with --strict,
and the two generated pages (NixOS options, performance) current with what they are generated from."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README = REPO / "README.md"
MKDOCS = REPO / ".ci" / "mkdocs" / "bin" / "mkdocs"
NIX_LIB = Path(os.environ.get("NIXPKGS_LIB") or REPO / ".ci" / "nixpkgs-lib" / "lib")
DEMO = ".venv/bin/zoo-agent demo"

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose(text: str) -> str:
    """*text* without its code blocks and code spans: a link written as code is not a link."""
    return CODE.sub("", FENCE.sub("", text))


def targets(text: str) -> list[str]:
    body = prose(text)
    return [m.group(1) for pattern in (LINK, REFERENCE, HTML) for m in pattern.finditer(body)]


def headings(path: Path) -> list[str]:
    found = []
    for line in FENCE.sub("", path.read_text()).splitlines():
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading: its text
            found.append(text.replace("`", "").replace("*", ""))
    return found


def site_slug(heading: str) -> str:
    """The anchor MkDocs gives a heading (Python-Markdown's toc.slugify)."""
    value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives the same heading, where the README and the pages are read too."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Anchors that work on both: MkDocs' and GitHub's slugs of every heading."""
    return {site_slug(h) for h in headings(path)} & {github_slug(h) for h in headings(path)}


def test_links_of_the_readme_and_the_docs_resolve() -> None:
    broken = []
    for page in pages():
        for target in targets(page.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: -- not ours to check here
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(REPO)}: {target}"
            if not resolved.exists():
                broken.append(f"{where}: no such file")
            elif page != README and not resolved.is_relative_to(DOCS):
                broken.append(f"{where}: outside docs/, which MkDocs cannot link to (write it as code)")
            elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
                broken.append(f"{where}: no heading with anchor #{anchor}")
    assert not broken, "\n".join(broken)


def test_the_link_checker_finds_what_is_broken(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A title: `here`\n\n[ok](#a-title-here) [gone](missing.md) ![img](x.png)\n"
        "`[code](not-a-link.md)`\n```\n[fenced](not-a-link-either.md)\n```\n[site](https://example.org/x)\n"
    )
    assert targets(page.read_text()) == ["#a-title-here", "missing.md", "x.png", "https://example.org/x"]
    assert anchors(page) == {"a-title-here"}
    heading = "Several tenants per host: the router, paging and priority"
    assert site_slug(heading) == github_slug(heading) == "several-tenants-per-host-the-router-paging-and-priority"


def test_every_page_is_in_the_nav_and_in_the_readme() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())

    def walk(nav: object) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, list):
            return [p for item in nav for p in walk(item)]
        if isinstance(nav, dict):
            return [p for value in nav.values() for p in walk(value)]
        return []

    in_nav = walk(config["nav"])
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(in_nav) == on_disk
    in_readme = set(targets(README.read_text()))
    assert [p for p in on_disk if p != "index.md" and f"docs/{p}" not in in_readme] == []


def test_the_readme_is_one_screen_with_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 180, "the README is one screen: move the detail to a page under docs/"
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)
    assert blocks[0].strip().endswith(DEMO) and blocks[0].strip().startswith("python3 -m venv .venv && ")
    assert blocks[1].strip() == "bash .ci/run"
    assert blocks[0] in (DOCS / "getting-started.md").read_text()  # the same command, step by step there


def test_the_site_builds_with_strict(tmp_path: Path) -> None:
    if not MKDOCS.is_file():
        pytest.skip(f"MkDocs not installed at {MKDOCS.parent.parent} (.ci/setup installs it)")
    command = [str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor, not a warning of ours
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "nixos-options" / "index.html").is_file()


def test_the_performance_page_and_the_readme_show_the_benchmark_json() -> None:
    command = [sys.executable, str(REPO / "bench" / "run"), "--check-docs"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_nixos_option_reference_is_generated_from_the_module() -> None:
    if shutil.which("nix-instantiate") is None:
        pytest.skip("nix-instantiate not installed (.ci/setup installs Debian's nix-bin)")
    if not (NIX_LIB / "default.nix").is_file():
        pytest.skip(f"no nixpkgs lib at {NIX_LIB} (set NIXPKGS_LIB; .ci/setup unpacks one from a nixpkgs.lib checkout)")
    command = [sys.executable, str(REPO / ".ci" / "nixos-options")]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "NIXPKGS_LIB": str(NIX_LIB)}
    )
    assert proc.returncode == 0, proc.stderr
    stale = "docs/nixos-options.md is stale: python3 .ci/nixos-options --write"
    assert (DOCS / "nixos-options.md").read_text() == proc.stdout, stale
    assert "## `services.model-zoo.resident.fleetKeyFile`" in proc.stdout


def test_exit_code_table_matches_errors() -> None:
    """docs/troubleshooting.md's table lists exactly the codes errors.EXIT_CODES defines, each
    meaning opening with the same words (the page may add where else a code is used)."""
    from zoo_agent.errors import EXIT_CODES

    text = (DOCS / "troubleshooting.md").read_text()
    section = text.split("## Exit codes", 1)[1]
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", section, flags=re.M))
    assert {int(code) for code in rows} == set(EXIT_CODES)
    for code, meaning in EXIT_CODES.items():
        assert rows[str(code)].startswith(meaning.split(";")[0]), (code, rows[str(code)])
