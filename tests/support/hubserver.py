"""A Hugging Face hub-compatible server for tests, standard library only, on 127.0.0.1
(or another address: the fleet test binds it inside a network namespace, tests/support/netns.py).

It speaks what the real ``huggingface_hub`` client calls for our hf source and ``add``:
``GET /api/models/<repo>/revision/<rev>`` (model_info), ``GET /api/models/<repo>/tree/<rev>``
(list_repo_tree), ``POST /api/models/<repo>/paths-info/<rev>`` (get_paths_info: a form of
``paths`` and ``expand``; paths that do not exist are left out, as the hub does), and
``GET|HEAD /<repo>/resolve/<rev>/<path>`` with ``X-Repo-Commit``,
``ETag``, ``X-Linked-Etag``, ``X-Linked-Size`` and Range requests. Errors carry the hub's
``X-Error-Code`` values (RepoNotFound 401, GatedRepo 401/403, RevisionNotFound 404,
EntryNotFound 404), which is how the client picks its exception types.

olah (a real mirror) covers the happy path in other tests; this server exists for what
olah cannot do: sizes and sha256 in tree listings, the right error types, large files,
and faults: drop the connection, serve wrong bytes of the right size, stall, fail.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.httpfiles import running

LFS_THRESHOLD = 10_000  # files at least this large are "LFS" (carry a sha256 in listings)


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha1 -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch -> sha1
    license: str = "apache-2.0"
    token: str | None = None  # required bearer token, if any
    gated: bool = False  # without the token: GatedRepo (else RepoNotFound, as for private)

    def commit(self, files: dict[str, bytes], branch: str = "main") -> str:
        sha = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(d).hexdigest()) for p, d in files.items())).encode() + str(len(self.commits)).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.refs[branch] = sha
        return sha


@dataclass
class Faults:
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes before a drop (once)
    wrong_bytes: set[str] = field(default_factory=set)  # serve other bytes of the same size
    stall: dict[str, float] = field(default_factory=dict)  # path -> seconds to sleep before the body
    status: dict[str, int] = field(default_factory=dict)  # path -> status for resolve (5xx retried by clients)
    pause_at: dict[str, int] = field(default_factory=dict)  # path -> byte offset to pause at (once)
    paused: threading.Event = field(default_factory=threading.Event)
    resume: threading.Event = field(default_factory=threading.Event)


@dataclass
class Hit:
    method: str
    path: str
    range: str
    sent: int
    authorization: bool


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _Handler)
        self.host = host
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.log: list[Hit] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server_address[1]}"

    def bytes_sent(self, path_suffix: str) -> int:
        return sum(h.sent for h in self.log if h.method == "GET" and h.path.endswith(path_suffix))


class _Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:
        pass

    def _error(self, status: int, code: str, message: str = "") -> None:
        body = json.dumps({"error": message or code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message or code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, document: object) -> None:
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        auth = self.headers.get("Authorization", "")
        if repo.token is not None and auth != f"Bearer {repo.token}":
            if repo.gated and auth:
                self._error(403, "GatedRepo", "Access to this gated repository is restricted")
            else:
                self._error(401, "GatedRepo" if repo.gated else "RepoNotFound", "Authentication required")
            return None
        return repo

    def _commit(self, repo: Repo, rev: str) -> str | None:
        sha = repo.refs.get(rev, rev)
        if sha not in repo.commits:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return sha

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        hit = Hit(self.command, url.path, "", 0, "Authorization" in self.headers)
        with self.server.lock:
            self.server.log.append(hit)
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(min(length, 1 << 20)).decode())
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "paths-info":
            self._paths_info(parts[2] + "/" + parts[3], "/".join(parts[5:]), form.get("paths", []))
        else:
            self._error(404, "NotFound", "no such endpoint")

    def _paths_info(self, repo_id: str, rev: str, paths: list[str]) -> None:
        """The hub's answer: one tree entry per path that exists (a file, or a directory above files)."""
        repo = self._repo(repo_id)
        sha = self._commit(repo, rev) if repo else None
        if repo is None or sha is None:
            return
        files, entries = repo.commits[sha], []
        for path in dict.fromkeys(paths):
            data = files.get(path)
            if data is not None:
                entry: dict[str, object] = {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), "size": len(data), "path": path}
                if len(data) >= LFS_THRESHOLD:
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            elif any(p.startswith(path.rstrip("/") + "/") for p in files):
                entries.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path})
        self._json(entries)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        hit = Hit(self.command, url.path, self.headers.get("Range", ""), 0, "Authorization" in self.headers)
        with self.server.lock:
            self.server.log.append(hit)
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            self._api(parts[2] + "/" + parts[3], parts[4], parts[5], parse_qs(url.query))
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), hit)
        else:
            self._error(404, "NotFound", "no such endpoint")

    def _api(self, repo_id: str, what: str, rev: str, _query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id)
        sha = self._commit(repo, rev) if repo else None
        if repo is None or sha is None:
            return
        files = repo.commits[sha]
        if what == "revision":
            self._json({
                "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.token is not None, "gated": repo.gated,
                "siblings": [{"rfilename": p} for p in sorted(files)], "cardData": {"license": repo.license},
                "tags": [], "downloads": 0, "likes": 0,
            })  # fmt: skip
            return
        entries = []
        for path, data in sorted(files.items()):
            entry: dict[str, object] = {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), "size": len(data), "path": path}
            if len(data) >= LFS_THRESHOLD:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(entries)

    def _resolve(self, repo_id: str, rev: str, path: str, hit: Hit) -> None:
        repo = self._repo(repo_id)
        sha = self._commit(repo, rev) if repo else None
        if repo is None or sha is None:
            return
        faults = self.server.faults
        if path in faults.status:
            self._error(faults.status[path], "ServerError", "injected failure")
            return
        data = repo.commits[sha].get(path)
        if data is None:
            self._error(404, "EntryNotFound", f"{path} does not exist at {sha}")
            return
        if path in faults.wrong_bytes:
            data = bytes(b ^ 0xFF for b in data)
        etag = hashlib.sha256(data).hexdigest() if len(data) >= LFS_THRESHOLD else hashlib.sha1(data).hexdigest()
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{etag}"')
        if len(data) >= LFS_THRESHOLD:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        if path in faults.stall:
            time.sleep(faults.stall[path])
        body = memoryview(data)[start:]
        drop = faults.drop_after.pop(path, None)
        if drop is not None:
            body = body[:drop]
        pause = faults.pause_at.pop(path, None)
        if pause is not None:
            self.wfile.write(body[:pause])
            self.wfile.flush()
            hit.sent += pause
            body = body[pause:]
            faults.paused.set()
            faults.resume.wait(timeout=30)
        for i in range(0, len(body), 1 << 16):
            self.wfile.write(body[i:i + (1 << 16)])
            hit.sent += len(body[i:i + (1 << 16)])
        if drop is not None:
            self.wfile.flush()
            self.connection.shutdown(2)
            self.close_connection = True


def serve() -> AbstractContextManager[HubServer]:
    return running(HubServer())
