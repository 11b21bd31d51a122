"""The `hera` command as a user types it, against real servers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


def hera(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hera_ray", *args], capture_output=True, text=True, timeout=timeout)


def test_nodes_and_edge_generate_as_json(procs):
    registry = procs.registry()
    edge = procs.edge("edge-cli", registry, extra_args=["--input-price-per-mtok", "0.02", "--cached-input-price-per-mtok",
                                                        "0.01", "--output-price-per-mtok", "0.05"])

    out = hera("nodes", "--registry", registry.address, "--token-file", str(procs.token_file), "--json")
    assert out.returncode == 0, out.stderr
    (node,) = json.loads(out.stdout)
    assert node["node_id"] == "edge-cli" and node["state"] == "up" and node["address"] == edge.address
    assert (node["input_per_mtok"], node["cached_input_per_mtok"], node["output_per_mtok"]) == (0.02, 0.01, 0.05)
    assert node["price_per_1k_tokens"] == 0.0  # the deprecated flat price is sent as 0 beside the sheet
    assert set(node["load"]) >= {"in_flight", "queued", "tokens_per_s"}

    out = hera("edge", "generate", edge.address, "Say hello.", "--max-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["text"] and reply["completion_tokens"] <= 8 and reply["node_id"] == "edge-cli"
    assert reply["ttft_s"] > 0 and reply["latency_s"] >= reply["ttft_s"]

    out = hera("nodes", "--registry", registry.address, "--token-file", str(procs.token_file))
    assert out.returncode == 0 and "edge-cli" in out.stdout


def test_edge_generate_reports_bad_input_and_exits_nonzero(procs):
    edge = procs.edge("edge-cli-bad")
    out = hera("edge", "generate", edge.address, "hi", "--max-tokens", "0")
    assert out.returncode == 1
    assert "INVALID_ARGUMENT" in out.stderr and "max_tokens must be > 0" in out.stderr


def test_nodes_without_a_token_is_refused_clearly(procs):
    registry = procs.registry()
    out = hera("nodes", "--registry", registry.address)
    assert out.returncode == 1
    assert "UNAUTHENTICATED" in out.stderr and "missing token" in out.stderr


def test_serving_an_unknown_model_names_the_choices():
    out = hera("edge", "serve", "--model", "llama-9000", "--port", "0")
    assert out.returncode == 1
    assert "llama-9000" in out.stderr and "smollm2-135m" in out.stderr


def test_invalid_settings_are_refused_before_start():
    out = hera("edge", "serve", "--slots", "0")
    assert out.returncode == 2
    assert "--slots" in out.stderr and "greater than or equal to 1" in out.stderr
    out = hera("edge", "serve", "--price-per-1k-tokens", "0.5", "--output-price-per-mtok", "1")
    stderr = " ".join(out.stderr.split())  # rich wraps long lines
    assert out.returncode == 2
    assert "price_per_1k_tokens (0.5" in stderr and "output_price_per_mtok" in stderr
    out = hera("edge", "serve", "--input-price-per-mtok", "0.1", "--cached-input-price-per-mtok", "0.2")
    stderr = " ".join(out.stderr.split())
    assert out.returncode == 2 and "cached_input_price_per_mtok (0.2) may not exceed input_price_per_mtok (0.1)" in stderr


def test_registry_needs_a_token_file():
    out = hera("registry", "serve", "--port", "0")
    assert out.returncode == 2 or out.returncode == 1
    assert "--token-file" in out.stderr


def test_settings_come_from_env_and_config_file(tmp_path, monkeypatch):
    from hera_ray.config import EdgeNodeConfig, load_settings

    cfg = tmp_path / "edge.yaml"
    cfg.write_text("slots: 3\nport: 50099\noutput_price_per_mtok: 0.5\n")
    monkeypatch.setenv("HERA_EDGE_PORT", "50100")
    c = load_settings(EdgeNodeConfig, cfg, slots=2)
    assert (c.slots, c.port, c.prices.output_per_mtok) == (2, 50100, 0.5)  # flag > env > file


def test_help_lists_the_commands():
    out = hera("--help")
    assert out.returncode == 0
    for word in ("edge", "registry", "nodes", "demo", "models"):
        assert word in out.stdout
    out = hera("edge", "serve", "--help")
    assert "--registry" in out.stdout and "--slots" in out.stdout and "RESOURCE_EXHAUSTED" in out.stdout
    for flag in ("--input-price-per-mtok", "--cached-input-price-per-mtok", "--output-price-per-mtok", "--price-per-1k-tokens"):
        assert flag in out.stdout


def test_profile_and_train_refuse_bad_input_clearly(tmp_path):
    out = hera("train", "--profile", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e"))
    assert out.returncode == 1 and "no profile at" in out.stderr and "hera profile" in out.stderr
    out = hera("train", "--profile", str(tmp_path), "--only", "urc,xyz")
    assert out.returncode != 0 and "xyz" in out.stderr
    out = hera("profile", "--max-depth", "0", "--out", str(tmp_path / "p"))
    assert out.returncode == 2 and "--max-depth" in out.stderr
    out = hera("profile", "--dataset", "nope", "--out", str(tmp_path / "p"))
    assert out.returncode == 1 and "unknown data set 'nope'" in out.stderr
    out = hera("profile", "--verify-steps", "-1", "--out", str(tmp_path / "p"))
    assert out.returncode == 2 and "--verify-steps" in out.stderr


def test_hera_up_reads_the_default_config_file_calibrate_writes(tmp_path, monkeypatch):
    # An out-of-range value there is refused before anything starts: proof that `hera up` read it.
    config = tmp_path / "config.yaml"
    config.write_text("hera:\n  threshold_base: 5\n")
    monkeypatch.setenv("HERA_CONFIG_FILE", str(config))
    out = hera("up")
    err = " ".join(out.stderr.split())
    assert out.returncode == 2 and f"settings from {config}" in err and "hera.threshold_base" in err
