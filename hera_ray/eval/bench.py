"""``hera bench`` and ``hera calibrate``: every policy on the same requests, through the live runtime.

A bench run sends each item of a data set split, under each policy, to the running hera-ray
(the same cluster, models and estimators for all), scores the answer, and appends one record
per (policy, item) to ``<out>/runs/<dataset>-<split>.jsonl``. A re-run skips what is recorded, so
a long CPU run resumes where it stopped; items go in order, every policy for an item before the
next item, so a stopped run still compares policies on the same requests. The folder's
``.meta.json`` holds the settings that change results (step limit, models, estimators): a run
with other settings is refused rather than mixed in.

Sweeps: a policy with a knob runs at other values as ``<policy>@<value>`` (``hera@0.7`` is HERA
with threshold base 0.7; ``hybridllm@0.5`` is τ = 0.5; ``random@0.3`` an SLM share of 0.3). A
router's APGR is the area under its PGR-vs-cost curve over its sweep points, closed by ``all-slm``
at (0, 0) and ``all-llm`` at (1, 1) (:func:`hera_ray.eval.stats.area_under_pgr`); ``apgr_span``
says how far along the cost axis the router's own points reach.

Metrics per policy, over the items every policy has finished:

- accuracy (and F1 where the data set has it), SLM share of subtasks, cost / all-llm's cost;
- PGR = (acc − acc_all-slm) / (acc_all-llm − acc_all-slm), undefined when the two are equal;
- latency p50 / p95 of a request, and the decision overhead: the time the policy took to place
  subtasks as a share of end-to-end request time.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from hera_ray.errors import ConfigError, InvalidRequest

BASELINES = ("all-slm", "all-llm")
ABLATIONS = ("hera-no-sd", "hera-no-urc", "hera-urc-only")
#: Stages that keep a step on the SLM: HERA's (``llm`` is its one cloud stage), hera-verify's
#: (hera_ray.policy.verify) and the cascade's.
EDGE_STAGES = ("urc", "sse", "cd", "sd", "confidence", "classifier", "llm-check", "blank", "cascade-slm")


def policy_base(name: str) -> str:
    return name.partition("@")[0]


def run_names(policies: Iterable[str], sweeps: dict[str, Iterable[float]], ablations: bool) -> list[str]:
    """The policies to run, in order, without repeats: the baselines, each named policy, its sweep
    points, then the ablations."""
    names: list[str] = []
    for p in (*BASELINES, *policies):
        if p not in names:
            names.append(p)
        for v in sweeps.get(p, ()):
            tuned = f"{p}@{v:g}"
            if tuned not in names:
                names.append(tuned)
    if ablations:
        names += [a for a in ABLATIONS if a not in names]
    return names


# -- the record store ----------------------------------------------------------------------------


@dataclass
class RecordStore:
    """One JSONL line per finished (policy, item), appended under a lock; the settings beside it, and
    every failed run in a side file (``<name>.errors.jsonl``), so that a report counts the errors of
    every invocation that added to the records, not only of the last."""

    path: Path
    meta: dict[str, Any]
    records: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta_path = self.path.with_suffix(".meta.json")
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            differs = {k: (old.get(k), v) for k, v in self.meta.items() if old.get(k) != v}
            if differs:
                what = "; ".join(f"{k}: recorded {a!r}, now {b!r}" for k, (a, b) in differs.items())
                raise ConfigError(f"{self.path} was recorded with other settings ({what}): pass another "
                                  f"--out, or --fresh to start it over")
        else:
            meta_path.write_text(json.dumps(self.meta, indent=2) + "\n")
        if self.path.exists():
            text = self.path.read_text()
            if text and not text.endswith("\n"):
                # a run stopped mid-write left half a record: drop it (that run is simply not done), so
                # the next record starts on a line of its own
                text = text[: text.rfind("\n") + 1]
                self.path.write_text(text)
            for line in text.splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.records[(r["policy"], r["item"])] = r
        if self.errors_path.exists():
            text = self.errors_path.read_text()
            if text and not text.endswith("\n"):  # cut off mid-write, as above
                text = text[: text.rfind("\n") + 1]
                self.errors_path.write_text(text)
            self.errors = [json.loads(line) for line in text.splitlines() if line.strip()]

    @property
    def errors_path(self) -> Path:
        return self.path.with_suffix(".errors.jsonl")

    def add_error(self, policy: str, item_id: str, message: str, status: int | None = None) -> None:
        """A run that failed (after its retries): kept beside the records, across invocations."""
        error = {"policy": policy, "item": item_id, "status": status, "message": message[:2000], "time": time.time()}
        with self._lock:
            self.errors.append(error)
            with self.errors_path.open("a") as f:
                f.write(json.dumps(error) + "\n")

    def rescore(self, items_by_id: dict[str, Any]) -> int:
        """Score every record again from the answer and output it kept, with today's scorers (after
        a scorer fix); records from before outputs were kept stay as they are. Returns how many
        verdicts changed."""
        from hera_ray.eval.scorers import score

        changed = 0
        with self._lock:
            for r in self.records.values():
                item = items_by_id.get(r["item"])
                if item is None or "output" not in r:
                    continue
                s = score(item, r["answer"], r["output"])
                changed += bool(s.correct) != r["correct"]
                r.update(correct=bool(s.correct), em=s.em, f1=s.f1, detail=s.detail)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records.values()))
            tmp.replace(self.path)
        return changed

    def done(self, policy: str, item_id: str) -> bool:
        return (policy, item_id) in self.records

    def add(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.records[(record["policy"], record["item"])] = record
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def record_of(item, policy: str, run: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The compact record of one agent run: score, placement, cost and timing (not the text)."""
    from hera_ray.eval.scorers import score

    everything = run.get("trace", [])
    trace = [t for t in everything if not t.get("discarded")]  # a cascade's discarded SLM chain aside
    # The whole chain of thought, as one turn would have written it (runs from before the step
    # format kept no chain: their steps' results, then the final answer).
    output = str(run["chain"] if "chain" in run else "\n\n".join([*(str(t.get("output", "")) for t in trace),
                                                                   str(run.get("final_text", ""))])).strip()
    s = score(item, run.get("answer", ""), output)
    return {
        "policy": policy, "item": item.id, "correct": bool(s.correct), "em": s.em, "f1": s.f1, "detail": s.detail,
        "answer": str(run.get("answer", ""))[:300], "gold": item.answer, "finished": bool(run.get("finished")),
        "output": output[-4000:],  # what the scorer saw besides the answer (kept to re-check scores)
        "subtasks": len(trace), "edge_subtasks": sum(t["placement"] == "edge" for t in trace),
        "discarded_subtasks": len(everything) - len(trace), "escalated": bool((run.get("review") or {}).get("escalated")),
        "cost": float(run.get("cost", 0.0)), "cloud_tokens": int(run.get("cloud_tokens", 0)),
        "latency_s": float(run.get("latency_s", 0.0)), "wall_s": wall_s,
        "decision_s": sum(float(t.get("decision_s", 0.0)) for t in everything),
        "speculative_s": sum(float(t.get("speculative_s", 0.0)) for t in everything),
        "check_s": sum(float(t.get("check_s", 0.0)) for t in everything),
        "model_s": sum(float(t.get("model_s", 0.0)) for t in everything),
        # Engine calls, and those answered from a generation cache (hera_ray/gencache.py).
        "engine_calls": sum(int(t.get("engine_calls", 0)) for t in everything),
        "cache_hits": sum(int(t.get("cache_hits", 0)) for t in everything),
        "stages": dict(Counter(t.get("stage", "") for t in trace)),
        # the network isolation this run's program was scored under (code data sets; [] when no program ran)
        **({"sandbox": list(s.isolation)} if item.kind == "code" else {}),
    }


