"""The ingress's run admission without a cluster: the real HeraIngress run path, the real Agent and
Router, and the scheduler actor's real key-spend methods, in one event loop. What it pins down:
a run holds its slot until it ends however it ends (done, failed, cancelled: a stream's client
gone), a full ingress refuses at once, and a key's cloud spend is charged even for a failed run.

The serving tests check the same wiring over HTTP; filling 64 slots there would slow the suite."""

from __future__ import annotations

import asyncio
import tempfile
from collections import OrderedDict
from types import SimpleNamespace

import pytest

from hera_ray.agent import Agent
from hera_ray.config import AgentConfig, HeraConfig
from hera_ray.errors import BudgetExceeded, HeraError, RateLimited
from hera_ray.generation import GenerationResult
from hera_ray.policy import build_policies
from hera_ray.pricing import FREE, PriceSheet
from hera_ray.scheduler.actor import SubtaskScheduler
from hera_ray.scheduler.nodes import NodeSpec, NodeTable
from hera_ray.scheduler.router import Router
from hera_ray.serve.admission import AdmissionGate
from hera_ray.serve.keys import ApiKey
from hera_ray.serve.openai_api import HeraIngress
from hera_ray.store import Store

from agent_helpers import RouterScheduler

STEP = "Add them: 2 + 3 = 5.\n"
CLOUD_PRICE = 2.0  # per 1k tokens: a 15-token step costs 0.03
#: The class under the deployment (Serve wraps it in an ASGI replica class whose async __del__ needs Serve).
INGRESS_CLASS = next(k for k in HeraIngress.func_or_class.__mro__ if "_start_run" in vars(k))


class InProcessActor:
    """``actor.method.remote(...)`` over a plain object, scheduled on this event loop (as Ray
    submits an actor call at once, before it is awaited)."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        method = getattr(self.obj, name)
        return SimpleNamespace(remote=lambda *a: asyncio.ensure_future(method(*a)))


class HeldExecutor:
    """Each step waits for ``go`` (so runs stay in flight while the test looks), then writes STEP;
    step ``fail_at`` (0-based, counting all steps) raises instead."""

    def __init__(self, fail_at: int | None = None):
        self.go = asyncio.Event()
        self.steps, self.fail_at = 0, fail_at

    async def _step(self) -> GenerationResult:
        await self.go.wait()
        self.steps += 1
        if self.fail_at is not None and self.steps - 1 == self.fail_at:
            raise HeraError("the model broke")
        return GenerationResult(STEP, 10, 5, 0.01, 0.02, 0.0, "stop", stop_reason="\n")  # a line, as engines end it

    async def edge(self, address, params):
        return await self._step()

    async def cloud(self, params):
        return await self._step()


def ingress(limit: int, executor: HeldExecutor, max_steps: int = 2):
    """A HeraIngress without Serve: the run path's real parts, wired as ``__init__`` wires them."""
    table = NodeTable()
    table.register(NodeSpec("e0", "127.0.0.1:1", "slm", 2048, 4, 0, FREE), "t")
    router = Router(table, build_policies(), "slm", "llm", PriceSheet.flat(CLOUD_PRICE))
    spend = object.__new__(SubtaskScheduler)  # only its key-spend and run-record methods are used
    spend._key_spend, spend._charged, spend._ack_timeout_s = {}, OrderedDict(), 2.0
    spend.store = Store(f"sqlite:///{tempfile.mkdtemp(prefix='hera-admission-')}/store.sqlite")  # a real one
    ing = object.__new__(INGRESS_CLASS)
    ing.config = HeraConfig()
    ing.admission = AdmissionGate(limit)
    ing.actor = InProcessActor(spend)
    ing.agent = Agent(RouterScheduler(router), executor, AgentConfig(max_steps=max_steps))
    return ing, spend


