"""Cloud replica autoscaling, measured: how long Serve takes to go from 1 cloud replica to 2 under
load, and back to 1 once the load stops.

Runs against a cluster ``hera up`` started with a low ``target_ongoing_requests`` (``bench/issue7.sh``
does it with ``bench/autoscale.yaml``). Each round: ``--clients`` loops of all-llm agent requests
until the cloud deployment has ``--to`` replicas RUNNING (scale-up time from the first request),
then no load until it is back at ``min_replicas`` (scale-down time from the last answer).
Every request must be answered. Prints a table, writes bench/results/autoscale.json and a PNG of
replicas and requests in flight over time.

    python bench/autoscale.py [--rounds 3] [--clients 4] [--to 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Count from 1 to 40, one number per line, then say which of them are prime."


class Round:
    """One scale-up / scale-down cycle, sampled every ``period`` seconds."""

    def __init__(self, url: str, app: str, clients: int, target: int, low: int, timeout_s: float, period: float = 0.25):
        self.url, self.app, self.clients, self.target, self.low = url, app, clients, target, low
        self.timeout_s, self.period = timeout_s, period
        self.samples: list[tuple[float, int, int]] = []  # (t, running replicas, requests in flight)
        self.in_flight = 0
        self.statuses: dict[int, int] = {}
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def running(self) -> int:
        from cloud_node.deployment import replica_states

        return replica_states(self.app).get("RUNNING", 0)

    def _client(self, i: int, stop: threading.Event) -> None:
        n = 0
        with httpx.Client(timeout=600) as http:
            while not stop.is_set():
                with self.lock:
                    self.in_flight += 1
                try:
                    r = http.post(f"{self.url}/v1/agent/runs",
                                  json={"question": QUESTION, "policy": "all-llm", "request_id": f"scale-{i}-{n}"})
                    with self.lock:
                        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                    if r.status_code != 200:
                        self.failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.failures.append(f"{type(e).__name__}: {e}")
                finally:
                    with self.lock:
                        self.in_flight -= 1
                n += 1

    def run(self, progress, task) -> dict:
        t0 = time.monotonic()
        stop = threading.Event()
        threads = [threading.Thread(target=self._client, args=(i, stop), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        up_s = down_s = None
        while time.monotonic() - t0 < self.timeout_s:
            n = self.running()
            self.samples.append((time.monotonic() - t0, n, self.in_flight))
            progress.update(task, description=f"load: {n} replica(s), {self.in_flight} in flight")
            if n >= self.target:
                up_s = time.monotonic() - t0
                break
            time.sleep(self.period)
        stop.set()
        for t in threads:  # each finishes the request it has in flight
            while t.is_alive():
                t.join(self.period)
                self.samples.append((time.monotonic() - t0, self.running(), self.in_flight))
        idle_from = time.monotonic()
        while time.monotonic() - idle_from < self.timeout_s:
            n = self.running()
            self.samples.append((time.monotonic() - t0, n, 0))
            progress.update(task, description=f"idle: {n} replica(s)")
            if n <= self.low:
                down_s = time.monotonic() - idle_from
                break
            time.sleep(self.period)
        return {"scale_up_s": up_s, "scale_down_s": down_s, "requests": sum(self.statuses.values()),
                "statuses": self.statuses, "failures": self.failures[:5], "max_replicas_seen": max(s[1] for s in self.samples)}


def summary(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    return {"median": round(statistics.median(got), 2) if got else None, "max": round(max(got), 2) if got else None,
            "missed": len(values) - len(got)}


def plot(rounds: list[Round], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rounds), 1, figsize=(9, 2.6 * len(rounds)), squeeze=False)
    for i, (ax, r) in enumerate(zip(axes[:, 0], rounds)):
        t = [s[0] for s in r.samples]
        ax.step(t, [s[1] for s in r.samples], where="post", label="cloud replicas RUNNING", color="tab:blue")
        ax.step(t, [s[2] for s in r.samples], where="post", label="all-llm requests in flight", color="tab:orange", alpha=0.7)
        ax.set_ylabel(f"round {i + 1}")
        ax.set_ylim(bottom=0)
        if i == 0:
            ax.legend(loc="upper right")
    axes[-1, 0].set_xlabel("seconds from the first request")
    fig.suptitle("Cloud LLM autoscaling under load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=4, help="concurrent all-llm request loops during the load")
    p.add_argument("--to", type=int, default=2, help="replicas RUNNING that end the load phase")
    p.add_argument("--timeout", type=float, default=300, help="longest each phase may take, in seconds")
    p.add_argument("--url", help="ingress URL (default: the cluster hera up started)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "autoscale.json")
    args = p.parse_args()

    from hera_ray.cluster import attach
    from hera_ray.eval.bench import resolve_url

    state = attach()
    url = resolve_url(args.url)
    console = Console()
    rounds: list[Round] = []
    results = []
    with Progress(TextColumn("round {task.fields[round]}"), TextColumn("{task.description}"), BarColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("", total=args.rounds, round=0)
        for i in range(args.rounds):
            progress.update(task, round=i + 1)
            r = Round(url, state.app_name, args.clients, args.to, 1, args.timeout)
            results.append(r.run(progress, task))
            rounds.append(r)
            progress.advance(task)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    out = {"command": "python bench/autoscale.py " + " ".join(sys.argv[1:]), "commit": commit,
           "cloud_model": health.get("cloud_model"), "clients": args.clients, "to": args.to,
           "summary": {"scale_up_s": summary([r["scale_up_s"] for r in results]),
                       "scale_down_s": summary([r["scale_down_s"] for r in results])},
           "rounds": results}
    table = Table(title=f"cloud autoscaling, {args.clients} all-llm clients, 1 → {args.to} → 1 replicas")
    for col in ("round", "scale-up s", "scale-down s", "requests", "non-200", "max replicas"):
        table.add_column(col, justify="right")
    for i, r in enumerate(results):
        fmt = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
        table.add_row(str(i + 1), fmt(r["scale_up_s"]), fmt(r["scale_down_s"]), str(r["requests"]),
                      str(r["requests"] - r["statuses"].get(200, 0)), str(r["max_replicas_seen"]))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(rounds, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    bad = any(r["scale_up_s"] is None or r["scale_down_s"] is None or r["requests"] != r["statuses"].get(200, 0)
              for r in results)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
