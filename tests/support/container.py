"""A booted Debian with a real systemd as PID 1, in systemd-nspawn, for the e2e tests.

No host systemd or D-Bus is needed (`--keep-unit --register=no`); the root is built once
by debootstrap and cached, keyed by its recipe; every boot gets a throwaway overlay
(`--volatile=overlay`) and its own network namespace with only a loopback. Nothing is
installed inside by network: the project's environment is bound in read-only and a venv
is pointed at it with Debian's own python3.11, the same minor version as ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Container", "build_root", "missing_tools"]

SUITE = "bookworm"
MIRROR = os.environ.get("ZOO_E2E_MIRROR", "http://deb.debian.org/debian")
RECIPE = ["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus,python3", SUITE]
CACHE = Path(os.environ.get("ZOO_E2E_CACHE", "/var/cache/model-zoo-e2e"))
VENV = "/opt/zoo/venv"
AGENT = f"{VENV}/bin/zoo-agent"


def missing_tools() -> str | None:
    """Why the e2e tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    for tool in ("systemd-nspawn", "nsenter", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (.ci/setup installs systemd-container and debootstrap)"
    return None


def build_root() -> Path:
    """The cached Debian root for this recipe; built once (about a minute), atomically."""
    key = hashlib.sha256(json.dumps([RECIPE, MIRROR]).encode()).hexdigest()[:12]
    root = CACHE / f"{SUITE}-{key}"
    if (root / ".zoo-e2e-complete").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two suites at once build it once
        if (root / ".zoo-e2e-complete").exists():
            return root
        staging = CACHE / f".{root.name}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        proc = subprocess.run([*RECIPE, str(staging), MIRROR], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(f"debootstrap failed ({proc.returncode}): {proc.stderr[-2000:]}")
        (staging / ".zoo-e2e-complete").write_text(json.dumps({"recipe": RECIPE, "mirror": MIRROR}))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staging, root)
    return root


class Container:
    """One boot of the cached root; `run` executes inside it with nsenter."""

    def __init__(self, root: Path, *, name: str, bind: dict[Path, str], bind_ro: dict[Path, str], log: Path) -> None:
        self.root, self.name, self.log_path = root, name, log
        args = ["systemd-nspawn", "--keep-unit", "--register=no", "-q", "-D", str(root), "-M", name, "-b",
                "--volatile=overlay", "--private-network"]
        args += [f"--bind={src}:{dst}" for src, dst in bind.items()]
        args += [f"--bind-ro={src}:{dst}" for src, dst in bind_ro.items()]
        self.log = open(log, "wb")  # noqa: SIM115 (closed in poweroff)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self._init_pid()
        self._wait_booted()

    def _init_pid(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}: {self.log_path.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                    for child in (task / "children").read_text().split():
                        # Only once it has exec'd systemd: nspawn's intermediate child (comm
                        # "systemd-nspawn") exits, and entering its namespaces then fails every time.
                        if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                            return int(child)
            time.sleep(0.1)
        raise RuntimeError("the container's PID 1 did not appear")

    def _wait_booted(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = self.run("systemctl", "is-system-running", check=False)
            state = proc.stdout.strip() or proc.stderr.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the container did not finish booting: {state!r}")

    def run(self, *argv: str, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv], capture_output=True, text=True,
                              timeout=timeout, input=input, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"in container: {shlex.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sh(self, script: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-euc", script, check=check, timeout=timeout)

    def on_loopback(self, argv: list[str], **kwargs: object) -> subprocess.Popen[str]:
        """A host program in the container's network namespace: its 127.0.0.1 is the container's."""
        return subprocess.Popen(["nsenter", "-t", str(self.pid), "-n", *argv], text=True, **kwargs)  # type: ignore[call-overload,no-any-return]

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"-p{p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def status(self, unit: str) -> str:
        return self.run("systemctl", "status", "--no-pager", "-n", "0", unit, check=False).stdout

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    def wait_for(self, unit: str, predicate_props: dict[str, str], timeout: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        shown: dict[str, str] = {}
        while time.monotonic() < deadline:
            shown = self.show(unit, *predicate_props, "StatusText")
            if all(shown.get(k) == v for k, v in predicate_props.items()):
                return shown
            time.sleep(0.3)
        raise AssertionError(f"{unit}: wanted {predicate_props}, have {shown}\n{self.journal(unit)[-3000:]}")

    def install_agent(self) -> None:
        """A venv of Debian's python3.11 over the host's packages (bound at /opt/zoo/deps) and the source (/opt/zoo/src)."""
        version = ".".join(map(str, sys.version_info[:2]))
        self.sh(f"""
            mkdir -p {VENV}/bin {VENV}/lib/python{version}/site-packages
            ln -sf /usr/bin/python{version} {VENV}/bin/python
            printf 'home = /usr/bin\\ninclude-system-site-packages = false\\n' > {VENV}/pyvenv.cfg
            printf '/opt/zoo/src\\n/opt/zoo/deps\\n' > {VENV}/lib/python{version}/site-packages/zoo-e2e.pth
            printf '#!{VENV}/bin/python\\nimport sys\\nfrom zoo_agent.cli.main import main\\nsys.exit(main())\\n' > {AGENT}
            chmod 755 {AGENT}
        """)

    def poweroff(self, timeout: float = 60) -> None:
        with contextlib.suppress(Exception):
            self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        finally:
            self.log.close()


@contextlib.contextmanager
def booted(**kwargs: object) -> Iterator[Container]:
    container = Container(**kwargs)  # type: ignore[arg-type]
    try:
        yield container
    finally:
        container.poweroff()
