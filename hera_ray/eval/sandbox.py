"""Run untrusted Python (model-written code and its tests) in a throw-away child process.

>>> run_code("print(6 * 7)").stdout
'42\\n'

What the child gets:

* a fresh scratch folder as its working directory (and ``HOME``/``TMPDIR``), removed afterwards;
* ``python -I`` (no user site, no ``PYTHON*`` variables), a minimal environment, stdin at EOF;
* no network, in up to three layers (:func:`isolation` says which this host has, the bench records it):

  1. a new, empty network namespace (``unshare --net``), where this host allows it;
  2. a seccomp filter, where this host allows it (Linux, x86-64 or arm64): the ``socket`` system
     call fails with ``EPERM`` for every family but ``AF_UNIX`` (and ``io_uring_setup`` too). It is
     inherited by every process the code starts, so a raw socket, ``ctypes`` calling libc, or a
     ``curl`` subprocess are all stopped by the kernel;
  3. always, a prelude that makes Python's socket creation and name lookups raise ``OSError``.
     Alone it is a courtesy, not a wall: it cannot stop the real ``_socket.socket`` base class,
     ``ctypes`` or a subprocess (``tests/test_sandbox.py`` shows each getting through).
* limits set by the child on itself before the code runs: address space (``memory_mb``), CPU
  seconds (``timeout_s`` + 1), no core files, file size, open files and processes;
* its own session; on timeout the whole process group is killed.

Limits are applied by a runner inside the child, not by ``preexec_fn``: the benchmark scores from
a thread pool, and ``preexec_fn`` is unsafe with threads. The child still runs as the calling
user; the folder and the network are isolated, the rest of the file system is not.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Bytes of stdout and of stderr kept (half from the start, half from the end).
OUTPUT_LIMIT = 4096
#: Largest file the child may write.
FILE_SIZE_LIMIT = 64 * 2**20
#: Processes the child's user may run (not enforced for root).
PROCESS_LIMIT = 256
OPEN_FILES_LIMIT = 256

_RUNNER = """\
import resource, sys

if {seccomp}:  # the host has it (probed by the parent), so the code does not run without it
    exec(compile({seccomp_source!r}, "<sandbox seccomp>", "exec"))
    try:
        _install_seccomp()
    except OSError as e:
        sys.stderr.write(f"[sandbox] the seccomp filter could not be installed: {{e}}\\n")
        raise SystemExit(125)
    del _install_seccomp
def _limit(which, soft, hard=None):
    hard = soft if hard is None else hard
    _, current = resource.getrlimit(which)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    try:
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):
        pass

_limit(resource.RLIMIT_AS, {memory})
_limit(resource.RLIMIT_CPU, {cpu}, {cpu} + 1)
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_FSIZE, {fsize})
_limit(resource.RLIMIT_NOFILE, {nofile})
_limit(resource.RLIMIT_NPROC, {nproc})

import _socket, socket

def _no_network(*args, **kwargs):
    raise OSError("network is disabled in the sandbox")

_RawSocket = _socket.socket

class _NoNetworkSocket(_RawSocket):
    # socket.socket() calls _socket.socket.__init__, so this covers both. Wrapping an existing
    # descriptor (socket.socketpair, which asyncio needs) stays possible.
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None:
            _no_network()
        _RawSocket.__init__(self, family, type, proto, fileno)

_socket.socket = _socket.SocketType = _NoNetworkSocket
for _module in (socket, _socket):
    for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
                  "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        if hasattr(_module, _name):
            setattr(_module, _name, _no_network)
del _module, _name, _limit, _socket, socket, resource

import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


#: Installs the seccomp filter in the calling process (the child, before the code runs). ``socket``
#: fails with EPERM unless its family is AF_UNIX; ``io_uring_setup`` fails (io_uring can open
#: sockets); system calls of another ABI (i386 through ``int 0x80``, x32) fail. Everything else is
#: allowed. ``PR_SET_NO_NEW_PRIVS`` first, so no unprivileged process may install it otherwise.
_SECCOMP_SOURCE = """
def _install_seccomp():
    import ctypes, platform, struct
    arches = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
    if platform.machine() not in arches:
        raise OSError(f"no seccomp filter for {platform.machine()}")
    audit_arch, nr_socket = arches[platform.machine()]
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    ALLOW, DENY = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    prog = [(LD, 0, 0, 4),                 # 0: the call's ABI
            (JEQ, 1, 0, audit_arch),       # 1: ours: go on at 3
            (RET, 0, 0, DENY),             # 2: another ABI: refused
            (LD, 0, 0, 0),                 # 3: the system call's number
            (JGE, 5, 0, 0x40000000),       # 4: x32 ABI: refused (10)
            (JEQ, 4, 0, 425),              # 5: io_uring_setup: refused (10)
            (JEQ, 0, 2, nr_socket),        # 6: socket: check its family (7); else allowed (9)
            (LD, 0, 0, 16),                # 7: args[0], the family
            (JEQ, 0, 1, 1),                # 8: AF_UNIX: allowed (9); else refused (10)
            (RET, 0, 0, ALLOW),            # 9
            (RET, 0, 0, DENY)]             # 10
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
"""

