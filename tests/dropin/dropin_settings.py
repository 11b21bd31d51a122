"""Constants of the drop-in tests."""

API_KEY = "dropin-key-0123456789"
SLM, LLM = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"
