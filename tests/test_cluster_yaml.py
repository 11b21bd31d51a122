"""cluster.yaml is a Ray cluster-launcher file that Ray's own launcher accepts, and what it starts is
what the README and the netns run say: token auth, no usage stats, hera-ray installed the Makefile's
way, the cloud LLM on the workers, `hera up` with settings HeraConfig knows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from hera_ray.config import HeraConfig, load_settings

ROOT = Path(__file__).resolve().parent.parent


def launcher_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = launcher_config()
    assert raw["provider"]["type"] == "local" and raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    config = prepare_config(raw)  # what `ray up` does before it validates: the local provider's node type, defaults
    validate_config(config)  # Ray's JSON schema (ray/autoscaler/ray-schema.json) and its own checks
    node_type = config["available_node_types"][config["head_node_type"]]
    assert node_type["max_workers"] == len(raw["provider"]["worker_ips"])


def test_every_ray_process_has_token_auth_and_no_usage_stats():
    raw = launcher_config()
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command and "RAY_USAGE_STATS_ENABLED=0" in command, command
        assert "--disable-usage-stats" in command and "GRPC_ENABLE_FORK_SUPPORT=false" in command
    head, worker = starts
    assert "ray start --head" in head and "--ray-client-server-port=10001" in head and "--dashboard-host=0.0.0.0" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker and """--resources='{"cloud": 4}'""" in worker
    assert raw["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # every node and client: one token


def test_setup_installs_hera_ray_the_makefiles_way():
    setup = " ; ".join(launcher_config()["setup_commands"])
    assert setup.index('"torch==2.13.0"') < setup.index('"hera-ray[cloud]"')  # torch pinned first
    makefile_cmake = re.search(r"export CMAKE_ARGS := (.+)", (ROOT / "Makefile").read_text()).group(1).strip()
    assert f'CMAKE_ARGS="{makefile_cmake}"' in setup


def test_hera_up_on_the_head_has_valid_settings_and_puts_the_cloud_on_the_workers(monkeypatch):
    (up,) = [c for c in launcher_config()["head_start_ray_commands"] if "hera up" in c]
    assert "RAY_ADDRESS=auto" in up and "RAY_AUTH_MODE=token" in up
    env = dict(word.split("=", 1) for word in shlex.split(up.split(";")[0]) if word.startswith("HERA_"))
    assert env, up
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = load_settings(HeraConfig)
    assert config.ingress.host == "0.0.0.0" and config.scheduler.registry_host == "0.0.0.0"
    assert config.cloud.resources == {"cloud": 1.0}
