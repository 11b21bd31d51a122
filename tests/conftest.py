"""Shared fixtures: real registries and edge nodes as local processes on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

# Ray reads these when it is first imported, and some test modules import it at collection:
# token auth (Ray turns it on after its first start) and a loopback-only local cluster.
from hera_ray.cluster import LOCAL_RAY_ENV, RAY_ENV  # noqa: E402

for _key, _value in {**RAY_ENV, **LOCAL_RAY_ENV}.items():
    os.environ.setdefault(_key, _value)

import pytest

from edge_helpers import Procs


@pytest.fixture
def procs(tmp_path: Path):
    p = Procs(tmp_path)
    yield p
    p.stop_all()


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory):
    p = Procs(tmp_path_factory.mktemp("procs"))
    yield p
    p.stop_all()


def pytest_unconfigure(config):
    # Ray's handle-metrics thread can still log after pytest has closed its streams at exit;
    # drop those records instead of printing "--- Logging error ---" tracebacks after the summary.
    import logging

    logging.raiseExceptions = False
