"""Each estimator's data set, built from a profile (``hera profile``'s ``profile.jsonl``).

Pure code over the profile records, so what an estimator learns from is easy to read and test:

* **URC** (request → simple?): *simple* when the SLM alone loses nothing on the request: its
  All-SLM path ended correct, or the All-LLM path did not either. (HybridLLM's label, q(S) ≥ q(L),
  for a 0/1 score.)
* **HybridLLM** (request → SLM?): the same label; a router of its own with its own threshold.
* **RouteLLM** (request → strong / tie / weak): who wins on the answer, the three classes of
  RouteLLM's BERT router; it sends a request to the LLM when P(strong) is high enough.
* **SP_SLM / SP_LLM** (context → the next subtask that side writes): every step of every path the
  profile holds, by who wrote it: node candidates, the SLM rollouts, the LLM spine, the switch
  branches.
* **DP** (context → S-L distance class 0..max or ``inf``): one example per tree node. With
  ``dp_input="context+slm"`` the input also holds the SLM's subtask at the node.
* **SD** (an LLM subtask → its sub-subtasks): where the SLM converged to the LLM's subtask after
  d ≥ 1 further steps, those d+1 SLM subtasks are a finer split of the LLM's one; at the other
  nodes where the two sides differed, the LLM's own split of its subtask (the profiler asks it).

Held out: whole requests (a stable hash of the request id), so no request's steps are on both sides.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

from hera_ray.estimators.prompts import (distance_label, encoder_context, sd_messages, sd_target, sp_request,
                                         sp_target)

HELDOUT_SHARE = 0.2


def is_heldout(request_id: str, share: float = HELDOUT_SHARE) -> bool:
    bucket = int.from_bytes(hashlib.blake2b(f"heldout:{request_id}".encode(), digest_size=4).digest(), "big")
    return bucket % 1000 < share * 1000


@dataclass
class Split:
    """Training and held-out examples of one estimator."""

    train: list[Any] = field(default_factory=list)
    heldout: list[Any] = field(default_factory=list)

    def add(self, request_id: str, example: Any) -> None:
        (self.heldout if is_heldout(request_id) else self.train).append(example)


def _steps(steps: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(s["subtask"], s["output"]) for s in steps]


def request_simple(record: dict[str, Any]) -> bool:
    return bool(record["all_slm"]["correct"] or not record["all_llm"]["correct"])


#: RouteLLM's three classes (its BERT router's label order: the strong model wins, a tie, the weak wins).
OUTCOMES = ["strong", "tie", "weak"]


def request_outcome(record: dict[str, Any]) -> str:
    """Who wins the request on its answer: the LLM alone (``strong``), the SLM alone (``weak``), or neither (``tie``)."""
    llm, slm = bool(record["all_llm"]["correct"]), bool(record["all_slm"]["correct"])
    return "strong" if llm and not slm else "weak" if slm and not llm else "tie"


def routellm_examples(records: list[dict[str, Any]]) -> Split:
    """(question, outcome) pairs: the RouteLLM-style router's training data."""
    split = Split()
    for r in records:
        split.add(r["request_id"], (r["question"], request_outcome(r)))
    return split


def urc_examples(records: list[dict[str, Any]]) -> Split:
    split = Split()
    for r in records:
        split.add(r["request_id"], (r["question"], "simple" if request_simple(r) else "complex"))
    return split


def sp_examples(records: list[dict[str, Any]], side: str, fmt: str = "compact") -> Split:
    """(messages, target, continue_final_message, end) tuples: the subtask ``side`` wrote after each
    context it was given, in SP prompt format ``fmt``, and what ends the target (None: the end of
    the turn). Deduplicated."""
    split = Split()
    for r in records:
        q, seen = r["question"], set()

        def add(history: list[tuple[str, str]], subtask: str) -> None:
            key = (tuple(history), subtask)
            if key in seen or not subtask.strip():
                return
            seen.add(key)
            messages, cont = sp_request(fmt, q, history)
            # compact: the step's line, normalised; chain: the line exactly as the model wrote it.
            target = subtask.rstrip("\n").rstrip() if fmt == "chain" else sp_target(subtask)
            # chain: the target is a line of the chain, ended by its newline (step 0 too: it begins the reply)
            split.add(r["request_id"], (messages, target, cont, "\n" if fmt == "chain" else None))

        if side == "llm":
            spine = _steps(r["all_llm"]["steps"])
            for k in range(len(spine)):
                add(spine[:k], spine[k][0])
            for n in r["nodes"]:
                add(_steps(n["context"]), n["llm"]["subtask"])
        else:
            for n in r["nodes"]:
                context = _steps(n["context"])
                add(context, n["slm"]["subtask"])
                rolled = _steps(n.get("slm_rollout", []))
                for k in range(1, len(rolled)):
                    add(context + rolled[:k], rolled[k][0])
            slm = _steps(r["all_slm"]["steps"])
            for k in range(len(slm)):
                add(slm[:k], slm[k][0])
    return split


def dp_text(record: dict[str, Any], node: dict[str, Any], dp_input: str = "context") -> str:
    """DP's input at a tree node: the context, and with ``context+slm`` the SLM's subtask there."""
    slm_next = node["slm"]["subtask"] if dp_input == "context+slm" else None
    return encoder_context(record["question"], _steps(node["context"]), slm_next)


def dp_examples(records: list[dict[str, Any]], dp_input: str = "context") -> Split:
    """(input, distance label) per tree node: the encoder's text, or with ``confidence`` the features
    of the SLM's next step (a node whose step has no log-probabilities, from an older profile, is skipped)."""
    from hera_ray.estimators.logistic import dp_features

    split = Split()
    for r in records:
        for n in r["nodes"]:
            if dp_input == "confidence":
                if n["slm"].get("logprobs") is None:
                    continue
                x: Any = dp_features(r["question"], _steps(n["context"]), n["slm"]["subtask"], n["slm"]["logprobs"])
            else:
                x = dp_text(r, n, dp_input)
            split.add(r["request_id"], (x, distance_label(n["distance"])))
    return split


def sd_examples(records: list[dict[str, Any]]) -> Split:
    split = Split()
    for r in records:
        for n in r["nodes"]:
            d = n["distance"]
            if d is not None and d >= 1:  # the SLM's own finer steps that reached the LLM's subtask
                parts = [s["subtask"] for s in n["slm_rollout"][: d + 1]]
            elif len(n.get("llm_decomposition") or ()) >= 2:  # else the LLM's split of it, as teacher
                parts = n["llm_decomposition"]
            else:
                continue
            split.add(r["request_id"], (sd_messages(r["question"], n["llm"]["subtask"]), sd_target(parts)))
    return split


def cd_labels(records: list[dict[str, Any]], max_distance: int, dp_input: str = "context") -> Split:
    """(DP input, converges?) pairs: does the SLM's path line up with the LLM's subtask within max_distance steps?"""
    split = Split()
    for r in records:
        for n in r["nodes"]:
            d = n["distance"]
            split.add(r["request_id"], (dp_text(r, n, dp_input), d is not None and d <= max_distance))
    return split