# -- metrics --------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def pgr(acc: float, acc_slm: float, acc_llm: float) -> float | None:
    """Performance gap recovered; None when the two models score the same (no gap to recover)."""
    gap = acc_llm - acc_slm
    return None if abs(gap) < 1e-12 else (acc - acc_slm) / gap


def summarise(records: dict[tuple[str, str], dict], policies: list[str],
              sweeps: dict[str, Iterable[float]], best: str | None = None) -> dict[str, Any]:
    """Per-policy metrics over the items every policy in ``policies`` has finished, with paired
    bootstrap 95% intervals (``ci``) and those of ``best`` minus each other policy
    (``differences``; ``best`` defaults to the most accurate policy besides the two anchors)."""
    by_policy: dict[str, dict[str, dict]] = {p: {} for p in policies}
    for (p, item), r in records.items():
        if p in by_policy:
            by_policy[p][item] = r
    common = set.intersection(*(set(v) for v in by_policy.values())) if by_policy else set()
    out: dict[str, dict[str, Any]] = {}
    for p in policies:
        rs = [by_policy[p][i] for i in sorted(common)]
        subtasks = sum(r["subtasks"] for r in rs)
        lat = sum(r["latency_s"] for r in rs)
        out[p] = {
            "n": len(rs),
            "accuracy": sum(r["correct"] for r in rs) / len(rs) if rs else 0.0,
            "f1": sum(r["f1"] for r in rs) / len(rs) if rs else 0.0,
            "slm_share": sum(r["edge_subtasks"] for r in rs) / subtasks if subtasks else 0.0,
            "subtasks": subtasks,
            "cost_abs": sum(r["cost"] for r in rs),
            "latency_p50_s": _pct([r["latency_s"] for r in rs], 0.5),
            "latency_p95_s": _pct([r["latency_s"] for r in rs], 0.95),
            # Deciding, plus (speculative SSE) SLM steps that were run and then sent to the LLM.
            "overhead_share": sum(r["decision_s"] + r.get("speculative_s", 0.0) for r in rs) / lat if lat else 0.0,
            "runtime_overhead_share": (lat - sum(r["model_s"] for r in rs)) / lat if lat else 0.0,
            "decision_share": sum(r["decision_s"] for r in rs) / lat if lat else 0.0,
            # hera-verify: the LLM's one-prefill checks of borderline SLM steps.
            "check_share": sum(r.get("check_s", 0.0) for r in rs) / lat if lat else 0.0,
            # Share of engine calls a generation cache answered (0 with the cache off).
            "cache_hit_rate": (sum(r.get("cache_hits", 0) for r in rs) / calls
                               if (calls := sum(r.get("engine_calls", 0) for r in rs)) else 0.0),
            "stages": dict(sum((Counter(r["stages"]) for r in rs), Counter())),
            # A cascade: the requests it escalated (the SLM's chain discarded, the LLM answering again).
            "escalation_rate": sum(bool(r.get("escalated")) for r in rs) / len(rs) if rs else 0.0,
        }
    # Which stages put a request on the SLM where that cost its answer: requests all-llm got right
    # and this policy got wrong, with the stages that placed their edge subtasks.
    llm_right = {i for i in common if by_policy.get("all-llm", {}).get(i, {}).get("correct")}
    for p in policies:
        lost = [by_policy[p][i] for i in sorted(llm_right) if not by_policy[p][i]["correct"]]
        gained = [i for i in sorted(common - llm_right) if by_policy[p][i]["correct"]] if "all-llm" in by_policy else []
        out[p]["lost_vs_llm"] = len(lost) if "all-llm" in by_policy else None
        out[p]["gained_vs_llm"] = len(gained) if "all-llm" in by_policy else None
        out[p]["lost_edge_stages"] = dict(sum((Counter({k: v for k, v in r["stages"].items() if k in EDGE_STAGES})
                                               for r in lost), Counter()))
    llm_cost = out.get("all-llm", {}).get("cost_abs") or 0.0
    acc_slm = out.get("all-slm", {}).get("accuracy")
    acc_llm = out.get("all-llm", {}).get("accuracy")
    for m in out.values():
        m["cost"] = m["cost_abs"] / llm_cost if llm_cost else None
        m["pgr"] = pgr(m["accuracy"], acc_slm, acc_llm) if acc_slm is not None and acc_llm is not None else None
    # each router's operating points that ran: the configured one and its sweep
    routers = {router: [p for p in [router] + [f"{router}@{v:g}" for v in values] if p in out]
               for router, values in sweeps.items()}
    from hera_ray.eval.stats import area_under_pgr, on_pgr_curve

    for router, points in routers.items():
        pts = [(out[p]["cost"], out[p]["pgr"]) for p in points if out[p]["pgr"] is not None and out[p]["cost"] is not None]
        area = area_under_pgr(pts) if pts else float("nan")
        apgr = area if math.isfinite(area) else None
        # how far the router's own points reach along the cost axis: beyond them the curve is the
        # straight line to an anchor, assumed rather than measured
        costs = [c for c, _ in pts if on_pgr_curve(c)]
        span = [min(costs), max(costs)] if apgr is not None and costs else None
        for p in points:
            out[p]["apgr"] = apgr
            out[p]["apgr_span"] = span
    for m in out.values():
        m.setdefault("apgr", None)
        m.setdefault("apgr_span", None)
    # Paired bootstrap: every policy resampled on the same draws of the common requests.
    from hera_ray.eval.stats import paired_bootstrap

    items = sorted(common)
    ci = paired_bootstrap({p: [float(by_policy[p][i]["correct"]) for i in items] for p in policies},
                          {p: [float(by_policy[p][i]["cost"]) for i in items] for p in policies},
                          best=best if best in out else None, routers={r: v for r, v in routers.items() if v})
    for p in policies:
        out[p]["ci"] = ci["policies"][p]
        out[p]["apgr_ci"] = ci["apgr"].get(policy_base(p))
    return {"n": len(common), "policies": out, "best": ci["best"], "differences": ci["differences"],
            "apgr_differences": ci["apgr_differences"],
            "bootstrap": {"n_boot": ci["n_boot"], "level": ci["level"], "pgr_undefined": ci["pgr_undefined"]}}


