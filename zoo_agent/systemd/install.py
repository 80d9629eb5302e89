"""Write the rendered units and activate them: what `nixos-rebuild switch` does, off NixOS."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from zoo_agent.errors import UsageError
from zoo_agent.store.durable import DIR_MODE, write_atomic
from zoo_agent.systemd.units import UnitSettings, hidden_by_sandbox, render, sysusers

__all__ = ["Installed", "activate", "install"]


@dataclass(frozen=True)
class Installed:
    path: Path
    changed: bool


def install(settings: UnitSettings, prefix: Path, sysusers_dir: Path | None, *, dry_run: bool) -> list[Installed]:
    """Write the units (and the sysusers.d entry), changed files only; never half a file."""
    if problems := hidden_by_sandbox(settings):
        raise UsageError(f"{problems[0]}; install zoo-agent and the index elsewhere (e.g. /opt/model-zoo, /etc/model-zoo)")
    if not prefix.is_dir():
        raise UsageError(f"--prefix {prefix}: not a directory")
    files = {prefix / name: text for name, text in render(settings).items()}
    if sysusers_dir is not None:
        files[sysusers_dir / "model-zoo.conf"] = sysusers(settings)
    done = []
    for path, text in files.items():
        try:
            changed = path.read_text() != text
        except OSError:
            changed = True
        if changed and not dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text.encode(), 0o644)
        done.append(Installed(path, changed))
    return done


def activate(settings: UnitSettings) -> list[str]:
    """Create the user and the zoo directory, reload systemd: what `nixos-rebuild switch` does."""
    commands = [["systemd-sysusers"], ["systemctl", "daemon-reload"]]
    ran = []
    for argv in commands:
        if shutil.which(argv[0]) is None:
            raise UsageError(f"{argv[0]} not found: is this a systemd host? (--dry-run shows what would be written)")
        subprocess.run(argv, check=True)
        ran.append(shlex.join(argv))
    if settings.root.parent != Path("/var/lib"):
        settings.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        shutil.chown(settings.root, settings.user, settings.group)
    return ran
