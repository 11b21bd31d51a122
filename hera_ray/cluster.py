"""Operations: ``hera up`` / ``hera down``.

``up`` joins the Ray cluster at ``RAY_ADDRESS`` or starts a local head (``ray start --head``),
creates the SubtaskScheduler actor (which runs the EdgeRegistry), deploys the Serve application,
optionally starts local edge nodes, and returns once every part reports healthy. It records
what it started in ``~/.cache/hera-ray/cluster/state.json``; ``down`` stops exactly that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hera_ray.config import HeraConfig, default_token_file
from hera_ray.errors import HeraError
from hera_ray.launcher import LaunchError, start_edge
from hera_ray.models import cache_dir
from hera_ray.tls import cli_args as tls_cli_args

# Ray turns on token auth (~/.ray/auth_token) after its first start; drivers must then say so.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


@dataclass
class ClusterState:
    started_ray: bool = False
    ray_address: str = ""
    namespace: str = "hera"
    app_name: str = "hera"
    ingress_url: str = ""
    registry: str = ""
    token_file: str = ""
    edge_pids: list[int] = field(default_factory=list)
    edge_addresses: list[str] = field(default_factory=list)
    #: The settings the Serve app was deployed with (``hera learn --apply`` redeploys it with them).
    config: dict = field(default_factory=dict)
    #: The estimator set ``hera learn --apply`` swapped in, if any (else ``hera.estimators``).
    estimators_serving: str = ""


# For the Ray processes a node starts: Ray's client server forks its per-client servers while gRPC
# threads run and sometimes dies doing so ("Starting Ray client server failed", ray-project/ray#63202).
RAY_NODE_ENV = {"GRPC_ENABLE_FORK_SUPPORT": "false"}

# A local head stays on loopback: Ray would otherwise advertise (and dial) the host's own IP.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _ray_env() -> None:
    """Set before Ray is imported: Ray reads these at import time. Users may override them."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)


def state_path() -> Path:
    return cache_dir() / "cluster" / "state.json"