# -- running ---------------------------------------------------------------------------------------


def git_commit(root: Path | None = None) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=root or Path(__file__).resolve().parent).stdout.strip()
        # -dirty when the code differs from the commit; results written under bench/results/ (by this
        # bench or a running one) are output, not code
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)bench/results"], capture_output=True,
                               text=True, cwd=root or Path(__file__).resolve().parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cluster_meta(client) -> dict[str, Any]:
    """What about the cluster changes results: its models and its trained estimators (by the time
    they were trained; None where the cluster runs without them)."""
    from hera_ray.client import ClientError

    health = client.health()
    try:
        estimators = client._call("GET", "/v1/estimators").get("created")
    except ClientError:
        estimators = None
    return {"cloud_model": health["cloud_model"], "edge_model": health["edge_model"], "estimators": estimators,
            "cloud_prices": health.get("cloud_prices"), "cloud_step_format": health.get("cloud_step_format"),
            "agent": health.get("agent"), "generation_cache": health.get("generation_cache"),
            "policy_settings": health.get("policy_settings")}


def run_bench(client, items: list, policies: list[str], store: RecordStore, max_steps: int,
              on_progress: Callable[[str, str, dict | None], None] | None = None, concurrency: int = 1,
              retries: int = 1) -> list[tuple[str, str]]:
    """Run every (item, policy) the store lacks; return the errors as (policy, message) (the caller
    prints them and counts them per policy)."""
    from concurrent.futures import ThreadPoolExecutor

    from hera_ray.client import ClientError

    errors: list[tuple[str, str]] = []

    def one_item(item) -> None:
        for policy in policies:
            if store.done(policy, item.id):
                continue
            for attempt in range(retries + 1):
                t0 = time.perf_counter()
                try:
                    run = client.run(item.question, policy=policy, max_steps=max_steps,
                                     request_id=f"bench:{item.dataset}:{item.id}:{policy}:{attempt}")
                except ClientError as e:
                    if 400 <= e.status < 500 or attempt == retries:
                        errors.append((policy, f"{policy} {item.dataset}#{item.id}: {e}"))
                        store.add_error(policy, item.id, str(e), e.status)
                        if on_progress:
                            on_progress(policy, item.id, None)
                        if 400 <= e.status < 500:
                            raise  # the request itself is wrong (e.g. an unknown policy): stop
                        break
                    continue
                record = record_of(item, policy, run, time.perf_counter() - t0)
                store.add(record)
                if on_progress:
                    on_progress(policy, item.id, record)
                break

    if concurrency <= 1:
        for item in items:
            one_item(item)
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(one_item, item) for item in items]:
                f.result()
    return errors


