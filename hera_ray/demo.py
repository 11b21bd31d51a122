"""``make demo`` / ``hera demo``: a registry and local edge nodes serving the bundled SLM.

It sends a few prompts, each to the least-loaded edge node, and prints which node answered,
the tokens and the speed. Later issues grow it into the full HERA job.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hera_ray.launcher import LocalCluster

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three primary colors.",
    "Write a Python one-liner that reverses a string s.",
    "Tom has 3 apples and buys 2 more. How many apples does he have?",
    "Give one tip for writing clear emails.",
    "What does CPU stand for?",
]


async def _send_all(nodes: list[tuple[str, str]], prompts: list[str], max_tokens: int) -> list[dict]:
    import grpc

    from hera_ray.wire import edge_pb2, edge_pb2_grpc

    channels = {nid: grpc.aio.insecure_channel(addr) for nid, addr in nodes}
    stubs = {nid: edge_pb2_grpc.EdgeWorkerStub(ch) for nid, ch in channels.items()}
    outstanding = {nid: 0 for nid, _ in nodes}

    async def one(prompt: str) -> dict:
        node_id = min(outstanding, key=lambda n: (outstanding[n], n))  # least-loaded node
        outstanding[node_id] += 1
        request = edge_pb2.GenerateRequest(max_tokens=max_tokens, temperature=0.0)
        request.messages.add(role="user", content=prompt)
        t0 = time.perf_counter()
        try:
            reply = await stubs[node_id].Generate(request, timeout=300)
        finally:
            outstanding[node_id] -= 1
        return {"prompt": prompt, "reply": reply, "latency_s": time.perf_counter() - t0}

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        for ch in channels.values():
            await ch.close()


def run_demo(edges: int = 2, model: str = "smollm2-135m", max_tokens: int = 48, console: Console | None = None) -> list[dict]:
    from hera_ray.cli import list_nodes
    from hera_ray.config import read_tokens

    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="hera-demo-") as tmp:
        console.print(f"[bold]Starting a registry and {edges} edge node(s) serving {model}[/bold] (logs in {tmp})")
        t0 = time.perf_counter()
        with LocalCluster(Path(tmp), edges=edges, model=model) as cluster:
            console.print(f"  registry at {cluster.registry.address}; edges "
                          + ", ".join(f"{n.node_id} at {n.address}" for n in cluster.nodes)
                          + f" — up in {time.perf_counter() - t0:.1f}s")
            results = asyncio.run(_send_all([(n.node_id, n.address) for n in cluster.nodes], PROMPTS, max_tokens))
            table = Table(title=f"{len(PROMPTS)} prompts over {edges} edge node(s), at most {max_tokens} tokens, temperature 0")
            for col in ("#", "node", "prompt tok", "reply tok", "ttft ms", "tok/s", "latency s"):
                table.add_column(col, justify="left" if col == "node" else "right", no_wrap=True)
            for i, r in enumerate(results, 1):
                rep = r["reply"]
                speed = (rep.completion_tokens - 1) / rep.decode_s if rep.completion_tokens > 1 and rep.decode_s > 0 else 0.0
                table.add_row(str(i), rep.node_id, str(rep.prompt_tokens), str(rep.completion_tokens),
                              f"{rep.ttft_s * 1000:.0f}", f"{speed:.1f}", f"{r['latency_s']:.2f}")
            for i, r in enumerate(results, 1):
                reply = " ".join(r["reply"].text.split())
                console.print(f"[bold]{i}.[/bold] {r['prompt']}\n   [green]{r['reply'].node_id}:[/green] "
                              f"{reply[:150]}{'…' if len(reply) > 150 else ''}", highlight=False)
            console.print(table)
            time.sleep(1.2)  # let one heartbeat carry the final load to the registry
            nodes = list_nodes(cluster.registry.address, read_tokens(cluster.token_file)[0])
            reg = Table(title="registry's node table")
            for col in ("node", "state", "completed", "tokens generated", "tok/s (EWMA)"):
                reg.add_column(col)
            for n in nodes:
                reg.add_row(n["node_id"], n["state"], str(n["load"]["completed"]), str(n["load"]["tokens_generated"]),
                            f"{n['load']['tokens_per_s']:.1f}")
            console.print(reg)
            console.print("Draining the edge nodes (SIGTERM) and stopping the registry.")
        return results
