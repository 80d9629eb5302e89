"""A stand-in for the few GitHub REST endpoints ``zoo-agent registry update-pr`` calls, on
127.0.0.1, standard library only: the boundary at which a test mocks GitHub (issue #35).

It keeps what the calls build (trees with their files' contents, commits, branch refs,
pull requests) and records every call, so a test reads what was committed and asked.
Answers follow GitHub's shapes and statuses (docs.github.com/rest: git/commits, git/trees,
git/refs, pulls): 201 for a creation, 404 ``{"message": "Not Found"}`` for a missing ref,
422 for a ref that exists, 401 ``Bad credentials`` without the token.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Call:
    method: str
    path: str  # with the query
    body: Any
    authorization: str


@dataclass
class State:
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)  # sha -> {"tree": sha, "parents": [...], "message": ...}
    trees: dict[str, dict[str, str]] = field(default_factory=dict)  # sha -> {path: content} (what a commit changed)
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    pulls: list[dict[str, Any]] = field(default_factory=list)


class GitHubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repository: str = "acme/zoo", token: str = "ghs_" + "t0k3n" * 7) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repository, self.token = repository, token
        self.state = State()
        self.calls: list[Call] = []
        self.redirect_to: str | None = None  # answer every call with a 307 to this URL
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def commit(self, sha: str, files: dict[str, str] | None = None) -> str:
        """A commit that exists on GitHub (the workflow's checkout), with its tree's files."""
        tree = "e" * 40 if files is None else hashlib.sha1(json.dumps(files).encode()).hexdigest()
        self.state.trees[tree] = dict(files or {})
        self.state.commits[sha] = {"tree": tree, "parents": [], "message": "base"}
        return sha


class _Handler(BaseHTTPRequestHandler):
    server: GitHubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:
        pass

    def _send(self, status: int, document: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self) -> None:
        self._send(404, {"message": "Not Found", "documentation_url": "https://docs.github.com/rest", "status": "404"})

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, 8 << 20))
        body = json.loads(raw) if raw else None
        server = self.server
        with server.lock:
            server.calls.append(Call(self.command, self.path, body, self.headers.get("Authorization", "")))
            if server.redirect_to is not None:
                self._send(307, {"message": "Temporary Redirect"}, {"Location": server.redirect_to + self.path})
                return
            if self.headers.get("Authorization") != f"Bearer {server.token}":
                self._send(401, {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest", "status": "401"})
                return
            url = urlsplit(self.path)
            prefix = f"/repos/{server.repository}/"
            if not url.path.startswith(prefix):
                self._not_found()
                return
            self._route(self.command, unquote(url.path[len(prefix):]), parse_qs(url.query), body)

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> None:
        state, repo = self.server.state, self.server.repository
        if method == "GET" and path.startswith("git/commits/"):
            sha = path.removeprefix("git/commits/")
            if sha not in state.commits:
                self._not_found()
                return
            c = state.commits[sha]
            self._send(200, {"sha": sha, "tree": {"sha": c["tree"]}, "parents": [{"sha": p} for p in c["parents"]], "message": c["message"]})
        elif method == "POST" and path == "git/trees":
            files = {e["path"]: e["content"] for e in body["tree"]}
            sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
            state.trees[sha] = {**state.trees.get(body.get("base_tree"), {}), **files}
            self._send(201, {"sha": sha, "tree": [{"path": p, "mode": "100644", "type": "blob"} for p in files], "truncated": False})
        elif method == "POST" and path == "git/commits":
            if body["tree"] not in state.trees or any(p not in state.commits for p in body["parents"]):
                self._send(422, {"message": "Tree SHA does not exist", "status": "422"})
                return
            sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
            state.commits[sha] = {"tree": body["tree"], "parents": body["parents"], "message": body["message"]}
            self._send(201, {"sha": sha, "tree": {"sha": body["tree"]}, "parents": [{"sha": p} for p in body["parents"]]})
        elif method == "GET" and path.startswith("git/ref/heads/"):
            branch = path.removeprefix("git/ref/heads/")
            if branch not in state.refs:
                self._not_found()
                return
            self._send(200, {"ref": f"refs/heads/{branch}", "object": {"sha": state.refs[branch], "type": "commit"}})
        elif method == "POST" and path == "git/refs":
            branch = body["ref"].removeprefix("refs/heads/")
            if branch in state.refs:
                self._send(422, {"message": "Reference already exists", "status": "422"})
                return
            state.refs[branch] = body["sha"]
            self._send(201, {"ref": body["ref"], "object": {"sha": body["sha"], "type": "commit"}})
        elif method == "PATCH" and path.startswith("git/refs/heads/"):
            branch = path.removeprefix("git/refs/heads/")
            if branch not in state.refs:
                self._send(422, {"message": "Reference does not exist", "status": "422"})
                return
            state.refs[branch] = body["sha"]
            self._send(200, {"ref": f"refs/heads/{branch}", "object": {"sha": body["sha"], "type": "commit"}})
        elif method == "GET" and path == "pulls":
            owner = repo.split("/")[0]
            found = [p for p in state.pulls if p["state"] == query.get("state", ["open"])[0]
                     and (not query.get("head") or f"{owner}:{p['head']['ref']}" == query["head"][0])
                     and (not query.get("base") or p["base"]["ref"] == query["base"][0])]  # fmt: skip
            self._send(200, found)
        elif method == "POST" and path == "pulls":
            if body["head"] not in state.refs:
                self._send(422, {"message": "Validation Failed", "errors": [{"field": "head", "code": "invalid"}]})
                return
            number = len(state.pulls) + 1
            pr = {"number": number, "html_url": f"https://github.com/{repo}/pull/{number}", "state": "open", "title": body["title"],
                  "body": body["body"], "head": {"ref": body["head"]}, "base": {"ref": body["base"]}}  # fmt: skip
            state.pulls.append(pr)
            self._send(201, pr)
        elif method == "PATCH" and path.startswith("pulls/"):
            pr = next((p for p in state.pulls if str(p["number"]) == path.removeprefix("pulls/")), None)
            if pr is None:
                self._not_found()
                return
            pr.update({k: body[k] for k in ("title", "body") if k in body})
            self._send(200, pr)
        else:
            self._not_found()


@contextmanager
def serve(**kwargs: Any) -> Iterator[GitHubServer]:
    server = GitHubServer(**kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
