"""``hera profile``: run each request with both the SLM and the LLM at each step, and record the tree.

The tree of SLM/LLM choices and how it is pruned
------------------------------------------------
A full binary tree of SLM/LLM choices has 2^depth paths; on a CPU the LLM writes ~7 tokens/s,
so the profiler keeps the part of the tree the estimators learn from and prunes the rest:

* **The LLM spine.** The request is run with the LLM choosing every step (the All-LLM path).
  At each spine node of depth < ``max_depth`` the SLM also writes its step from the *same*
  context: the node's two candidate subtasks, their outputs and their SBERT similarity.
* **SLM rollouts (the SLM child of every node).** From every spine node the SLM continues alone
  for ``max_distance + 1`` steps: the S-L distance d = the fewest further SLM steps
  (0..``max_distance``) until an SLM subtask is at least ``match_threshold`` similar to the LLM's
  subtask at the node (``None`` = ∞), and whether the SLM's path ended correct when it finished
  within those steps. The rollout from the root runs to the end: the All-SLM path.
* **The SLM's steps, checked by the LLM (``slm_checks``).** Along the All-SLM path, for its first
  ``verify_steps`` steps, the LLM (1) scores the SLM's step in one prefill over the same context
  (its tokens' log-probabilities under the LLM, and the LLM's own top choice's at each position)
  and (2) writes its own step from that context, which SBERT compares with the SLM's. This is what
  the step-verifying policy (``hera-verify``) learns from: the SLM's own token log-probabilities
  (recorded on every SLM step), the LLM's judgement of the step, and whether the LLM would have
  written the same thing. The checks run after the spine, one context at a time, so the cloud
  model's prefix cache is reused from one check to the next.
* **Switch branches** (off by default: ``max_branches`` 0). At the first ``max_branches`` spine
  nodes where the two subtasks differ, the SLM's step is taken and the LLM continues to the end.
  They are the dearest part of the tree (a whole LLM path each) and no estimator trains on them;
  the one-step checks above ask "would the LLM agree here?" for a fraction of the price.
* **SD's teacher.** At the first ``max_decompositions`` nodes where the two subtasks differ, the
  LLM also splits its own subtask into smaller steps (``llm_decomposition``).
* Every path continues with one model (greedy, temperature 0) and ends where the agent's would:
  the model ends its message, ``max_steps``, or ``max_chain_tokens`` written. Per request the LLM
  writes the spine, ``verify_steps`` one-step checks, ``max_decompositions`` splits and
  ``max_branches`` whole paths.

Output: ``<out>/profile.jsonl``, one JSON line per finished request (its nodes inside), appended
as each request finishes; ``<out>/profile_config.json`` holds the settings. A re-run with the
same ``--out`` skips the requests already there (resume); a run with different settings is
refused rather than mixed in.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, Protocol, Sequence

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from hera_ray.agent.steps import (StepFormat, chain_answer, chain_text, checked_text, continues, make_step, read_answer,
                                  step_messages)
from hera_ray.agent.steps import Step as ChainStep
from hera_ray.errors import ConfigError, InvalidRequest
from hera_ray.generation import GenerationParams, GenerationResult

Side = Literal["slm", "llm"]
PROFILE_FILE = "profile.jsonl"
CONFIG_FILE = "profile_config.json"


class ProfileConfig(BaseSettings):
    """How the tree of SLM/LLM choices is grown and pruned."""

    model_config = SettingsConfigDict(env_prefix="HERA_PROFILE_", extra="forbid")

    dataset: str = Field("gsm8k", description="Data set to profile.")
    split: str = Field("profile", description="Split of the data set (profile / dev / test).")
    max_steps: int = Field(48, ge=1, le=100, description="Steps per path at most (as the agent's step limit; a step is one line of the chain of thought).")
    max_chain_tokens: int = Field(1024, ge=8, le=16384, description="Tokens a path may write in all (as agent.max_chain_tokens).")
    max_depth: int = Field(6, ge=1, le=30, description="Spine nodes (from the root) at which both models write the step.")
    max_branches: int = Field(0, ge=0, le=30, description="Switch branches (SLM step, then LLM to the end) per request.")
    verify_steps: int = Field(12, ge=0, le=100, description="Steps of the All-SLM path the LLM scores and writes itself (slm_checks).")
    max_decompositions: int = Field(2, ge=0, le=30, description="Divergent nodes per request whose LLM subtask the LLM also splits (SD's teacher).")
    max_distance: int = Field(3, ge=0, le=10, description="Largest S-L distance looked for; beyond it d is ∞.")
    match_threshold: float = Field(0.7, ge=0, le=1, description="SBERT similarity at which two subtasks count as the same.")
    max_tokens: int = Field(256, ge=8, le=4096, description="Tokens a model may write per step (as agent.max_tokens_per_step).")

    def fingerprint(self) -> str:
        """Settings that change what is recorded (not how many requests)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


