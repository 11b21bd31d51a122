"""An edge box installs `hera-ray[edge]` alone: no Ray, no torch, and it serves the SLM."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("edge-venv")
    venv.create(env_dir, with_pip=True)
    env = {**os.environ,
           "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # A copy of the source, so the build does not write into the checkout under test.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    subprocess.run(["cp", "--parents", *[f.decode() for f in files if f and (ROOT / f.decode()).exists()], str(src)],
                   cwd=ROOT, check=True)
    out = subprocess.run([str(env_dir / "bin" / "pip"), "install", "-q", f"{src}[edge]"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return env_dir


def test_edge_extra_has_no_ray_or_torch(edge_venv):
    py = str(edge_venv / "bin" / "python")
    for heavy in ("ray", "torch", "transformers"):
        found = subprocess.run([py, "-c", f"import importlib.util,sys; sys.exit(importlib.util.find_spec('{heavy}') is not None)"])
        assert found.returncode == 0, f"{heavy} is installed in the edge venv"


def test_edge_node_from_the_edge_venv_registers_and_serves(edge_venv, procs):
    registry = procs.registry()
    hera = str(edge_venv / "bin" / "hera")
    log = procs.workdir / "edge-venv-node.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([hera, "edge", "serve", "--port", "0", "--node-id", "edge-box", "--threads", "1",
                                 "--registry", registry.address, "--token-file", str(procs.token_file)],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        import time

        deadline = time.monotonic() + 120
        while b"serving qwen2.5-coder-0.5b on" not in log.read_bytes():  # the default edge SLM, from its 6 packages
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        address = log.read_text().split(" on ")[1].split()[0]
        out = subprocess.run([hera, "edge", "generate", address, "Say hi.", "--max-tokens", "6", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert '"node_id": "edge-box"' in out.stdout
        out = subprocess.run([hera, "nodes", "--registry", registry.address, "--token-file", str(procs.token_file), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert '"edge-box"' in out.stdout
    finally:
        proc.terminate()
        proc.wait(60)
    # The edge venv's own `python -m edge_node` entry point works too.
    out = subprocess.run([str(edge_venv / "bin" / "python"), "-m", "edge_node", "serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--registry" in out.stdout
