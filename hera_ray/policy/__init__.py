"""Placement policies: pure code deciding, per subtask, edge SLM or cloud LLM. No Ray, no gRPC."""

from hera_ray.policy.base import Decision, Placement, Policy, SubtaskContext
from hera_ray.policy.baselines import AllLLM, AllSLM, RandomPolicy, build_policies

__all__ = ["Decision", "Placement", "Policy", "SubtaskContext", "AllLLM", "AllSLM", "RandomPolicy", "build_policies"]
