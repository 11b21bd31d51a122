#!/usr/bin/env python3
"""What does serving llama.cpp over gRPC cost? The same prompt and the same generated tokens
(temperature 0), sent directly through llama-cpp-python in this process and through a real
EdgeWorker process on 127.0.0.1. Prints the median per-request time of each and their ratio;
writes bench/results/edge_overhead.json (top-level "ratio"; target <= 1.05).

    python bench/edge_overhead.py [--runs 12] [--max-tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from hera_ray.launcher import start_edge  # noqa: E402
from hera_ray.models import resolve_model  # noqa: E402
from hera_ray.wire import edge_pb2, edge_pb2_grpc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = (
    "<|im_start|>user\nWrite a detailed story about a robot who learns to paint landscapes, "
    "with many scenes.<|im_end|>\n<|im_start|>assistant\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12, help="timed requests per path (after 2 warm-ups)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads, the same for both paths")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "edge_overhead.json")
    args = ap.parse_args()
    console = Console()

    from llama_cpp import Llama

    model = resolve_model(args.model)
    llm = Llama(model_path=str(model.path), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, verbose=False)

    def direct() -> tuple[float, str, int]:
        t0 = time.perf_counter()
        out = llm.create_completion(PROMPT, max_tokens=args.max_tokens, temperature=0.0, top_p=1.0, min_p=0.0)
        return time.perf_counter() - t0, out["choices"][0]["text"], out["usage"]["completion_tokens"]

    with tempfile.TemporaryDirectory(prefix="hera-bench-") as tmp:
        edge = start_edge(Path(tmp), "edge-bench", model=args.model, threads=args.threads,
                          extra_args=["--n-ctx", "2048"])
        try:
            channel = grpc.insecure_channel(edge.address)
            stub = edge_pb2_grpc.EdgeWorkerStub(channel)
            request = edge_pb2.GenerateRequest(prompt=PROMPT, max_tokens=args.max_tokens, temperature=0.0)

            def via_grpc() -> tuple[float, str, int]:
                t0 = time.perf_counter()
                reply = stub.Generate(request, timeout=300)
                return time.perf_counter() - t0, reply.text, reply.completion_tokens

            times: dict[str, list[float]] = {"direct": [], "grpc": []}
            outputs: dict[str, tuple[str, int]] = {}
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("alternating direct / gRPC requests", total=2 * (args.runs + 2))
                for i in range(args.runs + 2):
                    # Alternate, so drift in machine speed hits both paths alike.
                    for name, fn in (("direct", direct), ("grpc", via_grpc)) if i % 2 == 0 else (("grpc", via_grpc), ("direct", direct)):
                        elapsed, text, n = fn()
                        outputs[name] = (text, n)
                        if i >= 2:
                            times[name].append(elapsed)
                        progress.advance(task)
            channel.close()
        finally:
            edge.stop()

    same = outputs["direct"] == outputs["grpc"]
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["grpc"] / med["direct"]
    table = Table(title=f"edge overhead: {args.max_tokens} tokens, temperature 0, {args.threads} thread(s), {args.runs} runs")
    for col in ("path", "median s", "min s", "max s", "tokens", "tok/s"):
        table.add_column(col, justify="right")
    for name in ("direct", "grpc"):
        v = times[name]
        n = outputs[name][1]
        table.add_row(name, f"{med[name]:.4f}", f"{min(v):.4f}", f"{max(v):.4f}", str(n), f"{n / med[name]:.1f}")
    console.print(table)
    verdict = "meets" if ratio <= 1.05 else "misses"
    console.print(f"ratio gRPC / direct = [bold]{ratio:.4f}[/bold] ({verdict} the target <= 1.05); "
                  f"same text and token count both ways: {same}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {
        "command": "python bench/edge_overhead.py " + " ".join(sys.argv[1:]),
        "commit": commit,
        "ratio": ratio,
        "target": 1.05,
        "median_s": med,
        "runs_s": times,
        "completion_tokens": {k: v[1] for k, v in outputs.items()},
        "same_output": same,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "model": args.model,
        "machine": {"cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
