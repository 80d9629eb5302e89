"""The GitHub REST calls that put an updated index on a branch and open its pull request (issue #35).

Standard library only (``urllib``), against ``GITHUB_API_URL`` with the workflow's
``GITHUB_TOKEN``: a test points it at a loopback stand-in that records the calls. The
commit is made with the git data API (a tree over the base commit's, a commit, the ref),
so the branch moves once, to a commit whose parent is exactly the commit the workflow
checked out; rerunning moves the same branch and updates the same open pull request.

The token goes only into the Authorization header of requests to that URL: redirects are
refused (urllib would carry the header to wherever a redirect points), and no message
holds it. Answers are read through ``jsonbound.loads``, bounded.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from zoo_agent import jsonbound
from zoo_agent.errors import UsageError, ZooError

__all__ = ["SHA1", "GitHub", "PullRequest", "connect", "open_pull_request"]

API_VERSION = "2022-11-28"
TIMEOUT_S = 30.0
#: Every answer we read is a small JSON document (a ref, a commit, a list of open pulls).
RESPONSE_LIMIT = 4 << 20
REPOSITORY = re.compile(r"^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}$")
SHA1 = re.compile(r"^[0-9a-f]{40}$")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None  # the 3xx surfaces as an HTTPError: the token never follows a redirect


_OPENER = urllib.request.build_opener(_NoRedirects())


@dataclass(frozen=True)
class PullRequest:
    number: int
    url: str
    created: bool  # False: an open one for the branch was updated


@dataclass(frozen=True)
class GitHub:
    api_url: str
    repository: str
    token: str = field(repr=False)
    timeout: float = TIMEOUT_S

    def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """(status, the JSON answer or None); an unreachable API is one line naming it."""
        request = urllib.request.Request(
            self.api_url.rstrip("/") + path,
            data=json.dumps(payload).encode() if payload is not None else None,
            method=method,
            headers={
                "Accept": "application/vnd.github+json",
                "Authorization": f"Bearer {self.token}",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": "zoo-agent",
                **({"Content-Type": "application/json"} if payload is not None else {}),
            },
        )
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                return response.status, _parsed(response.read(RESPONSE_LIMIT + 1))
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _parsed(exc.read(RESPONSE_LIMIT + 1))
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ZooError(f"GitHub API {self.api_url}: {method} {path}: unreachable ({reason})") from None

    def expect(self, method: str, path: str, payload: Any = None, ok: tuple[int, ...] = (200, 201)) -> Any:
        status, answer = self.call(method, path, payload)
        if status not in ok:
            message = answer.get("message") if isinstance(answer, dict) else None
            why = f": {str(message)[:300]}" if message else ""
            raise ZooError(f"GitHub API {method} {path}: HTTP {status}{why}".translate(_ONE_LINE))
        return answer

    def repo_path(self, rest: str) -> str:
        return f"/repos/{self.repository}{rest}"


_ONE_LINE = {c: " " for c in range(0x20)}


def _parsed(data: bytes) -> Any:
    if not data.strip():
        return None
    try:
        return jsonbound.loads(data, limit=RESPONSE_LIMIT)
    except ValueError:
        return None  # an error page that is not JSON: the status says enough


def _field(answer: Any, *keys: str) -> Any:
    value = answer
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        raise ZooError(f"GitHub API: an answer without {'.'.join(keys)!r}")
    return value


def connect(api_url: str | None, repository: str | None, token: str | None) -> GitHub:
    """A client from the workflow's environment, each missing or malformed value one line naming it."""
    if not token:
        raise UsageError("GITHUB_TOKEN: not set; the workflow passes secrets.GITHUB_TOKEN (or use --dry-run)")
    url = urlsplit(api_url or "")
    if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
        raise UsageError(f"GITHUB_API_URL: expected an http(s) URL, got {api_url!r}")
    if not repository or not REPOSITORY.match(repository):
        raise UsageError(f"GITHUB_REPOSITORY: expected OWNER/NAME, got {repository!r}")
    return GitHub(api_url or "", repository, token)


def open_pull_request(gh: GitHub, *, base: str, base_sha: str, branch: str, path: str, content: str, message: str,
                      title: str, body: str) -> PullRequest:  # fmt: skip
    """Commit ``content`` at ``path`` over ``base_sha`` on ``branch`` (created, or moved there), then open
    the pull request into ``base``, or update the one already open from that branch."""
    if not SHA1.match(base_sha):
        raise UsageError(f"GITHUB_SHA (--base-sha): expected the 40-hex commit checked out, got {base_sha!r}")
    base_tree = _field(gh.expect("GET", gh.repo_path(f"/git/commits/{base_sha}")), "tree", "sha")
    tree = gh.expect("POST", gh.repo_path("/git/trees"), {
        "base_tree": base_tree, "tree": [{"path": path, "mode": "100644", "type": "blob", "content": content}],
    })  # fmt: skip
    commit = gh.expect("POST", gh.repo_path("/git/commits"),
                       {"message": message, "tree": _field(tree, "sha"), "parents": [base_sha]})  # fmt: skip
    sha = _field(commit, "sha")
    ref = quote(branch, safe="/")
    status, _ = gh.call("GET", gh.repo_path(f"/git/ref/heads/{ref}"))
    if status == 200:
        gh.expect("PATCH", gh.repo_path(f"/git/refs/heads/{ref}"), {"sha": sha, "force": True})
    elif status == 404:
        gh.expect("POST", gh.repo_path("/git/refs"), {"ref": f"refs/heads/{branch}", "sha": sha})
    else:
        raise ZooError(f"GitHub API GET {gh.repo_path(f'/git/ref/heads/{ref}')}: HTTP {status}")
    owner = gh.repository.split("/")[0]
    query = urlencode({"state": "open", "head": f"{owner}:{branch}", "base": base})
    open_ = gh.expect("GET", gh.repo_path(f"/pulls?{query}"))
    if isinstance(open_, list) and open_ and isinstance(open_[0], dict):
        number = int(_field(open_[0], "number"))
        updated = gh.expect("PATCH", gh.repo_path(f"/pulls/{number}"), {"title": title, "body": body})
        return PullRequest(number, str(_field(updated, "html_url")), created=False)
    created = gh.expect("POST", gh.repo_path("/pulls"), {"title": title, "head": branch, "base": base, "body": body})
    return PullRequest(int(_field(created, "number")), str(_field(created, "html_url")), created=True)
