"""The agent: a request answered as a chain of steps (``loop``), in one step format (``steps``)."""

from hera_ray.agent.loop import Agent, AgentRun, Executor, Scheduler, TraceEntry
from hera_ray.agent.steps import (STEP_BOUNDARY, STEP_SYSTEM_PROMPT, Step, StepFormat, chain_text, make_step,
                                  one_turn_messages, read_answer, step_messages)

__all__ = ["Agent", "AgentRun", "Executor", "Scheduler", "TraceEntry", "STEP_BOUNDARY", "STEP_SYSTEM_PROMPT", "Step",
           "StepFormat", "chain_text", "make_step", "one_turn_messages", "read_answer", "step_messages"]
