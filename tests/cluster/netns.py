"""Talking to the netns cluster (scripts/netns-cluster.sh) from the root namespace, as a user on
another host would: its addresses, the script, the ingress, the registry, an edge node's load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from local_ray import ingress_health, wait_nodes_up

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "netns-cluster.sh"
BIN = Path(os.environ.get("HERA_NETNS_BIN", ROOT / ".venv" / "bin"))
WORKDIR = Path(os.environ.get("HERA_NETNS_DIR", "/tmp/hera-netns"))

HEAD, CLOUD = "198.18.77.1", "198.18.77.2"
EDGES = {"edge1": "198.18.77.11", "edge2": "198.18.77.12"}
INGRESS = f"http://{HEAD}:8000"
REGISTRY = f"{HEAD}:50051"
QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user on another host: none of the test suite's single-machine Ray
    settings (tests/conftest.py makes Ray use 127.0.0.1), Ray's token auth on, usage stats off."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "HERA_URL") and not k.startswith("HERA_")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{env.get('PATH', '')}",
                "NO_PROXY": "*", "HERA_NETNS_DIR": str(WORKDIR), **extra})
    return env


def script(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=user_env(), timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"netns-cluster.sh {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def unsupported() -> str | None:
    if os.geteuid() != 0:
        return "the netns cluster needs root (network namespaces, veths, a bridge)"
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "the netns cluster needs iproute2 with `ip netns`"
    probe = f"hera-probe-{os.getpid()}"  # root in a container may still lack CAP_NET_ADMIN / CAP_SYS_ADMIN
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if not (BIN / "ray").exists() or not (BIN / "hera").exists():
        return f"no ray/hera in {BIN}: run `make install`"
    return None


@dataclass
class NetnsCluster:
    up_s: float

    def health(self) -> dict:
        return ingress_health(INGRESS)

    def run(self, policy: str, request_id: str | None = None, question: str = QUESTION, **body) -> httpx.Response:
        payload = {"question": question, "policy": policy, **body}
        if request_id:
            payload["request_id"] = request_id
        return httpx.post(f"{INGRESS}/v1/agent/runs", json=payload, timeout=300)

    def nodes(self) -> dict[str, dict]:
        """`hera nodes --json` from this (root) namespace, against the registry on the head."""
        out = subprocess.run([str(BIN / "hera"), "nodes", "--registry", REGISTRY, "--token-file",
                              str(WORKDIR / "registry-token"), "--json"], capture_output=True, text=True,
                             env=user_env(), timeout=60)
        assert out.returncode == 0, out.stderr
        return {n["node_id"]: n for n in json.loads(out.stdout)}

    def wait_nodes_up(self, n: int, timeout_s: float) -> float | None:
        """Seconds until the scheduler sees exactly ``n`` edge nodes up, or None."""
        return wait_nodes_up(INGRESS, n, timeout_s)

    def in_flight(self, host: str) -> int:
        """Subtasks the edge node on ``host`` is generating now (its EdgeWorker.Info, dialled directly)."""
        from hera_ray.wire import edge_pb2, edge_pb2_grpc

        with grpc.insecure_channel(f"{EDGES[host]}:50061") as channel:
            info = edge_pb2_grpc.EdgeWorkerStub(channel).Info(edge_pb2.InfoRequest(), timeout=2)
        return info.load.in_flight

    def link(self, host: str, state: str) -> None:
        script(f"link-{state}", host, timeout=30)
