"""A loopback HTTP file server for tests: Range requests and injectable faults.

Standard library only; binds 127.0.0.1 on a free port. Faults: answer with a status,
drop the connection after N bytes (once), or pause mid-body until the test resumes it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

S = TypeVar("S", bound=ThreadingHTTPServer)


@dataclass
class Faults:
    status: dict[str, int] = field(default_factory=dict)  # path -> HTTP status to answer
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before a drop (once)
    pause_at: dict[str, int] = field(default_factory=dict)  # path -> byte offset to pause at (once)
    paused: threading.Event = field(default_factory=threading.Event)
    resume: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header)


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.faults = Faults()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *_args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path, faults = self.path.lstrip("/"), self.server.faults
        faults.requests.append((path, self.headers.get("Range", "")))
        if path in faults.status:
            self.send_error(faults.status[path])
            return
        data = self.server.files.get(path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = memoryview(data)[start:]
        drop = faults.drop_after.pop(path, None)
        pause = faults.pause_at.pop(path, None)
        if drop is not None:
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.connection.shutdown(2)  # the client sees a short read
            return
        if pause is not None:
            self.wfile.write(body[:pause])
            self.wfile.flush()
            faults.paused.set()
            faults.resume.wait(timeout=20)
            body = body[pause:]
        self.wfile.write(body)


@contextmanager
def running(server: S) -> Iterator[S]:
    """Serve in a thread; on the way out, release any paused response, then stop."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.faults.resume.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()


def serve(files: dict[str, bytes]) -> AbstractContextManager[FileServer]:
    return running(FileServer(files))