@dataclass
class Step:
    """One step written by one model (the agent's step format: hera_ray/agent/steps.py)."""

    subtask: str  # the step's text
    output: str  # the same text (kept apart for the estimators' data sets)
    final_answer: str | None  # the answer line the step holds, if any
    by: Side
    tokens: int = 0
    seconds: float = 0.0
    boundary: str = ""  # what the chain adds after the text ("\n" if a backend dropped the line end; see agent.steps)
    end: bool = False  # the model ended its message with this step
    completion_tokens: int = 0
    #: The SLM's log-probability of each token it wrote (SLM steps; rounded to 4 places).
    logprobs: list[float] | None = None

    @property
    def is_final(self) -> bool:
        """The path ends here, as the agent's chain does: the model ended its message."""
        return self.end

    def as_chain_step(self) -> ChainStep:
        return ChainStep(self.output, self.boundary, self.end)


class StepModels(Protocol):
    """Generates one agent step on one side. The live-cluster adapter is :class:`ClusterStepModels`."""

    async def generate(self, side: Side, params: GenerationParams) -> GenerationResult: ...


Similarity = Callable[[Sequence[tuple[str, str]]], Awaitable[list[float]]]


def _after(question: str, history: Sequence[Step], **fields: Any) -> GenerationParams:
    """A request in the agent's step format (hera_ray/agent/steps.py) for what comes after
    ``history``; profiled clusters' backends continue a message."""
    chain = chain_text(s.as_chain_step() for s in history)
    return GenerationParams(messages=step_messages(question, chain),
                            continue_final_message=continues(StepFormat.CONTINUE, chain), **fields)


def path_answer(steps: Sequence[Step]) -> str:
    """The answer of a path, as the agent gives it: read from the whole chain, else its last line."""
    return chain_answer(chain_text(s.as_chain_step() for s in steps))[0]


@dataclass
class Counters:
    slm_calls: int = 0
    llm_calls: int = 0
    slm_tokens: int = 0
    llm_tokens: int = 0


