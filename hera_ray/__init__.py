"""hera-ray: per-subtask edge-cloud routing for AI agents (HERA, arXiv 2504.00434) on Ray."""

__version__ = "0.1.0"