def calibrate_choice(summary: dict[str, Any], router: str, target_cost: float | None,
                     target_pgr: float | None) -> tuple[str | None, str]:
    """The sweep point that meets the target: for a cost target, the most accurate point within the
    budget; for a PGR target, the cheapest point that recovers enough. (point, why)."""
    if (target_cost is None) == (target_pgr is None):
        raise InvalidRequest("give exactly one of --target-cost and --target-pgr")
    points = {p: m for p, m in summary["policies"].items() if policy_base(p) == router}
    if target_cost is not None:
        ok = [(p, m) for p, m in points.items() if m["cost"] is not None and m["cost"] <= target_cost + 1e-9]
        if not ok:
            cheapest = min(points.items(), key=lambda kv: kv[1]["cost"] if kv[1]["cost"] is not None else 9e9)
            return None, (f"no threshold in the sweep keeps cost <= {target_cost}: the cheapest, {cheapest[0]}, "
                          f"costs {cheapest[1]['cost']:.2f} of all-llm; sweep higher SLM shares (lower bases)")
        best = max(ok, key=lambda kv: (kv[1]["accuracy"], -kv[1]["cost"]))
        return best[0], f"most accurate within cost {target_cost}: accuracy {best[1]['accuracy']:.1%}, cost {best[1]['cost']:.2f}"
    ok = [(p, m) for p, m in points.items() if m["pgr"] is not None and m["pgr"] >= target_pgr - 1e-9]
    if not ok:
        return None, (f"no threshold in the sweep reaches PGR {target_pgr}"
                      + ("" if any(m["pgr"] is not None for m in points.values())
                         else " (all-slm and all-llm score the same here: PGR is undefined)"))
    best = min(ok, key=lambda kv: (kv[1]["cost"] if kv[1]["cost"] is not None else 9e9, -kv[1]["accuracy"]))
    return best[0], f"cheapest with PGR >= {target_pgr}: PGR {best[1]['pgr']:.2f}, cost {best[1]['cost']:.2f}"


