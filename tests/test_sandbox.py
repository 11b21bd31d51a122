"""The code sandbox: output, time limit, no network, scratch folder, memory limit."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from hera_ray.eval.sandbox import (NETNS, OUTPUT_LIMIT, PYTHON_BLOCK, SECCOMP, isolation, network_namespace_prefix,
                                   run_code, seccomp_available)


@pytest.fixture
def listening_port():
    """A real socket listening on 127.0.0.1 in the test process; its port."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


@pytest.fixture(scope="module")
def http_server():
    """A real HTTP server on 127.0.0.1 in the test process that answers every GET with 'reached'; its URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Reply(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"reached")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Reply)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _escapes(url: str) -> dict[str, str]:
    """Three ways past Python's socket block, each trying to reach ``url``: the real
    ``_socket.socket`` base class, libc's ``socket`` through ctypes, and a ``curl`` subprocess."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    return {
        "raw socket": ("import socket\n"
                       "raw = socket.socket.__bases__[0](socket.AF_INET, socket.SOCK_STREAM)\n"
                       f"raw.settimeout(3)\nraw.connect(('127.0.0.1', {port}))\n"
                       "raw.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\nprint(b''.join(iter(lambda: raw.recv(4096), b'')).decode())\n"),
        "ctypes": ("import ctypes, socket\n"
                   "libc = ctypes.CDLL(None, use_errno=True)\n"
                   "fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
                   "if fd < 0:\n    raise OSError(ctypes.get_errno(), 'libc socket() refused')\n"
                   f"s = socket.socket(fileno=fd)\ns.settimeout(3)\ns.connect(('127.0.0.1', {port}))\n"
                   "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\nprint(b''.join(iter(lambda: s.recv(4096), b'')).decode())\n"),
        "curl": ("import subprocess\n"
                 f"done = subprocess.run(['curl', '-s', '--max-time', '3', '{url}'], capture_output=True, text=True)\n"
                 "print(done.stdout)\nraise SystemExit(done.returncode)\n"),
    }


LAYERS = [pytest.param(True, False, id="network-namespace-only"), pytest.param(False, True, id="seccomp-only")]


@pytest.mark.parametrize("netns, seccomp", LAYERS)
def test_each_kernel_layer_alone_stops_every_way_past_the_python_block(http_server, netns, seccomp):
    if netns and not network_namespace_prefix():
        pytest.skip("unshare --net is not usable on this host")
    if seccomp and not seccomp_available():
        pytest.skip("seccomp filters cannot be installed on this host")
    import shutil

    if not shutil.which("curl"):
        pytest.skip("no curl on this host")
    for way, code in _escapes(http_server).items():
        r = run_code(code, timeout_s=10, network_namespace=netns, seccomp=seccomp)
        assert r.isolation == ((NETNS,) if netns else (SECCOMP,)) + (PYTHON_BLOCK,)
        assert not r.ok and "reached" not in r.stdout, (way, r)


def test_the_python_block_alone_is_no_wall(http_server):
    """What the last layer cannot stop, shown rather than claimed: where the host allows neither
    kernel layer, model-written code could reach the network these ways (the bench records the
    isolation it ran under)."""
    import shutil

    if not shutil.which("curl"):
        pytest.skip("no curl on this host")
    for way, code in _escapes(http_server).items():
        r = run_code(code, timeout_s=10, network_namespace=False, seccomp=False)
        assert r.isolation == (PYTHON_BLOCK,)
        assert r.ok and "reached" in r.stdout, (way, r)


def test_the_child_reports_the_isolation_it_ran_under():
    r = run_code("print('hi')")
    assert r.ok and r.isolation == isolation() and r.isolation[-1] == PYTHON_BLOCK
    assert (NETNS in r.isolation) == bool(network_namespace_prefix()) and (SECCOMP in r.isolation) == seccomp_available()
    # asyncio's socketpair (AF_UNIX) still works under every layer
    assert run_code("import asyncio\nprint(asyncio.run(asyncio.sleep(0, 'done')))").stdout == "done\n"


def test_normal_code_returns_stdout():
    r = run_code("import sys\nprint('hello', 6 * 7)\nprint('oops', file=sys.stderr)")
    assert (r.ok, r.returncode, r.timed_out) == (True, 0, False)
    assert r.stdout == "hello 42\n"
    assert r.stderr == "oops\n"


def test_failing_code_reports_its_exit():
    r = run_code("raise SystemExit(3)")
    assert (r.ok, r.returncode, r.timed_out) == (False, 3, False)
    r = run_code("assert 1 == 2, 'math is broken'")
    assert not r.ok and r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "AssertionError: math is broken"


def test_infinite_loop_is_killed_quickly():
    started = time.monotonic()
    r = run_code("while True:\n    pass", timeout_s=2)
    assert r.timed_out and not r.ok and r.returncode < 0
    assert time.monotonic() - started < 6


def test_timeout_kills_the_whole_process_group(tmp_path: Path):
    marker = tmp_path / "survivor"
    child = f"import time; time.sleep(2); open({str(marker)!r}, 'w')"
    code = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nwhile True:\n    pass\n"
    assert run_code(code, timeout_s=1).timed_out
    time.sleep(2.5)
    assert not marker.exists(), "a child of the sandboxed code outlived the timeout"


def test_connect_to_a_local_listener_fails(listening_port):
    code = ("import socket\n"
            f"socket.create_connection(('127.0.0.1', {listening_port}), timeout=2)\n"
            "print('connected')\n")
    r = run_code(code, timeout_s=5)
    assert not r.ok and "connected" not in r.stdout
    assert "OSError" in r.stderr


def test_connect_to_the_internet_fails():
    code = ("import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.connect(('1.1.1.1', 53))\n"
            "s.send(b'x')\n"
            "print('sent')\n")
    r = run_code(code, timeout_s=5)
    assert not r.ok and "sent" not in r.stdout
    assert "network is disabled in the sandbox" in r.stderr


def test_local_socketpair_still_works_for_asyncio():
    r = run_code("import asyncio\nprint(asyncio.run(asyncio.sleep(0, 'done')))")
    assert r.ok and r.stdout == "done\n"


def test_files_land_in_a_scratch_folder_that_is_removed(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_code("import os\nopen('written.txt', 'w').write('hi')\nprint(os.getcwd())")
    assert r.ok
    scratch = Path(r.stdout.strip())
    assert scratch != tmp_path and scratch.name == "work"
    assert not (tmp_path / "written.txt").exists()
    assert not Path(os.getcwd(), "written.txt").exists()
    assert not scratch.exists(), "the scratch folder was not removed"


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("HERA_SECRET_FOR_TEST", "leak")
    r = run_code("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\nprint(sys.stdin.read() == '')")
    assert r.ok
    names, isolated, stdin_empty = r.stdout.splitlines()
    assert "HERA_SECRET_FOR_TEST" not in names
    assert (isolated, stdin_empty) == ("1", "True")


def test_memory_limit():
    r = run_code("x = bytearray(512 * 1024 * 1024)\nprint('allocated')", memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr


def test_large_output_is_truncated():
    r = run_code("print('a' * 100_000)\nprint('END')")
    assert r.ok
    assert len(r.stdout) < OUTPUT_LIMIT + 100
    assert r.stdout.startswith("aaa") and r.stdout.endswith("END\n") and "bytes cut" in r.stdout


def test_odd_input_does_not_raise():
    assert not run_code("\x00 junk").ok
    assert run_code("s = '\udcff'\nprint('survived')").ok
    assert run_code("").ok