#: The layers :func:`isolation` may report.
NETNS, SECCOMP, PYTHON_BLOCK = "network namespace", "seccomp (no socket but AF_UNIX)", "python socket block"


@dataclass(frozen=True)
class SandboxResult:
    """How the child ended. ``ok`` means exit code 0 within the time limit."""

    ok: bool
    returncode: int  # negative: killed by that signal
    timed_out: bool
    stdout: str
    stderr: str
    #: The network isolation the child ran under (:func:`isolation`'s layers).
    isolation: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1)
def seccomp_available() -> bool:
    """Whether a child here can install the seccomp filter, and it then refuses an AF_INET socket."""
    probe = (_SECCOMP_SOURCE + "\n_install_seccomp()\nimport socket\n"
             "try:\n    socket.socket(socket.AF_INET, socket.SOCK_STREAM)\nexcept PermissionError:\n    raise SystemExit(0)\n"
             "raise SystemExit(3)\n")
    try:
        done = subprocess.run([sys.executable, "-I", "-c", probe], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def isolation(network_namespace: bool = True, seccomp: bool = True) -> tuple[str, ...]:
    """The network isolation a sandboxed child gets on this host (strongest first), of the layers
    asked for: :data:`NETNS` where ``unshare --net`` works, :data:`SECCOMP` where the filter
    installs, and always :data:`PYTHON_BLOCK`."""
    layers = []
    if network_namespace and network_namespace_prefix():
        layers.append(NETNS)
    if seccomp and seccomp_available():
        layers.append(SECCOMP)
    return (*layers, PYTHON_BLOCK)


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """``("/usr/bin/unshare", "--net", "--")`` if a new network namespace works here, else ()."""
    unshare = shutil.which("unshare")
    if not unshare:
        return ()
    try:
        probe = subprocess.run([unshare, "--net", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (unshare, "--net", "--") if probe.returncode == 0 else ()


def run_code(code: str, timeout_s: float = 10.0, memory_mb: int = 1024, network_namespace: bool = True,
             seccomp: bool = True) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandboxed child; wait at most ``timeout_s`` seconds.
    ``network_namespace`` / ``seccomp`` False leave that layer out (tests of the others)."""
    layers = isolation(network_namespace, seccomp)
    root = Path(tempfile.mkdtemp(prefix="hera-sandbox-"))
    try:
        scratch = root / "work"
        scratch.mkdir()
        (scratch / "main.py").write_bytes(str(code).encode("utf-8", "replace"))
        runner = root / "runner.py"
        runner.write_text(_RUNNER.format(memory=memory_mb * 2**20, cpu=math.ceil(timeout_s) + 1,
                                         fsize=FILE_SIZE_LIMIT, nofile=OPEN_FILES_LIMIT, nproc=PROCESS_LIMIT,
                                         seccomp=SECCOMP in layers, seccomp_source=_SECCOMP_SOURCE))
        command = [*(network_namespace_prefix() if NETNS in layers else ()), sys.executable, "-I", str(runner)]
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            returncode, timed_out = _run(command, scratch, out, err, timeout_s)
        stdout, stderr = _read_capped(root / "stdout"), _read_capped(root / "stderr")
        if timed_out:
            stderr += f"\n[sandbox] killed after {timeout_s:g} s"
        return SandboxResult(returncode == 0 and not timed_out, returncode, timed_out, stdout, stderr, layers)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(command: list[str], cwd: Path, out, err, timeout_s: float) -> tuple[int, bool]:
    """Start the child in its own session; on timeout kill its group. (returncode, timed_out)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(cwd), "TMPDIR": str(cwd), "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, close_fds=True)
    except OSError as e:
        err.write(f"[sandbox] cannot start python: {e}\n".encode())
        return 127, False
    timed_out = not _wait_exited(proc.pid, timeout_s)
    # The group leader is exited but not reaped yet, so its group id cannot have been reused:
    # killing the group also ends anything the code left running in the background.
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(), timed_out


def _wait_exited(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` exits (without reaping it); False if ``timeout_s`` passed first."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _read_capped(path: Path, limit: int = OUTPUT_LIMIT) -> str:
    """The file's text; if longer than ``limit`` bytes, its start and end with a cut mark."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if size <= limit:
                data = f.read()
                return data.decode("utf-8", "replace")
            head = f.read(limit // 2)
            f.seek(size - limit // 2)
            tail = f.read()
    except OSError:
        return ""
    cut = f"\n[... {size - len(head) - len(tail)} bytes cut ...]\n"
    return head.decode("utf-8", "replace") + cut + tail.decode("utf-8", "replace")