def load_state() -> ClusterState | None:
    try:
        return ClusterState(**json.loads(state_path().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _save_state(state: ClusterState) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)  # it holds the settings (a store URL may carry a password)
    path.write_text(json.dumps(asdict(state), indent=2))


def _ray_bin() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def local_ray_temp_dir(port: int) -> Path:
    """The temp dir of a local head started on ``port``: short (Ray's socket paths must fit in 107
    bytes) and its own, so stopping this head touches no other Ray cluster on the machine."""
    return Path(tempfile.gettempdir()) / f"hera-ray-{port}"


def ensure_ray_token() -> None:
    """Token auth is on (``RAY_AUTH_MODE=token``), and ``ray start`` refuses to start without a token:
    on a machine that never ran Ray, make one (``~/.ray/auth_token``, as ``ray.init()`` would)."""
    if os.environ.get("RAY_AUTH_TOKEN") or Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").exists():
        return
    out = subprocess.run([_ray_bin(), "get-auth-token", "--generate"], capture_output=True, text=True,
                         env={**RAY_ENV, **os.environ}, timeout=120)
    if out.returncode != 0:
        raise HeraError(f"could not make a Ray auth token (`ray get-auth-token --generate`): {out.stderr[-1000:]}")


def start_local_ray(num_cpus: int | None = None, object_store_bytes: int = 500_000_000,
                    port: int = 6379, client_port: int = 10001, dashboard_port: int = 8265,
                    metrics_port: int = 8090) -> str:
    """``ray start --head`` on this machine, in its own temp dir; returns the GCS address."""
    cmd = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--ray-client-server-port={client_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--metrics-export-port={metrics_port}",
           f"--num-cpus={num_cpus or max(8, os.cpu_count() or 1)}", f"--object-store-memory={object_store_bytes}",
           f"--temp-dir={local_ray_temp_dir(port)}", "--disable-usage-stats"]
    ensure_ray_token()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**RAY_ENV, **RAY_NODE_ENV, **os.environ}, timeout=180)
    if out.returncode != 0:
        raise HeraError(f"`ray start --head` failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return f"127.0.0.1:{port}"


def local_ray_processes(address: str) -> list:
    """The processes of the local head ``start_local_ray`` started at ``address`` (``psutil.Process``):
    those naming its temp dir or its address on their command line (GCS, raylet, monitors, the Ray
    client server) and their descendants (workers, agents, Serve replicas, which rename themselves
    ``ray::...``), this process excepted."""
    import psutil

    markers = (str(local_ray_temp_dir(int(address.rpartition(":")[2]))), f"--address={address}")
    mine: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid != os.getpid() and any(m in arg for arg in (proc.info["cmdline"] or ()) for m in markers):
            mine[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                mine.update({child.pid: child for child in proc.children(recursive=True) if child.pid != os.getpid()})
    return list(mine.values())


def stop_local_ray(address: str, timeout_s: float = 30.0) -> int:
    """Stop the local head ``start_local_ray`` started at ``address`` and every process of its cluster,
    and nothing else: unlike ``ray stop``, other Ray clusters on the machine keep running. Its
    processes (``local_ray_processes``) are all gathered before any is stopped. Returns how many."""
    import psutil

    procs = local_ray_processes(address)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def up(config: HeraConfig, local_edges: int = 0, edge_model: str | None = None, timeout_s: float = 900.0,
       log=print) -> ClusterState:
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.update(LOCAL_RAY_ENV)
    _ray_env()
    import ray
    from ray import serve

    from hera_ray.scheduler.actor import advertised_host, get_or_create_scheduler, host_port
    from hera_ray.serve.app import build_app

    t0 = time.monotonic()
    state = ClusterState(namespace=config.namespace, app_name=config.app_name)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log(f"joining the Ray cluster at {address}")
    else:
        log("starting a local Ray head (ray start --head)")
        address = start_local_ray()
        state.started_ray = True
    state.ray_address = address
    _save_state(state)  # so `hera down` can clean up even if the rest fails
    try:
        if not ray.is_initialized():
            ray.init(address=address, namespace=config.namespace, log_to_driver=False, logging_level=logging.WARNING)
        if not address.startswith("ray://"):  # RAY_ADDRESS=auto (cluster.yaml's head): record the real one for `hera down`
            state.ray_address = ray.get_runtime_context().gcs_address
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        token_file = config.scheduler.token_file or default_token_file()
        config = config.model_copy(update={"scheduler": config.scheduler.model_copy(update={"token_file": token_file})})
        actor = get_or_create_scheduler(config)
        try:
            ping = ray.get(actor.ping.remote(), timeout=60 + config.store.connect_timeout_s)
        except ray.exceptions.RayActorError as e:  # its constructor failed: say why (a store it cannot open, ...)
            raise _creation_error(e) from None
        state.registry, state.token_file = ping["registry"], str(token_file)
        log(f"scheduler actor up; edge registry at {state.registry}")

        serve.start(http_options={"host": config.ingress.host, "port": config.ingress.port})
        log(f"deploying the Serve app {config.app_name!r} (cloud LLM: {config.cloud.backend} {config.cloud.model})")
        build_app(config=config)  # a bad setting (keys file, estimator folder) fails here, in this process
        deploy_app(config, timeout_s=max(60.0, timeout_s - (time.monotonic() - t0)))
        state.config = config.model_dump(mode="json")
        # Serve's HTTP proxy runs on the head (and on nodes with replicas): with a wildcard ingress.host
        # (0.0.0.0), the URL to give out is the head node's address.
        state.ingress_url = f"http://{host_port(advertised_host(config.ingress.host, None, head_node_ip), config.ingress.port)}"
        _save_state(state)

        logs = cache_dir() / "cluster" / "logs"
        for i in range(local_edges):
            edge = start_edge(logs, f"edge-{i}", state.registry, token_file, model=edge_model or config.scheduler.edge_model,
                              extra_args=local_edge_args(config), detach=True)
            state.edge_pids.append(edge.pid)
            state.edge_addresses.append(edge.address)
            _save_state(state)
            log(f"edge node edge-{i} at {edge.address}")

        wait_healthy(state, local_edges, timeout_s - (time.monotonic() - t0))
    except BaseException:
        log("start-up failed: stopping what was started")
        down(log=log)
        raise
    log(f"hera-ray is up in {time.monotonic() - t0:.0f}s: {state.ingress_url}")
    return state


def local_edge_args(config: HeraConfig) -> list[str]:
    """The flags of ``hera edge serve`` that ``up`` gives the local edges it starts, beyond their name,
    model, registry and token (and that a tool restarting one must give it too): the cluster's TLS
    files, which they serve and dial the registry with, and the cloud's generation cache (an
    evaluation setting), which covers the local edges too."""
    cache = ["--generation-cache", str(config.cloud.generation_cache)] if config.cloud.generation_cache else []
    return tls_cli_args(config.scheduler.tls) + cache


def _creation_error(e: BaseException) -> BaseException:
    """The HeraError that failed an actor's constructor, found in Ray's wrapping of it, else ``e``."""
    seen, todo = set(), [e]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, HeraError):
            return HeraError(f"the scheduler actor could not start: {err.message}")
        todo += [getattr(err, "cause", None), getattr(err, "__cause__", None), getattr(err, "__context__", None)]
    # Ray keeps the constructor's traceback as text only: its last line names the error.
    import re

    found = re.findall(r"^hera_ray\.[\w.]+\.\w+: (.+)$", str(e), flags=re.MULTILINE)
    return HeraError(f"the scheduler actor could not start: {found[-1].strip()}") if found else e


def deploy_app(config: "HeraConfig", estimators_serving: str | None = None, timeout_s: float = 900.0) -> None:
    """Deploy (or update) the Serve app the declarative way, as ``serve deploy`` would: one
    application whose builder is ``hera_ray.serve.app:build_from_settings`` with the settings as
    its args. Deployed again with only ``estimators_serving`` changed, Serve keeps every replica
    and reconfigures the estimator deployment's in place (a user_config update)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from hera_ray.serve.estimators import ESTIMATOR_DEPLOYMENT

    from hera_ray.store import redact

    settings = config.model_dump(mode="json")
    if settings["store"]["url"]:  # Serve logs and shows an app's args: no password there (the ingress needs none)
        settings["store"]["url"] = redact(settings["store"]["url"])
    app: dict = {"name": config.app_name, "route_prefix": "/", "import_path": "hera_ray.serve.app:build_from_settings",
                 "args": {"config": settings}}
    if estimators_serving is not None:
        app["deployments"] = [{"name": ESTIMATOR_DEPLOYMENT, "user_config": {"path": str(estimators_serving)}}]
    client = _get_global_client()
    # A declarative deploy replaces every app deployed that way: keep the others on this Ray cluster.
    try:
        apps = (client.get_serve_details() or {}).get("applications") or {}
        others = [a["deployed_app_config"] for name, a in apps.items()
                  if name != config.app_name and a.get("deployed_app_config")]
    except Exception:  # noqa: BLE001 - no details yet: nothing to keep
        others = []
    schema = ServeDeploySchema.parse_obj({"http_options": {"host": config.ingress.host, "port": config.ingress.port},
                                          "applications": [*others, app]})
    client.deploy_apps(schema)
    deadline = time.monotonic() + timeout_s
    while True:  # until Serve has applied it: the app RUNNING on this config
        status = serve.status().applications.get(config.app_name)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise HeraError(f"the Serve app {config.app_name!r} failed to deploy: {status.message}")
        if status is not None and status.status == "RUNNING" and _deployed(config.app_name, estimators_serving):
            return
        if time.monotonic() > deadline:
            raise HeraError(f"the Serve app {config.app_name!r} did not become RUNNING within {timeout_s:.0f}s"
                            + (f": {status.status} {status.message}" if status is not None else ""))
        time.sleep(0.5)


def _deployed(app_name: str, estimators_serving: str | None) -> bool:
    """Whether the estimator deployment serves ``estimators_serving`` yet (None: nothing to check)."""
    if estimators_serving is None:
        return True
    from ray import serve

    from hera_ray.serve.estimators import ESTIMATOR_DEPLOYMENT

    app = serve.status().applications.get(app_name)
    deployment = app.deployments.get(ESTIMATOR_DEPLOYMENT) if app is not None else None
    if deployment is None or deployment.status != "HEALTHY":  # replicas still updating
        return False
    try:
        path = serve.get_deployment_handle(ESTIMATOR_DEPLOYMENT, app_name=app_name).serving.remote().result(timeout_s=30)
    except Exception:  # noqa: BLE001 - replicas still updating
        return False
    return path == str(estimators_serving)


def apply_estimators(path: str, log=print) -> ClusterState:
    """Serve the estimator set at ``path`` in the running cluster: the estimator deployment's
    user_config changes (Serve reconfigures its replicas in place, one by one: no request is
    dropped) and the scheduler actor takes the set's step classifier."""
    import ray

    from hera_ray.config import HeraConfig
    from hera_ray.estimators.trained import estimators_path
    from hera_ray.scheduler.actor import SCHEDULER_NAME
    from hera_ray.serve.app import build_app

    state = load_state()
    if state is None or not state.config:
        raise HeraError("no running hera-ray started by `hera up` on this machine (its settings are needed to redeploy)")
    attach(state)
    config = HeraConfig.model_validate(state.config)
    if not config.hera.enabled:
        raise HeraError("the running cluster has no estimator deployment (hera.enabled is false)")
    build_app(config=config, estimators_serving=path)  # a folder that is no estimator set fails here
    previous = state.estimators_serving or str(estimators_path(config.hera.estimators))
    try:
        deploy_app(config, estimators_serving=str(estimators_path(path)), timeout_s=900)
    except BaseException:
        log(f"the estimator deployment did not take {path}: going back to {previous}")
        deploy_app(config, estimators_serving=previous, timeout_s=900)
        raise
    reloaded = ray.get(ray.get_actor(SCHEDULER_NAME, namespace=config.namespace).reload_verifier.remote(str(path)), timeout=60)
    state.estimators_serving = str(path)
    _save_state(state)
    log(f"serving the estimator set {path}" + ("; hera-verify's step classifier from it" if reloaded else ""))
    return state


def head_node_ip() -> str:
    """The address of the Ray cluster's head node (this driver must be connected)."""
    import ray
    from hera_ray.scheduler.actor import HEAD_NODE_RESOURCE

    for node in ray.nodes():
        if node["Alive"] and HEAD_NODE_RESOURCE in node["Resources"]:
            return node["NodeManagerAddress"]
    raise HeraError("the Ray cluster has no live head node")


def wait_healthy(state: ClusterState, edges: int, timeout_s: float) -> dict:
    import httpx

    deadline = time.monotonic() + max(5.0, timeout_s)
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{state.ingress_url}/healthz", timeout=5)
            if r.status_code == 200 and r.json().get("nodes_up", 0) >= edges:
                return r.json()
            last = r.text
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.5)
    raise HeraError(f"hera-ray did not become healthy within {timeout_s:.0f}s: {last}")


