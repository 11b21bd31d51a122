"""A multi-host hera-ray cluster on this machine: ``scripts/netns-cluster.sh up`` builds four network
namespaces on a bridge (Ray head, Ray cloud worker, two edge boxes that are not Ray nodes) and starts
everything on them; the tests talk to it from the root namespace, across the bridge, as a user on
another host would. Needs root and ``ip netns``; it owns the namespaces ``hera-*`` while it runs (a
cluster the script started before is taken down first)."""

from __future__ import annotations

import time

import pytest

from netns import EDGES, NetnsCluster, script, unsupported


@pytest.fixture(scope="package")
def netns_cluster():
    reason = unsupported()
    if reason:
        pytest.skip(reason)
    script("down", check=False, timeout=120)  # whatever an earlier run left
    t0 = time.monotonic()
    try:
        script("up", timeout=600)
        yield NetnsCluster(up_s=time.monotonic() - t0)
    finally:
        script("down", check=False, timeout=180)


@pytest.fixture
def cluster(netns_cluster):
    """The cluster with both edge links up and both edges registered."""
    for host in EDGES:
        netns_cluster.link(host, "up")
    assert netns_cluster.wait_nodes_up(len(EDGES), 60) is not None, netns_cluster.health()
    return netns_cluster
