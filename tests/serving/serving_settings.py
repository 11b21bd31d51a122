"""Constants and helpers shared by the serving-plane tests."""

from __future__ import annotations

import socket
from pathlib import Path

API_KEY = "test-key-0123456789"
CLOUD_PRICE = 0.002

# The package cluster's keys file (test_api_keys_serving.py); API_KEY above still works beside them.
LIMITED_KEY = "test-limited-0123456789"  # 2 requests per minute, burst 2
BUDGET_KEY = "test-budget-0123456789"  # a cloud budget one all-llm step spends
TINY_BUDGET = 0.000001
OPEN_KEY = "test-open-0123456789"  # no limits


def write_keys_file(folder: Path) -> Path:
    path = folder / "keys.yaml"
    path.write_text(
        f"- {{name: limited, key: {LIMITED_KEY}, requests_per_minute: 2, burst: 2}}\n"
        f"- {{name: tiny-budget, key: {BUDGET_KEY}, cloud_budget: {TINY_BUDGET:f}}}\n"
        f"- {{name: open, key: {OPEN_KEY}}}\n"
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
