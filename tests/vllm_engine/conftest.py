"""The vLLM tests' fixtures: one real vLLM engine (CPU) on the bundled SmolLM2-135M, converted once
to a Hugging Face folder. These tests run only in the opt-in environment built by ``make test-vllm``
(marker ``vllm``); without vLLM installed they are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Small CPU settings; set before vLLM is imported (it reads them at import and engine start).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

N_CTX = 1024


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs vLLM (opt-in: make test-vllm)")


def model_dir() -> Path:
    """``$HERA_VLLM_TEST_MODEL`` or the default output of scripts/gguf_to_hf.py."""
    env = os.environ.get("HERA_VLLM_TEST_MODEL")
    if env:
        return Path(env).expanduser()
    from hera_ray.models import cache_dir

    return cache_dir() / "hf" / "smollm2-135m"


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    out = model_dir()
    if not (out / "config.json").exists():  # convert once, offline (make test-vllm does it first)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "gguf_to_hf.py"), "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def backend(smollm2_hf_dir):
    pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (opt-in: make test-vllm)")
    from cloud_node.backends import make_backend
    from hera_ray.config import CloudLLMConfig

    config = CloudLLMConfig(
        backend="vllm", model=str(smollm2_hf_dir), model_id="smollm2-135m", n_ctx=N_CTX, request_timeout_s=300,
        # Eager mode: no torch.compile / graph capture, which only slows a CPU start-up here.
        vllm_engine_args={"enforce_eager": True, "dtype": "bfloat16"},
    )
    t0 = time.perf_counter()
    b = make_backend(config)
    print(f"\nvLLM engine started in {time.perf_counter() - t0:.1f} s")
    yield b
    b.close()
