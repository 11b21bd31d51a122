"""Constants and helpers shared by the serving-plane tests."""

from __future__ import annotations

import socket

API_KEY = "test-key-0123456789"
CLOUD_PRICE = 0.002


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
