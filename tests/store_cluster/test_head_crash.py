"""A crash of the head: every process of its Ray cluster and its edge is killed at once (SIGKILL, no
`hera down`, nothing flushed), right after the ingress answered. What it answered 200 for (the key's
spend, the run with its trace, the ledger) is in the store when `hera up` starts a new head on it,
and the key is refused past its budget.

The cluster is driven as a user drives it, with the `hera` CLI in subprocesses, so this test process
is never a Ray driver of the head it kills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from local_ray import free_port

from .conftest import SPENDER_BUDGET, SPENDER_KEY, cluster_config
from .test_store_cluster import LEDGER_TOTALS, _get, _run, _spend_until_refused, _spent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

HERA = [sys.executable, "-m", "hera_ray.cli"]


def _hera(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*HERA, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _state(cache: Path) -> dict:
    return json.loads((cache / "cluster" / "state.json").read_text())


def _ledger(env: dict[str, str], address: str) -> dict:
    """The scheduler actor's ledger totals, read by a driver of its own."""
    code = ("import json, ray; from hera_ray.scheduler.actor import SCHEDULER_NAME; "
            f"ray.init(address={address!r}, namespace='hera', log_to_driver=False); "
            "print(json.dumps(ray.get(ray.get_actor(SCHEDULER_NAME).usage.remote(), timeout=60)['total']))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _crash(cache: Path) -> int:
    """SIGKILL every process of the head `hera up` started (Ray's and the local edge's); how many."""
    from hera_ray.cluster import local_ray_processes

    state = _state(cache)
    procs = local_ray_processes(state["ray_address"])
    for pid in state["edge_pids"]:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"
    return len(procs)


def test_what_was_answered_survives_a_crash_of_the_head(keys_file, tmp_path):
    cache = tmp_path / "cache"
    config = cluster_config(keys_file, f"sqlite:///{tmp_path / 'store.sqlite'}", free_port(), free_port())
    config_file = tmp_path / "hera.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # `hera up` starts its own head
    env |= {"HERA_CACHE_DIR": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}

    up = _hera(env, "up", "--config", str(config_file), "--local-edges", "1", "--timeout", "300")
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        state = _state(cache)
        assert state["started_ray"], "hera up joined a Ray cluster instead of starting its own head"
        url = state["ingress_url"]
        r = _run(url, SPENDER_KEY, "before-crash")
        assert r.status_code == 200, r.text
        first = r.json()
        cloud = sum(t["cost"] for t in first["trace"] if t["placement"] == "cloud")
        assert cloud > 0 and _spent(url) == pytest.approx(cloud)
        ledger = _ledger(env, state["ray_address"])
        assert ledger["cloud_cost"] == pytest.approx(cloud)

        killed = _crash(cache)  # at once after the answer: no `hera down`, nothing flushed
        assert killed >= 5, f"only {killed} processes of the head were found to kill"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=5)

        up = _hera(env, "up", "--config", str(config_file), "--local-edges", "1", "--timeout", "300")
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        state = _state(cache)
        url = state["ingress_url"]
        assert _spent(url) == pytest.approx(cloud)
        after = _ledger(env, state["ray_address"])
        for k in LEDGER_TOTALS:
            assert after[k] == pytest.approx(ledger[k]), k
        run = _get(url, "/v1/agent/runs/before-crash", SPENDER_KEY).json()
        assert run["status"] == "ok" and run["cloud_cost"] == pytest.approx(cloud)
        assert [(t["placement"], t["stage"], t["cost"]) for t in run["run"]["trace"]] == \
               [(t["placement"], t["stage"], t["cost"]) for t in first["trace"]]

        refused = _spend_until_refused(url, "after-crash")
        assert refused.status_code == 402 and "'spender'" in refused.json()["error"]["message"]
        assert _spent(url) >= SPENDER_BUDGET
    finally:
        down = _hera(env, "down", timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
