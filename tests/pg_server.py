"""A real PostgreSQL server for the tests and bench/store.py: initdb into a temporary folder, listen
on 127.0.0.1.

Uses the distribution's server binaries (Debian: ``apt-get install postgresql``; ``.ci/run``
installs them when missing). PostgreSQL refuses to run as root, so as root the server runs as
the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``start()``, ``stop()`` (fast shutdown: the tests' outage) and ``url`` (SQLAlchemy, psycopg 3)."""

    def __init__(self):
        bindir = _bin_dir()
        if bindir is None:
            raise PostgresMissing("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bindir = bindir
        # Its own folder under /tmp: pytest's tmp_path sits in a root-only folder the postgres user cannot enter.
        self.root = root = Path(tempfile.mkdtemp(prefix="hera-pg-"))
        self.data = root / "data"
        self.port = _free_port()
        self.url = f"postgresql+psycopg://hera@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0
        self._databases = 0
        if self._as_postgres:
            shutil.chown(root, "postgres", "postgres")
            os.chmod(root, 0o700)
        self._run("initdb", "-D", str(self.data), "-U", "hera", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")

    def fresh_database(self) -> str:
        """The URL of a new, empty database on this server (one per test: no state leaks between tests)."""
        import psycopg

        self._databases += 1
        name = f"hera_{self._databases}_{self.port}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=hera dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


def started_server() -> PostgresServer:
    """A started server, or the test skipped (with why) where the binaries are missing."""
    import pytest

    try:
        server = PostgresServer()
    except PostgresMissing as e:
        pytest.skip(str(e))
    server.start()
    return server