async def settle():
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_full_ingress_refuses_at_once_and_frees_the_slot_when_the_run_ends():
    async def main():
        executor = HeldExecutor()
        ing, _ = ingress(1, executor)
        first = await ing._start_run(None, "2+3?", "all-llm", None, 1, None)
        await settle()
        assert ing.admission.in_flight == 1 and not first.done()
        with pytest.raises(RateLimited) as info:
            await ing._start_run(None, "2+3?", "all-llm", None, 1, None)
        assert info.value.retry_after_s > 0
        executor.go.set()
        run = await first
        assert run.trace and ing.admission.in_flight == 0
        second = await ing._start_run(None, "2+3?", "all-llm", None, 1, None)  # the slot is free again
        await second
        assert ing.admission.in_flight == 0

    asyncio.run(main())


def test_retry_after_tells_a_refused_client_when_a_slot_should_free():
    gate = AdmissionGate(4)
    assert gate.retry_after_s == 1.0  # no run has finished yet: the first backoff
    for _ in range(4):
        gate.enter()
    for _ in range(4):
        gate.leave(run_s=60.0)  # runs take a minute; with 4 slots one frees about every 15 s
    for _ in range(4):
        gate.enter()
    with pytest.raises(RateLimited) as info:
        gate.enter()
    assert info.value.retry_after_s == pytest.approx(15.0)
    gate.leave(run_s=600.0)
    assert gate.retry_after_s == 30.0  # never more than the cap
    quick = AdmissionGate(8)
    quick.enter()
    quick.leave(run_s=0.5)
    assert quick.retry_after_s == 1.0  # never less than a second


def test_a_cancelled_run_gives_its_slot_back():
    # What a streaming client that hangs up looks like: the stream cancels the run's task.
    async def main():
        ing, _ = ingress(1, HeldExecutor())
        task = await ing._start_run(None, "2+3?", "all-llm", None, 1, None, on_step=lambda entry: None)
        await settle()
        assert ing.admission.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ing.admission.in_flight == 0

    asyncio.run(main())


def test_a_failed_run_frees_its_slot_and_is_charged_for_the_cloud_it_used():
    async def main():
        executor = HeldExecutor(fail_at=1)
        executor.go.set()
        ing, spend = ingress(1, executor)
        key = ApiKey(name="team", key="k", cloud_budget=10.0)
        task = await ing._start_run(key, "2+3?", "all-llm", None, 2, None)
        with pytest.raises(HeraError, match="the model broke"):
            await task
        await settle()
        assert ing.admission.in_flight == 0
        assert await spend.key_spend("team") == pytest.approx(15 * CLOUD_PRICE / 1000)  # step 1 ran; step 2 did not
        spend.store.flush(10)
        assert spend.store.key_spend() == pytest.approx({"team": 15 * CLOUD_PRICE / 1000})  # and it is stored
        (stored,) = spend.store.list_runs()
        assert stored["status"] == "error" and stored["steps"] == 1  # the failed run is kept, with what it did

    asyncio.run(main())


def test_a_key_is_capped_at_its_budget_then_refused_without_taking_a_slot():
    async def main():
        executor = HeldExecutor()
        executor.go.set()
        ing, spend = ingress(1, executor)
        key = ApiKey(name="team", key="k", cloud_budget=0.01)
        run = await (await ing._start_run(key, "2+3?", "all-llm", None, 2, None))
        # The first step is on the cloud (0.03, past the 0.01 left); the rest fall back to the edge.
        assert [t.placement for t in run.trace] == ["cloud", "edge"] and run.trace[1].fallback == "budget"
        assert await spend.key_spend("team") == pytest.approx(0.03)
        with pytest.raises(BudgetExceeded, match="'team' has spent 0.030000 of its cloud budget of 0.01"):
            await ing._start_run(key, "2+3?", "all-llm", None, 2, None)
        assert ing.admission.in_flight == 0
        other = ApiKey(name="other", key="k2")  # no budget: runs uncapped, and its spend is still recorded
        run = await (await ing._start_run(other, "2+3?", "all-llm", None, 1, None))
        assert [t.placement for t in run.trace] == ["cloud"]
        assert await spend.key_spend("other") == pytest.approx(0.03)

    asyncio.run(main())
