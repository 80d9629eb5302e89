"""A zoo world for integration tests: a source directory, an index, a root, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from zoo_agent.cli.main import cli


@dataclass
class World:
    tmp: Path
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    loras: dict[str, dict[str, Any]] = field(default_factory=dict)
    available: list[str] = field(default_factory=list)
    keep_versions: int = 2
    tenant: dict[str, Any] = field(default_factory=dict)  # extra tenant settings (generation, resources)

    @property
    def index(self) -> Path:
        return self.tmp / "index.json"

    @property
    def root(self) -> Path:
        return self.tmp / "zoo"

    def source_dir(self, aid: str, version: str) -> Path:
        return self.tmp / "src" / aid / version

    def artifact(self, aid: str, version: str, files: dict[str, bytes], *, kind: str = "models", source: dict[str, Any] | None = None) -> None:
        """Write the files to a source directory and declare them, pinned, in the index."""
        src = self.source_dir(aid, version)
        for name, data in files.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(data)
        entry: dict[str, Any] = {
            "version": version,
            "source": source or {"type": "file", "path": str(src.relative_to(self.tmp))},
            "files": [{"path": n, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()],
            "license": "MIT",
        }
        if kind == "loras":
            entry.update(base_model="m", rank=4)
            self.loras[aid] = entry
        else:
            self.models[aid] = entry
        self.write_index()

    def write_index(self) -> None:
        loras = sorted(self.loras)
        doc = {
            "models": self.models,
            "loras": self.loras,
            "tenants": {"t": {"model": "m", "loras": loras, **self.tenant}} if "m" in self.models else {},
            "hosts": {"h": {"resident": "t" if "m" in self.models else None, "available": self.available,
                            "retention": {"keep_versions": self.keep_versions}}},
        }
        if doc["hosts"]["h"]["resident"] is None:
            del doc["hosts"]["h"]["resident"]
        self.index.write_text(json.dumps(doc, indent=2))

    def args(self, *args: str) -> list[str]:
        """Defaults first, so a test's own --host or --index wins (click keeps the last)."""
        return ["--root", str(self.root), "--index", str(self.index), "--host", "h", *args]

    def run(self, *args: str) -> Result:
        """The CLI in-process: `zoo-agent ARGS --root --index --host h`."""
        command, *rest = args
        return CliRunner().invoke(cli, [command, *self.args(*rest)] if command != "--debug" else list(args))

    def raw(self, *args: str) -> Result:
        """The CLI in-process with exactly these arguments (for commands without --root)."""
        return CliRunner().invoke(cli, list(args))

    def spawn(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """The CLI as a real process (for kills, locks and concurrency)."""
        command, *rest = args
        return subprocess.Popen(
            [sys.executable, "-m", "zoo_agent", command, *self.args(*rest)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.tmp, **kwargs,
        )

    def current(self, aid: str, kind: str = "models") -> str | None:
        link = self.root / kind / aid / "current"
        return os.readlink(link).removeprefix("versions/") if link.is_symlink() else None

    def tree(self) -> dict[str, Any]:
        """Every path under the root with its type, mode and content: for byte-identical checks."""
        snapshot: dict[str, Any] = {}
        if not self.root.exists():
            return snapshot
        for path in sorted(self.root.rglob("*")):
            rel = str(path.relative_to(self.root))
            st = path.lstat()
            if path.is_symlink():
                snapshot[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                snapshot[rel] = ("dir", st.st_mode)
            else:
                snapshot[rel] = ("file", st.st_mode, st.st_mtime_ns, path.read_bytes())
        return snapshot
