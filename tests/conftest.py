"""Shared fixtures: real registries and edge nodes as local processes on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

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
