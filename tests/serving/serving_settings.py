"""Constants and helpers shared by the serving-plane tests."""

from __future__ import annotations

import socket
import json
from pathlib import Path

API_KEY = "test-key-0123456789"
CLOUD_PRICE = 0.002

# The package cluster's keys file (test_api_keys_serving.py); API_KEY above still works beside them.
LIMITED_KEY = "test-limited-0123456789"  # 2 requests per minute, burst 2
BUDGET_KEY = "test-budget-0123456789"  # a cloud budget one all-llm step spends
TINY_BUDGET = 0.000001
OPEN_KEY = "test-open-0123456789"  # no limits


#: hera-verify on the test cluster: steps at least this confident (geometric-mean token
#: probability) are kept outright; the step classifier below rates the rest.
VERIFY_CONFIDENCE_KEEP = 0.85


def write_verifier_file(folder: Path) -> Path:
    """A step classifier in the format `hera train` writes (P(good) rises with the step's mean token
    log-probability, 0.5 at -0.5), hand-set: the test cluster's models are not the profiled pair."""
    from hera_ray.policy.verify import StepClassifier

    path = folder / "verifier.json"
    path.write_text(json.dumps(StepClassifier(("mean_logprob",), (-0.5,), (1.0,), (4.0,), 0.0, {}).to_dict()))
    return path


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