def knob_value(policy: str, default: float) -> float:
    base, at, value = policy.partition("@")
    return float(value) if at else default


def write_config_value(path: Path, section: str, key: str, value: Any) -> None:
    """Set ``section.key`` in a YAML settings file, keeping everything else in it."""
    import yaml

    data: dict[str, Any] = {}
    if path.exists():
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
    data.setdefault(section, {})[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


# -- output -----------------------------------------------------------------------------------------


def result_json(dataset: str, split: str, command: str, summary: dict[str, Any],
                meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "f1", "slm_share", "cost", "pgr", "apgr", "latency_p50_s", "latency_p95_s",
            "overhead_share", "runtime_overhead_share", "decision_share", "check_share", "cache_hit_rate", "escalation_rate", "subtasks",
            "stages", "lost_vs_llm", "gained_vs_llm",
            "lost_edge_stages", "ci", "apgr_ci", "apgr_span")
    return {
        "command": command, "commit": git_commit(), "dataset": dataset, "split": split, "n": summary["n"],
        "settings": meta,
        "policies": {p: {k: m.get(k) for k in keys} for p, m in summary["policies"].items()},
        # Paired bootstrap: each policy's 95% intervals are under policies.<p>.ci; these are best minus each other policy.
        "bootstrap": summary.get("bootstrap"), "best": summary.get("best"), "differences": summary.get("differences", {}),
        # APGR (the area under a router's PGR-vs-cost curve): best's router minus each other router, per paired draw.
        "apgr_differences": summary.get("apgr_differences", {}),
    }


def plot(path: Path, dataset: str, summary: dict[str, Any], sweeps: dict[str, Iterable[float]]) -> None:
    """Accuracy against cloud cost (as a share of all-llm's; SLM share when all-llm did not run):
    each router's sweep as a line (APGR in the legend; dashed, the segments to the anchors that close
    the curve APGR integrates), the baselines and ablations as markers, and each point's bootstrap
    95% accuracy interval as an error bar."""
    import matplotlib

    from hera_ray.eval.stats import on_pgr_curve

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = summary["policies"]
    by_cost = all(m.get("cost") is not None for m in pol.values())
    xkey = "cost" if by_cost else "slm_share"

    def err(p: str) -> list[list[float]]:
        ci = (pol[p].get("ci") or {}).get("accuracy")
        acc = pol[p]["accuracy"]
        return [[acc - ci[0]], [ci[1] - acc]] if ci else [[0.0], [0.0]]

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {"hera": "tab:red", "hera-verify": "tab:green", "hybridllm": "tab:blue", "routellm": "tab:cyan",
               "cascade": "tab:purple", "random": "tab:grey"}
    for router, values in sweeps.items():
        points = [p for p in [router, *(f"{router}@{v:g}" for v in values)] if p in pol]
        if not points:
            continue
        points.sort(key=lambda p: pol[p][xkey])
        apgr = pol[points[0]]["apgr"]
        label = f"{router} (APGR {apgr:.2f})" if apgr is not None else f"{router} (APGR n/a)"
        colour = colours.get(router)
        ax.plot([pol[p][xkey] for p in points], [pol[p]["accuracy"] for p in points], "o-", color=colour, label=label)
        if by_cost and apgr is not None and "all-slm" in pol and "all-llm" in pol:
            # the curve APGR integrates is closed by the anchors: all-slm at cost 0, all-llm at cost 1
            inside = [p for p in points if on_pgr_curve(pol[p]["cost"])]
            if inside:
                ax.plot([0.0, pol[inside[0]]["cost"]], [pol["all-slm"]["accuracy"], pol[inside[0]]["accuracy"]], "--",
                        color=colour, alpha=0.4, linewidth=1)
                ax.plot([pol[inside[-1]]["cost"], 1.0], [pol[inside[-1]]["accuracy"], pol["all-llm"]["accuracy"]], "--",
                        color=colour, alpha=0.4, linewidth=1)
        for p in points:
            ax.errorbar(pol[p][xkey], pol[p]["accuracy"], yerr=err(p), color=colour, alpha=0.35, capsize=2)
    markers = {"all-slm": ("s", "black"), "all-llm": ("D", "black"), "hera-no-sd": ("v", "tab:orange"),
               "hera-no-urc": ("^", "tab:purple"), "hera-urc-only": ("P", "tab:olive"), "hera-spec": ("*", "tab:red")}
    for p, (m, c) in markers.items():
        if p in pol:
            ax.errorbar(pol[p][xkey], pol[p]["accuracy"], yerr=err(p), fmt=m, color=c, markersize=9, capsize=2, label=p)
    ax.set_xlabel("cloud cost, as a share of all-llm's" if by_cost else "SLM share of subtasks")
    ax.set_ylabel("accuracy (bars: paired bootstrap 95%)")
    if not by_cost:
        ax.set_xlim(-0.03, 1.03)
    ax.set_title(f"{dataset}: accuracy vs {'cost' if by_cost else 'SLM share'} ({summary['n']} requests)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary: dict[str, Any], title: str):
    from rich.table import Table

    t = Table(title=title)
    cached = any(m.get("cache_hit_rate") for m in summary["policies"].values())
    for col in ("policy", "acc", "F1", "SLM share", "cost", "PGR", "APGR", "p50 s", "p95 s", "decide") + (("cache hits",) if cached else ()):
        t.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)

    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    def with_ci(m, key, fmt, scale=1.0):
        """The figure, and its 95% interval in brackets (in the figure's unit)."""
        ci = m.get("apgr_ci") if key == "apgr" else (m.get("ci") or {}).get(key)
        if m[key] is None or ci is None:
            return f(m[key], fmt)
        unit = "%" if fmt.endswith("%") else ""
        digits = fmt.strip(".%f")
        lo, hi = (format(v * scale, f".{digits}f") for v in ci)
        return f"{format(m[key], fmt)} [{lo}–{hi}{unit}]"

    for p, m in summary["policies"].items():
        t.add_row(p, with_ci(m, "accuracy", ".0%", 100), f(m["f1"], ".2f"), f(m["slm_share"], ".0%"),
                  with_ci(m, "cost", ".2f"), with_ci(m, "pgr", ".2f"), with_ci(m, "apgr", ".2f"), f(m["latency_p50_s"], ".1f"),
                  f(m["latency_p95_s"], ".1f"), f(m["overhead_share"], ".1%"),
                  *((f(m.get("cache_hit_rate"), ".0%"),) if cached else ()))
    notes = ["in brackets: the paired bootstrap 95% interval"]
    if cached:
        notes.append("a generation cache answered some engine calls: latency and decision shares are not the engines'")
    t.caption = "; ".join(notes) + "."
    return t


# -- one data set, end to end -------------------------------------------------------------------------


def resolve_url(url: str | None) -> str:
    """``url``, else ``$HERA_URL``, else the cluster ``hera up`` started on this machine."""
    import os

    if url or os.environ.get("HERA_URL"):
        return url or os.environ["HERA_URL"]
    from hera_ray import cluster

    state = cluster.load_state()
    if state is None:
        raise ConfigError("no hera-ray is running here: start one with `hera up --local-edges 2` "
                          "(or pass --url / set HERA_URL)")
    return state.ingress_url


def output_stem(out: Path, dataset: str, split: str) -> Path:
    return out / (dataset if split == "test" else f"{dataset}-{split}")


def bench_dataset(client, dataset: str, split: str, n: int | None, names: list[str],
                  sweeps: dict[str, tuple[float, ...]], max_steps: int, out: Path, command: str, console,
                  fresh: bool = False, concurrency: int = 1, rescore: bool = False,
                  best: str | None = None, report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) one data set under every policy in ``names``; print the table, write
    ``<out>/<dataset>.json`` and ``.png``; return the result JSON. ``best``: the policy under study,
    whose differences from every other policy get intervals (default: ``hera-verify`` at its
    configured knob when it runs, else the most accurate policy besides the anchors).
    ``report_only``: run nothing and need no cluster (``client`` may be None): the tables, JSON and
    plot from the recorded runs alone, under the settings they were recorded with."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hera_ray.eval.datasets import load

    items = load(dataset, split, n)
    if not items:
        raise InvalidRequest(f"{dataset}/{split} has no items")
    records = out / "runs" / f"{dataset}-{split}.jsonl"
    if report_only:
        meta_path = records.with_suffix(".meta.json")
        if not records.exists() or not meta_path.exists():
            raise InvalidRequest(f"no recorded runs of {dataset}/{split} in {records.parent}: --report-only writes "
                                 f"results from runs a bench recorded there")
        meta = json.loads(meta_path.read_text())
    else:
        meta = {"dataset": dataset, "split": split, "max_steps": max_steps, **cluster_meta(client)}
    if fresh:
        records.unlink(missing_ok=True)
        records.with_suffix(".meta.json").unlink(missing_ok=True)
        records.with_suffix(".errors.jsonl").unlink(missing_ok=True)
    store = RecordStore(records, meta)
    if rescore:
        changed = store.rescore({it.id: it for it in load(dataset, split)})
        console.print(f"re-scored {len(store.records)} record(s) with the current scorers: {changed} verdict(s) changed",
                      highlight=False)
    if report_only:
        # report what was run, not what this command names: a policy without records would empty the
        # common set and overwrite good results with nothing
        ids_asked = [it.id for it in items]
        missing = [p for p in names if not any(store.done(p, i) for i in ids_asked)]
        if missing:
            recorded = sorted({p for p, _ in store.records})
            raise InvalidRequest(f"--report-only: no recorded runs of {', '.join(missing)} on {dataset}/{split} in "
                                 f"{records}; the records hold {', '.join(recorded) or 'no policy'}: name those "
                                 f"with --policies")
        beyond = len({i for _, i in store.records} - set(ids_asked))
        if beyond:
            console.print(f"[yellow]--report-only[/yellow]: the records hold {beyond} request(s) beyond the "
                          f"{len(items)} asked (--n); the report leaves them out", highlight=False)
    todo = 0 if report_only else sum(not store.done(p, it.id) for it in items for p in names)
    console.print(f"{dataset}/{split}: {len(items)} request(s) x {len(names)} policies; {todo} run(s) to do, "
                  f"the rest recorded in {records}", highlight=False)
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[last]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(dataset, total=todo, last="")

        def on_progress(policy: str, item_id: str, record: dict | None) -> None:
            mark = "error" if record is None else ("✓" if record["correct"] else "✗")
            share = "" if record is None else f" SLM {record['edge_subtasks']}/{record['subtasks']}"
            progress.update(task, advance=1, last=f"{policy} #{item_id} {mark}{share}")

        errors = [] if report_only else run_bench(client, items, names, store, max_steps, on_progress, concurrency)
    for _, e in errors:
        console.print(f"[red]error[/red] {e}", highlight=False)
    ids = {it.id for it in items}
    if best is None and "hera-verify" in names:
        best = "hera-verify"  # the product's policy at its calibrated knob: chosen before the run, not on its results
    summary = summarise({k: v for k, v in store.records.items() if k[1] in ids}, names, sweeps, best=best)
    common_ids = set.intersection(*({i for (p, i) in store.records if p == n and i in ids} for n in names)) if names else set()
    console.print(table(summary, f"{dataset}/{split}: {summary['n']} request(s) finished by every policy"))
    diffs = ", ".join(f"{r} [{ci[0]:+.2f}, {ci[1]:+.2f}]" for r, ci in summary.get("apgr_differences", {}).items() if ci)
    if diffs:
        home = policy_base(summary["best"])
        console.print(f"APGR of {home} minus each router's, paired bootstrap 95%: {diffs}", highlight=False)
    for p, m in summary["policies"].items():
        if policy_base(p).startswith("hera") and m["lost_vs_llm"]:
            stages = ", ".join(f"{k} {v}" for k, v in sorted(m["lost_edge_stages"].items()))
            why = (f"their SLM subtasks were placed by {stages}" if stages
                   else "none of them ran a subtask on the SLM (the LLM's own runs differed)")
            console.print(f"  {p}: lost {m['lost_vs_llm']} request(s) all-llm got right (gained {m['gained_vs_llm']}); {why}",
                          highlight=False)
    stem = output_stem(out, dataset, split)
    previous = stem.with_suffix(".json")
    before = json.loads(previous.read_text()) if report_only and previous.exists() else {}
    # the command (and code) that ran the recorded runs stay the result's; this one only reported them
    result = result_json(dataset, split, before.get("command") or command, summary, meta)
    if report_only:
        result["reported_by"] = {"command": command, "commit": result["commit"]}
        result["commit"] = before.get("commit") or result["commit"]
    # What was asked against what every policy finished: a request dropped by one policy leaves the
    # common set (``n``) and shows here, with the failed runs of every invocation that recorded these
    # runs (the store's side file) and of this one.
    result["requested"] = len(items)
    # The network isolation model-written code was scored under (code data sets run it).
    from hera_ray.eval.sandbox import PYTHON_BLOCK, isolation

    result["sandbox"] = list(isolation())
    code = any(it.kind == "code" for it in items)
    # ... and what each scored run's program ran under, as it was recorded (runs from before this was
    # kept have none: "not recorded")
    if code:
        code_runs = [r for k, r in store.records.items() if k[1] in ids and k[0] in names]
        result["sandbox_runs"] = dict(Counter(" + ".join(r["sandbox"]) if r.get("sandbox") else
                                              ("no program" if "sandbox" in r else "not recorded") for r in code_runs))
    if result["sandbox"] == [PYTHON_BLOCK] and code:
        console.print("[yellow]sandbox[/yellow]: this host allows neither a network namespace nor a seccomp filter; "
                      "model-written code ran behind the Python socket block only", highlight=False)
    result["coverage"] = {p: {"finished": sum(store.done(p, i) for i in ids),
                              "errors": sum(e["policy"] == p and e["item"] in ids for e in store.errors),
                              "errors_this_run": sum(ep == p for ep, _ in errors)} for p in names}
    for p, c in result["coverage"].items():
        if c["finished"] < len(items) or c["errors"]:
            console.print(f"[yellow]{p}[/yellow]: {c['finished']} of {len(items)} request(s) finished; "
                          f"{c['errors']} failed run(s) recorded ({c['errors_this_run']} in this run, the rest before "
                          f"it, in {store.errors_path.name}); the figures cover the {summary['n']} every policy finished",
                          highlight=False)
    # The runs' time: the sum of every recorded run's wall time over the common requests, over however
    # many sessions it took (with --concurrency k the elapsed time is up to k times less).
    result["runs_wall_s"] = sum(float(r.get("wall_s", 0.0)) for k, r in store.records.items()
                                if k[1] in common_ids and k[0] in names)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(stem.with_suffix(".png"), f"{dataset}/{split}", summary, sweeps)
    console.print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}", highlight=False)
    return result