class Profiler:
    """Grows the pruned tree for one request at a time (several requests may run at once)."""

    def __init__(self, models: StepModels, similarity: Similarity, scorer: Callable[[Any, str, str], bool],
                 config: ProfileConfig):
        """``scorer(item, answer, chain)``: is a path's answer right (``hera_ray.eval.scorers.score``)."""
        self.models, self.similarity, self.scorer, self.config = models, similarity, scorer, config
        self.counters = Counters()
        #: Why the LLM could not check SLM steps (its backend cannot score a candidate), if it could not.
        self.check_error = ""

    def remaining(self, history: Sequence[Step]) -> int:
        """Tokens the path may still write (``max_chain_tokens``)."""
        return self.config.max_chain_tokens - sum(s.completion_tokens for s in history)

    def finished(self, path: Sequence[Step]) -> bool:
        """The path ended where the agent's chain would."""
        return bool(path) and (path[-1].is_final or len(path) >= self.config.max_steps or self.remaining(path) <= 0)

    async def step(self, side: Side, question: str, history: Sequence[Step], request_id: str) -> Step:
        params = _after(question, history, max_tokens=max(1, min(self.config.max_tokens, self.remaining(history))),
                        temperature=0.0, stop_at_line_end=True, logprobs=side == "slm",
                        request_id=f"profile:{request_id}:{side}:{len(history)}")
        t0 = time.perf_counter()
        result = await self._generate(side, params)
        step = make_step(result.text, result.finish_reason, result.stop_reason)
        tokens = result.prompt_tokens + result.completion_tokens
        logprobs = [round(x, 4) for x in result.logprobs] if result.logprobs is not None else None
        return Step(step.text, step.text, read_answer(step.text)[0], side, tokens, time.perf_counter() - t0,
                    step.boundary, step.end, result.completion_tokens, logprobs)

    async def check(self, question: str, history: Sequence[Step], candidate: Step, request_id: str) -> dict[str, Any]:
        """The LLM's judgement of the SLM's ``candidate`` step after ``history``: its tokens'
        log-probabilities under the LLM, in one prefill (the step-verifying policy's LLM check)."""
        params = _after(question, history, max_tokens=0, candidate=checked_text(candidate.output + candidate.boundary),
                        request_id=f"profile:{request_id}:check:{len(history)}")
        t0 = time.perf_counter()
        result = await self._generate("llm", params)
        return {"llm_logprobs": [round(x, 4) for x in result.logprobs or []],
                "llm_top_logprobs": [round(x, 4) for x in result.top_logprobs or []],
                "check_prompt_tokens": result.prompt_tokens, "check_s": round(time.perf_counter() - t0, 4)}

    async def _generate(self, side: Side, params: GenerationParams) -> GenerationResult:
        """One model call, counted for the progress bar."""
        result = await self.models.generate(side, params)
        tokens = result.prompt_tokens + result.completion_tokens
        if side == "slm":
            self.counters.slm_calls += 1
            self.counters.slm_tokens += tokens
        else:
            self.counters.llm_calls += 1
            self.counters.llm_tokens += tokens
        return result

    async def decompose(self, question: str, subtask: str, request_id: str) -> list[str]:
        """The LLM's own split of one of its subtasks into smaller steps (SD's teacher)."""
        from hera_ray.estimators.prompts import SD_MAX_TOKENS, parse_parts, sd_messages

        messages = tuple((m["role"], m["content"]) for m in sd_messages(question, subtask))
        params = GenerationParams(messages=messages, max_tokens=SD_MAX_TOKENS, temperature=0.0,
                                  request_id=f"profile:{request_id}:sd")
        return parse_parts((await self._generate("llm", params)).text)

    async def decompose_divergent(self, record: dict[str, Any]) -> bool:
        """Add the LLM's decomposition to the first ``max_decompositions`` nodes where the two
        subtasks differ; True if any was added."""
        divergent = [n for n in record["nodes"] if n["similarity"] < self.config.match_threshold]
        todo = [n for n in divergent[: self.config.max_decompositions] if "llm_decomposition" not in n]
        parts = await asyncio.gather(*(self.decompose(record["question"], n["llm"]["subtask"], record["request_id"])
                                       for n in todo))
        for node, p in zip(todo, parts):
            node["llm_decomposition"] = p
        return bool(todo)

    async def continue_path(self, side: Side, question: str, history: list[Step], request_id: str,
                            limit: int | None = None) -> list[Step]:
        """Continue ``history`` with one model until a final answer or ``max_steps`` (or ``limit``
        steps in all); returns the whole path."""
        path = list(history)
        limit = min(limit or self.config.max_steps, self.config.max_steps)
        while len(path) < limit and not self.finished(path):
            path.append(await self.step(side, question, path, request_id))
        return path

    async def profile(self, request_id: str, item: Any) -> dict[str, Any]:
        """Grow the tree for one data set item (``.question``, ``.answer``); the scorer judges paths."""
        c = self.config
        question, gold = item.question, item.answer

        def correct(path: Sequence[Step]) -> bool:
            return bool(self.scorer(item, path_answer(path), chain_text(s.as_chain_step() for s in path)))

        t0 = time.perf_counter()
        spine: list[Step] = []
        nodes: list[dict[str, Any]] = []
        rollouts: list[asyncio.Task] = []
        # The LLM spine; at each node of depth < max_depth the SLM writes its step from the same context.
        while not self.finished(spine):
            depth = len(spine)
            if depth < c.max_depth:
                slm_step, llm_step = await asyncio.gather(self.step("slm", question, spine, request_id),
                                                          self.step("llm", question, spine, request_id))
                nodes.append({"depth": depth, "context": [asdict(s) for s in spine], "slm": asdict(slm_step),
                              "llm": asdict(llm_step)})
                # The SLM's own path from this node runs while the LLM writes the next spine step.
                # From the root it runs to the end (the All-SLM path); deeper, max_distance + 1 steps are
                # enough for the S-L distance.
                limit = None if depth == 0 else depth + c.max_distance + 1
                rollouts.append(asyncio.ensure_future(
                    self.continue_path("slm", question, spine + [slm_step], request_id, limit)))
            else:
                llm_step = await self.step("llm", question, spine, request_id)
            spine.append(llm_step)
        slm_paths: list[list[Step]] = list(await asyncio.gather(*rollouts))

        # Similarities: each node's two subtasks, and the SLM rollout's subtasks against the LLM's.
        pairs: list[tuple[str, str]] = []
        for node, path in zip(nodes, slm_paths):
            rolled = path[node["depth"]: node["depth"] + c.max_distance + 1]
            pairs += [(s.subtask, node["llm"]["subtask"]) for s in rolled]
        sims = await self.similarity(pairs) if pairs else []
        k = 0
        for node, path in zip(nodes, slm_paths):
            rolled = path[node["depth"]: node["depth"] + c.max_distance + 1]
            node_sims = sims[k: k + len(rolled)]
            k += len(rolled)
            node["similarity"] = node_sims[0]
            node["distance"] = next((d for d, s in enumerate(node_sims) if s >= c.match_threshold), None)
            node["rollout_sims"] = node_sims
            node["slm_rollout"] = [asdict(s) for s in rolled]
            finished = self.finished(path)
            node["slm_path_answer"] = path_answer(path) if finished else None
            node["slm_path_correct"] = correct(path) if finished else None

        llm_answer = path_answer(spine)
        llm_correct = correct(spine)
        for node in nodes:
            node["llm_path_correct"] = llm_correct  # the spine continues with the LLM from every node
            node["switch_path_correct"] = None
        # Switch branches: the SLM's step at the first divergent nodes, then the LLM to the end.
        divergent = [n for n in nodes if n["similarity"] < c.match_threshold][: c.max_branches]
        branches = await asyncio.gather(*(
            self.continue_path("llm", question, spine[: n["depth"]] + [Step(**n["slm"])], request_id) for n in divergent))
        for node, path in zip(divergent, branches):
            node["switch_path_answer"] = path_answer(path)
            node["switch_path_correct"] = correct(path)

        all_slm = slm_paths[0] if slm_paths else []
        record = {
            "request_id": request_id, "question": question, "gold": gold,
            "all_llm": {"answer": llm_answer, "correct": llm_correct, "steps": [asdict(s) for s in spine]},
            "all_slm": {"answer": path_answer(all_slm), "correct": correct(all_slm),
                        "steps": [asdict(s) for s in all_slm]},
            "nodes": nodes,
            "slm_checks": await self.check_slm_path(question, all_slm, spine, request_id),
        }
        await self.decompose_divergent(record)
        record["profile_s"] = time.perf_counter() - t0
        return record


    async def check_slm_path(self, question: str, path: Sequence[Step], spine: Sequence[Step],
                             request_id: str) -> list[dict[str, Any]]:
        """At each of the All-SLM path's first ``verify_steps`` steps: the LLM's score of the SLM's
        step and the LLM's own step from the same context, with their SBERT similarity."""
        checks = []
        for i, slm_step in enumerate(path[: self.config.verify_steps]):
            if not slm_step.output.strip():
                continue
            try:
                scored = await self.check(question, path[:i], slm_step, request_id)
            except InvalidRequest as e:  # a cloud backend that cannot score (OpenAI's chat API): no checks
                self.check_error = e.message
                return []
            check = {"index": i, **scored}
            # From the root the LLM's own step is the spine's first one (same context).
            own = spine[0] if i == 0 and spine else await self.step("llm", question, path[:i], request_id)
            check["llm"] = asdict(own)
            checks.append(check)
        if checks:
            sims = await self.similarity([(path[ch["index"]].subtask, ch["llm"]["subtask"]) for ch in checks])
            for ch, sim in zip(checks, sims):
                ch["similarity"] = sim
                ch["agree"] = sim >= self.config.match_threshold
        return checks


