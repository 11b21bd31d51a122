#!/usr/bin/env python3
"""Does the runtime hold under load? ``--concurrency`` clients (32) each send agent requests back to
back for ``--duration`` seconds (300) against the running cluster (``hera up --local-edges 2``),
with GSM8K test questions. Then no new request starts, and every request in flight is awaited.

Each request carries its own id, and its answer must carry it back:
- completed: answered 200 with its own id;
- errors: answered with any other status (a 429 is counted apart as ``throttled`` and the request
  is sent again after the server's Retry-After: that is backpressure, not a failure; a request still
  refused when the run's time is up is not sent again and counts as ``refused``: the server said
  no at once, and the client knows it);
- lost: no answer at all (connection dropped, or still unanswered ``--drain`` seconds after the end);
- duplicates: an id answered twice, or an answer with another request's id.

Every request sent ends as exactly one of completed, errors, lost or refused at end (the JSON's
``outcomes``, which must add up to ``sent``); duplicates are counted besides.

Two settings, each with its own targets, and a verdict that names each one met or missed:
- **stress** (the default, 32 clients): offered load far past capacity. Targets: 0 errors, 0 lost,
  0 duplicates. Refused-at-end requests are reported (count and share of offered) but are the
  expected answer to overload.
- **soak** (``--soak``: 4 clients for 600 s unless given): offered load at or below the measured
  capacity (``max_concurrent_runs``). Targets: 0 refused at end, 0 throttled (429s, even those
  retried and then admitted: at or below capacity nothing should be turned away), 0 errors, 0 lost,
  0 duplicates.

The JSON records the cluster's ``generation_cache`` (from /healthz); a cluster started with one
answers repeated temperature-0 steps from the cache, so its latencies are not the engines' (the
run warns).

Prints a table and writes bench/results/load.json (``load_soak.json`` with ``--soak``): the
outcomes, the share of offered requests that completed, offered / admitted / completed
throughput, latency percentiles, the targets and the verdict; and a PNG of latency over time and
throughput.

    python bench/load.py [--concurrency 32] [--duration 300] [--policy hera] [--url URL]
    python bench/load.py --soak            # 4 clients x 600 s, target 0 refused, 0 throttled, 0 errors, 0 lost
    python bench/load.py --overload 32     # backpressure: 32 requests at once, past the ingress's 8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hera_ray.eval.bench import git_commit, resolve_url
from hera_ray.eval.datasets import load

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def targets(soak: bool) -> dict[str, int]:
    """Each setting's targets (outcome -> most allowed). Stress: 0 errors, 0 lost, 0 duplicates; its
    refusals are overload's expected answer. Soak runs at or below capacity, so nothing may be
    refused either: 0 refused at end and 0 throttled 429s (a 429 retried and then admitted still
    turned the request away once)."""
    return {**({"refused_at_end": 0, "throttled_429": 0} if soak else {}), "errors": 0, "lost": 0, "duplicates": 0}


def verdict(measured: dict[str, int], soak: bool) -> dict[str, dict]:
    """Per target: the target, what was measured, and whether it was met."""
    return {k: {"target": v, "measured": measured[k], "met": measured[k] <= v} for k, v in targets(soak).items()}


class Load:
    def __init__(self, url: str, policy: str, api_key: str | None, questions: list[str], request_timeout_s: float):
        self.url, self.policy = url, policy
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.questions = itertools.cycle(questions)
        self.timeout = httpx.Timeout(request_timeout_s, connect=10)
        self.latencies: list[tuple[float, float]] = []  # (finished at, latency) of completed requests
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self.lost: list[str] = []
        self.answered: Counter[str] = Counter()
        self.sent: set[str] = set()
        self.pending: set[str] = set()  # sent and not yet answered (nor failed)
        self.throttled = 0
        self.refused: list[str] = []  # still refused (429) when the run's time was up: not sent again
        self.until = float("inf")
        self.slm_share: list[float] = []
        self.served: list[float] = []  # the admitted attempt's own latency (the time refused left out)
        self.t0 = time.monotonic()

    async def one(self, client: httpx.AsyncClient) -> None:
        """One request, sent again after each 429 until it is answered otherwise."""
        request_id = f"load-{uuid.uuid4().hex[:12]}"
        self.sent.add(request_id)
        self.pending.add(request_id)
        body = {"question": next(self.questions), "policy": self.policy, "request_id": request_id}
        t0 = time.monotonic()
        while True:
            attempt_t0 = time.monotonic()
            try:
                reply = await client.post(f"{self.url}/v1/agent/runs", json=body, headers=self.headers)
            except httpx.HTTPError as e:
                self.pending.discard(request_id)
                self.lost.append(f"{request_id}: {type(e).__name__}: {e}")
                return
            self.statuses[reply.status_code] += 1
            if reply.status_code != 429:
                break
            self.throttled += 1
            if time.monotonic() >= self.until:
                self.pending.discard(request_id)
                self.refused.append(request_id)
                return
            await asyncio.sleep(float(reply.headers.get("retry-after", "1") or 1))
        self.pending.discard(request_id)
        if reply.status_code != 200:
            self.errors.append(f"{request_id}: HTTP {reply.status_code}: {reply.text[:300]}")
            return
        run = reply.json()
        self.answered[run.get("request_id", "?")] += 1
        if run.get("request_id") != request_id:
            self.errors.append(f"{request_id}: answered with another id {run.get('request_id')!r}")
            return
        self.latencies.append((time.monotonic() - self.t0, time.monotonic() - t0))
        self.served.append(time.monotonic() - attempt_t0)
        self.slm_share.append(run.get("slm_share", 0.0))

    async def client_loop(self, client: httpx.AsyncClient, until: float, progress, task) -> None:
        while time.monotonic() < until:
            await self.one(client)
            progress.update(task, completed=min(time.monotonic() - self.t0, until - self.t0), refresh=False,
                            description=self.describe())

    def describe(self) -> str:
        return (f"done {len(self.latencies)} · errors {len(self.errors)} · lost {len(self.lost)} · "
                f"429s {self.throttled} · in flight {len(self.pending)}")


async def run(args) -> dict:
    url = resolve_url(args.url)
    questions = [item.question for item in load("gsm8k", "test")]
    load_ = Load(url, args.policy, args.api_key or os.environ.get("HERA_API_KEY"), questions, args.drain)
    console = Console()
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=load_.timeout, limits=limits) as client:
        health = (await client.get(f"{url}/healthz")).json()
        console.print(f"[bold]{url}[/]: {health.get('nodes_up')} edge nodes up, cloud {health.get('cloud_model')}; "
                      f"{args.concurrency} clients × {args.duration:.0f} s, policy {args.policy}")
        if health.get("generation_cache"):
            console.print(f"[yellow]the cluster runs with a generation cache ({health['generation_cache']}): repeated "
                          "steps are answered from it, so these latencies are not the engines'[/]")
        until = load_.until = time.monotonic() + args.duration
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task(load_.describe(), total=args.duration)
            clients = [asyncio.create_task(load_.client_loop(client, until, progress, task)) for _ in range(args.concurrency)]
            done, pending = await asyncio.wait(clients, timeout=args.duration + args.drain)
            for t in pending:  # still unanswered long after the end: their requests are lost
                t.cancel()
            for t in done:
                if t.exception() is not None:
                    load_.errors.append(f"client crashed: {t.exception()!r}")
    lat = [x for _, x in load_.latencies]
    elapsed = max((t for t, _ in load_.latencies), default=args.duration)
    duplicates = sum(c - 1 for c in load_.answered.values() if c > 1) + sum(
        1 for rid in load_.answered if rid not in load_.sent)
    commit = git_commit(ROOT)
    sent = len(load_.sent)
    outcomes = {"completed": len(lat), "errors": len(load_.errors), "lost": len(load_.lost) + len(load_.pending),
                "refused_at_end": len(load_.refused)}
    # A client that crashed, or an answer with another request's id, is an error without a request of its own.
    unaccounted = sent - sum(outcomes.values())
    admitted = sent - outcomes["refused_at_end"]
    checks = verdict({**outcomes, "duplicates": duplicates, "throttled_429": load_.throttled}, args.soak)
    result = {
        "command": "python bench/load.py " + " ".join(sys.argv[1:]), "commit": commit, "url": url,
        "setting": "soak" if args.soak else "stress",
        "policy": args.policy, "concurrency": args.concurrency, "duration_s": args.duration,
        "cloud_model": health.get("cloud_model"), "edge_nodes": health.get("nodes_up"),
        "max_concurrent_runs": health.get("max_concurrent_runs"),
        # An evaluation setting: with it, repeated temperature-0 steps are answered from a file.
        "generation_cache": health.get("generation_cache"),
        "sent": sent, "outcomes": outcomes, "outcomes_add_up": unaccounted == 0,
        "duplicates": duplicates, "throttled_429": load_.throttled,
        "completed_share": round(outcomes["completed"] / sent, 3) if sent else 0.0,
        # Per minute of the run: requests offered (distinct, not counting their 429 retries), admitted
        # (past the 429s), and completed.
        "offered_per_min": round(60 * sent / args.duration, 2) if args.duration else 0.0,
        "admitted_per_min": round(60 * admitted / args.duration, 2) if args.duration else 0.0,
        "throughput_per_min": round(60 * len(lat) / elapsed, 2) if elapsed else 0.0,
        "statuses": dict(sorted(load_.statuses.items())),
        "p50_s": round(percentile(lat, 0.5), 2), "p95_s": round(percentile(lat, 0.95), 2),
        "max_s": round(max(lat, default=0.0), 2),
        "p50_admitted_s": round(percentile(load_.served, 0.5), 2), "p95_admitted_s": round(percentile(load_.served, 0.95), 2), "mean_s": round(statistics.fmean(lat), 2) if lat else 0.0,
        "mean_slm_share": round(statistics.fmean(load_.slm_share), 3) if load_.slm_share else 0.0,
        "targets": checks, "met": all(v["met"] for v in checks.values()) and unaccounted == 0,
        "error_samples": load_.errors[:10], "lost_samples": load_.lost[:10],
    }
    table = Table(title=f"load ({result['setting']}): {args.concurrency} concurrent agent requests for {args.duration:.0f} s "
                        f"({args.policy}); {sent} offered")
    for col in ("completed", "errors", "lost", "refused at end", "duplicates", "completed share", "429s",
                "offered/min", "admitted/min", "completed/min", "p50 s", "p95 s", "max s", "SLM share"):
        table.add_column(col, justify="right")
    table.add_row(*map(str, (outcomes["completed"], outcomes["errors"], outcomes["lost"], outcomes["refused_at_end"],
                             duplicates, f"{result['completed_share']:.0%}", load_.throttled, result["offered_per_min"],
                             result["admitted_per_min"], result["throughput_per_min"], result["p50_s"], result["p95_s"],
                             result["max_s"], result["mean_slm_share"])))
    console.print(table)
    for k, v in checks.items():
        console.print(f"target {k.replace('_', ' ')} = {v['target']}: measured {v['measured']} — "
                      + ("[green]met[/]" if v["met"] else "[red]missed[/]"))
    if not args.soak:
        console.print(f"refused at end: {outcomes['refused_at_end']} of {sent} offered "
                      f"({outcomes['refused_at_end'] / max(sent, 1):.0%}): overload answered with 429, no target here")
    if unaccounted:
        console.print(f"[red]{unaccounted} request(s) have no outcome[/] (the outcomes do not add up to those sent)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(load_.latencies, args, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return result


async def overload(args) -> dict:
    """Backpressure: ``--overload`` requests at once (one step each, no retries). Past the
    ingress's ``max_concurrent_runs`` they must get 429 with Retry-After at once, not wait."""
    url = resolve_url(args.url)
    key = args.api_key or os.environ.get("HERA_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    console = Console()
    limits = httpx.Limits(max_connections=args.overload + 8, max_keepalive_connections=args.overload + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900, connect=30), limits=limits) as client:
        async def one(i: int) -> tuple[int, float, str | None]:
            t0 = time.monotonic()
            r = await client.post(f"{url}/v1/agent/runs", headers=headers,
                                  json={"question": "What is 2 + 3?", "policy": "all-slm", "max_steps": 1,
                                        "request_id": f"overload-{i}"})
            return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")

        replies = await asyncio.gather(*(one(i) for i in range(args.overload)))
    refused = [t for status, t, _ in replies if status == 429]
    served = [t for status, t, _ in replies if status == 200]
    result = {"command": "python bench/load.py " + " ".join(sys.argv[1:]), "sent_at_once": args.overload,
              "statuses": dict(sorted(Counter(s for s, _, _ in replies).items())),
              "refused_429": len(refused), "retry_after_given": sum(1 for s, _, ra in replies if s == 429 and ra),
              "p50_429_s": round(percentile(refused, 0.5), 3), "max_429_s": round(max(refused, default=0.0), 3),
              "p50_200_s": round(percentile(served, 0.5), 2), "max_200_s": round(max(served, default=0.0), 2)}
    table = Table(title=f"overload: {args.overload} one-step requests at once")
    for col in ("200", "429", "other", "429 with Retry-After", "429 p50 s", "429 max s", "200 p50 s", "200 max s"):
        table.add_column(col, justify="right")
    other = len(replies) - len(refused) - len(served)
    table.add_row(*map(str, (len(served), len(refused), other, result["retry_after_given"], result["p50_429_s"],
                             result["max_429_s"], result["p50_200_s"], result["max_200_s"])))
    console.print(table)
    out = args.out.with_name("overload.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return result


def plot(latencies: list[tuple[float, float]], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    if latencies:
        ends, lat = zip(*latencies)
        ax1.scatter(ends, lat, s=8)
        per_bin = Counter(int(t // 30) for t in ends)
        bins = range(0, int(max(ends) // 30) + 1)
        ax2.bar([b * 30 + 15 for b in bins], [per_bin.get(b, 0) * 2 for b in bins], width=27)
    ax1.set_ylabel("latency (s)")
    ax1.set_title(f"{args.concurrency} concurrent agent requests ({args.policy})")
    ax2.set_ylabel("completed per minute")
    ax2.set_xlabel("seconds since start (request finished)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="ingress URL (default: $HERA_URL, else the cluster `hera up` started here)")
    p.add_argument("--concurrency", type=int, default=None, help="clients sending requests back to back [32; --soak: 4]")
    p.add_argument("--duration", type=float, default=None, help="seconds during which new requests start [300; --soak: 600]")
    p.add_argument("--soak", action="store_true",
                   help="offered load at or below capacity (4 clients x 600 s unless given); target 0 refused, 0 errors, 0 lost")
    p.add_argument("--drain", type=float, default=900, help="seconds after the end to wait for requests in flight")
    p.add_argument("--policy", default="hera", help="routing policy (the request's model name)")
    p.add_argument("--api-key", help="bearer key (default: $HERA_API_KEY)")
    p.add_argument("--out", type=Path, default=None, help="[bench/results/load.json; --soak: load_soak.json]")
    p.add_argument("--overload", type=int, default=0,
                   help="instead: send this many one-step requests at once and count the 429s (writes overload.json)")
    args = p.parse_args()
    args.concurrency = args.concurrency or (4 if args.soak else 32)
    args.duration = args.duration or (600.0 if args.soak else 300.0)
    args.out = args.out or ROOT / "bench" / "results" / ("load_soak.json" if args.soak else "load.json")
    if args.overload:
        result = asyncio.run(overload(args))
        sys.exit(0 if not set(result["statuses"]) - {200, 429} else 1)
    result = asyncio.run(run(args))
    sys.exit(0 if result["met"] else 1)


if __name__ == "__main__":
    main()
