"""Start hera-ray servers as local processes: the embedded single-machine default.

Used by ``hera up --local-edges N``, the benchmarks and the tests. Each process
writes its log to ``<workdir>/<name>.log``; it is ready when it prints its ready line there.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hera_ray.config import write_token_file
from hera_ray.errors import HeraError

_REGISTRY_READY = re.compile(rb"hera registry listening on (\S+):(\d+)")
_EDGE_READY = re.compile(rb"hera edge node (\S+) serving (\S+) on (\S+):(\d+)")


class LaunchError(HeraError):
    """A local process exited or did not become ready; the message holds its log's tail."""


@dataclass
class LocalProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    address: str = ""
    node_id: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (edge nodes drain), then SIGKILL if it has not exited within ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)


def _spawn(name: str, args: list[str], workdir: Path, ready: re.Pattern, timeout: float, env: dict | None,
           detach: bool = False) -> tuple[LocalProcess, re.Match]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = subprocess.Popen([sys.executable, "-m", "hera_ray", *args], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=full_env, start_new_session=detach)
    log.close()
    proc = LocalProcess(name, popen, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = ready.search(log_path.read_bytes())
        if match:
            return proc, match
        if popen.poll() is not None:
            raise LaunchError(f"{name} exited with code {popen.returncode} before it was ready:\n{proc.log_tail()}")
        time.sleep(0.05)
    proc.stop(5)
    raise LaunchError(f"{name} was not ready within {timeout:.0f}s:\n{proc.log_tail()}")


def start_registry(workdir: Path, token_file: Path, port: int = 0, host: str = "127.0.0.1",
                   extra_args: list[str] | None = None, timeout: float = 30.0) -> LocalProcess:
    proc, m = _spawn("registry", ["registry", "serve", "--host", host, "--port", str(port), "--token-file", str(token_file),
                                  *(extra_args or [])], workdir, _REGISTRY_READY, timeout, None)
    proc.address = f"{m.group(1).decode()}:{m.group(2).decode()}"
    return proc


def start_edge(workdir: Path, name: str, registry: str | None = None, token_file: Path | None = None,
               model: str = "smollm2-135m", port: int = 0, slots: int = 1, threads: int = 1,
               extra_args: list[str] | None = None, timeout: float = 120.0, env: dict | None = None,
               detach: bool = False) -> LocalProcess:
    """Start an edge node process; ``detach`` puts it in its own session so it outlives the caller."""
    args = ["edge", "serve", "--model", model, "--port", str(port), "--slots", str(slots), "--threads", str(threads),
            "--node-id", name]
    if registry:
        args += ["--registry", registry, "--token-file", str(token_file)]
    proc, m = _spawn(name, args + list(extra_args or []), workdir, _EDGE_READY, timeout, env, detach)
    proc.node_id = m.group(1).decode()
    proc.address = f"{m.group(3).decode()}:{m.group(4).decode()}"
    return proc