# -- the run folder -------------------------------------------------------------------------------


def read_profile(folder: Path) -> list[dict[str, Any]]:
    """Every finished request of a profile run (a torn last line from a crash is skipped)."""
    path = Path(folder) / PROFILE_FILE
    if not path.exists():
        raise ConfigError(f"no profile at {path}: run `hera profile --out {folder}` first")
    records = []
    with path.open() as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def prepare_run_folder(out: Path, config: ProfileConfig) -> set[str]:
    """Create or resume ``out``; the request ids already profiled there."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / CONFIG_FILE
    if cfg_path.exists():
        stored = ProfileConfig.model_validate_json(cfg_path.read_text())
        if stored.fingerprint() != config.fingerprint():
            diff = {k: (v, getattr(config, k)) for k, v in stored.model_dump().items() if getattr(config, k) != v}
            raise ConfigError(f"{out} holds a profile made with other settings {diff} (stored, given): "
                              "use another --out or the same settings")
    else:
        cfg_path.write_text(config.model_dump_json(indent=2))
    return {r["request_id"] for r in read_profile(out)} if (out / PROFILE_FILE).exists() else set()


@dataclass
class ProfileSummary:
    requests: int = 0
    new: int = 0
    nodes: int = 0
    all_slm_correct: int = 0
    all_llm_correct: int = 0
    mean_similarity: float = 0.0
    distances: dict[str, int] = field(default_factory=dict)
    switch_branches: int = 0
    switch_correct: int = 0
    seconds: float = 0.0


def summarise(records: list[dict[str, Any]]) -> ProfileSummary:
    s = ProfileSummary(requests=len(records))
    sims = []
    for r in records:
        s.all_slm_correct += r["all_slm"]["correct"]
        s.all_llm_correct += r["all_llm"]["correct"]
        for n in r["nodes"]:
            s.nodes += 1
            sims.append(n["similarity"])
            key = "∞" if n["distance"] is None else str(n["distance"])
            s.distances[key] = s.distances.get(key, 0) + 1
            if n.get("switch_path_correct") is not None:
                s.switch_branches += 1
                s.switch_correct += n["switch_path_correct"]
    s.mean_similarity = sum(sims) / len(sims) if sims else 0.0
    return s


async def run_profile(profiler: Profiler, items: Sequence[Any], out: Path, concurrency: int = 2,
                      on_done: Callable[[dict[str, Any]], None] | None = None,
                      done: set[str] | None = None) -> ProfileSummary:
    """Profile ``items`` (with ``.id``, ``.question``, ``.answer``) into ``out``, skipping those done.

    ``done``: what :func:`prepare_run_folder` returned, if the caller already prepared ``out``.
    """
    if done is None:
        done = prepare_run_folder(out, profiler.config)
    todo = [it for it in items if request_id(profiler.config, it.id) not in done]
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(concurrency)
    lock = asyncio.Lock()
    path = out / PROFILE_FILE

    async def one(item) -> None:
        async with sem:
            record = await profiler.profile(request_id(profiler.config, item.id), item)
            record["item_id"] = item.id
            record["dataset"] = profiler.config.dataset
        async with lock:  # one whole line per request: a crash never leaves half a request behind
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if on_done is not None:
            on_done(record)

    await asyncio.gather(*(one(it) for it in todo))
    records = await backfill_decompositions(profiler, out)
    wanted = {request_id(profiler.config, it.id) for it in items}
    summary = summarise([r for r in records if r["request_id"] in wanted])
    summary.new = len(todo)
    summary.seconds = time.perf_counter() - t0
    return summary


async def backfill_decompositions(profiler: Profiler, out: Path) -> list[dict[str, Any]]:
    """Give records profiled before SD's teacher existed their LLM decompositions; rewrites the file
    atomically if any changed. Returns every record."""
    records = read_profile(out)
    changed = 0
    for record in records:
        changed += await profiler.decompose_divergent(record)
    if changed:
        tmp = out / (PROFILE_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(out / PROFILE_FILE)
    return records


def request_id(config: ProfileConfig, item_id: str) -> str:
    """The request id a data set item is profiled (and trained) under."""
    return f"{config.dataset}-{item_id}"


# -- the live cluster's models ------------------------------------------------------------------


class ClusterStepModels:
    """Steps on the live cluster: the SLM on the registered edge nodes (gRPC), the LLM on the
    cloud Serve deployment (its handle). Edge nodes are taken round-robin among those up."""

    def __init__(self, executor, edge_addresses: list[str], edge_slots: int = 1, cloud_concurrency: int = 2):
        if not edge_addresses:
            raise ConfigError("no edge node is up in the cluster: start one (`hera up --local-edges 1`)")
        self.executor = executor
        self.edges = edge_addresses
        self._next = 0
        self._edge_sem = asyncio.Semaphore(max(1, edge_slots))
        self._cloud_sem = asyncio.Semaphore(max(1, cloud_concurrency))

    async def generate(self, side: Side, params: GenerationParams) -> GenerationResult:
        if side == "slm":
            async with self._edge_sem:
                address = self.edges[self._next % len(self.edges)]
                self._next += 1
                return await self.executor.edge(address, params)
        async with self._cloud_sem:
            return await self.executor.cloud(params)


def connect_cluster(edge_model: str | None = None) -> ClusterStepModels:
    """Attach to the running hera-ray (``hera up``'s record, or ``RAY_ADDRESS``): its edge nodes and cloud LLM."""
    from hera_ray import cluster

    state = cluster.attach()
    import ray
    from ray import serve

    from cloud_node.deployment import DEPLOYMENT_NAME
    from hera_ray.scheduler.actor import scheduler_handle
    from hera_ray.serve.executor import ClusterExecutor

    nodes = ray.get(scheduler_handle(state.namespace).nodes.remote(), timeout=30)
    up = [n for n in nodes if n["state"] == "up" and (edge_model is None or n["model"] == edge_model)]
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=state.app_name)
    return ClusterStepModels(ClusterExecutor(handle), [n["address"] for n in up],
                             edge_slots=sum(int(n["slots"]) for n in up))