def attach(state: ClusterState | None = None) -> ClusterState:
    """Connect this process to the cluster ``hera up`` started (or the one at ``RAY_ADDRESS``) as a driver."""
    state = state or load_state()
    address = os.environ.get("RAY_ADDRESS") or (state.ray_address if state else "")
    if not address:
        raise HeraError("no running hera-ray: run `hera up --local-edges 1` first (or set RAY_ADDRESS)")
    if state is None:
        state = ClusterState(ray_address=address)
    if not address.startswith("ray://") and not _port_open(address):
        raise HeraError(f"the Ray cluster at {address} is gone: run `hera up` again")
    if state.started_ray and address == state.ray_address:
        os.environ.update(LOCAL_RAY_ENV)  # a local head lives on loopback; the driver must too
    _ray_env()
    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace=state.namespace, log_to_driver=False, logging_level=logging.WARNING)
    return state


def down(log=print) -> bool:
    """Stop what ``up`` started, and nothing else. Returns False if nothing was recorded."""
    state = load_state()
    if state is None:
        log("nothing to stop: no record of `hera up` on this machine")
        return False
    for pid in state.edge_pids:
        _terminate(pid)
    if state.edge_pids:
        log(f"stopped {len(state.edge_pids)} edge node(s)")
    try:
        attach(state)
        import ray
        from ray import serve

        try:
            serve.delete(state.app_name)
            log(f"deleted the Serve app {state.app_name!r}")
        except Exception as e:  # noqa: BLE001 - already gone is fine
            log(f"Serve app: {e}")
        from hera_ray.scheduler.actor import SCHEDULER_NAME

        try:
            actor = ray.get_actor(SCHEDULER_NAME, namespace=state.namespace)
            try:  # what is queued for the store is committed before the actor goes
                ray.get(actor.flush_store.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 - an actor that cannot flush still has to stop
                log(f"could not flush the store: {e}")
            ray.kill(actor, no_restart=True)
            log("stopped the scheduler actor")
        except ValueError:
            pass
        if state.started_ray:
            serve.shutdown()
        ray.shutdown()
    except Exception as e:  # noqa: BLE001 - the cluster may be gone already
        log(f"Ray: {e}")
    if state.started_ray:
        stop_local_ray(state.ray_address)
        log("stopped the local Ray head")
    state_path().unlink(missing_ok=True)
    return True


def _port_open(address: str, timeout_s: float = 2.0) -> bool:
    """Is something listening at host:port? (Ray's own connect retries for a minute, then aborts.)"""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _terminate(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM (an edge node drains), then SIGKILL after ``timeout_s``."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _alive(pid)


def _alive(pid: int) -> bool:
    try:  # reap it if it is our own child (`up` and `down` in one process), else it lingers as a zombie
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
