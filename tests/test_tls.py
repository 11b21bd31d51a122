"""TLS and mTLS on the real gRPC servers: a registry and edge nodes as local processes, certificates
from our own self-signed CA (``hera_ray.tls``), no Ray."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import grpc
import pytest

from edge_helpers import run, wait_for
from hera_ray import tls
from hera_ray.cli import list_nodes
from hera_ray.errors import ConfigError, Unavailable
from hera_ray.generation import GenerationParams
from hera_ray.launcher import LaunchError, start_edge, start_registry
from hera_ray.serve.executor import ClusterExecutor
from hera_ray.tls import TLSFiles
from hera_ray.wire import auth_metadata, edge_pb2, edge_pb2_grpc, registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.timeout(300)

UP = registry_pb2.NODE_STATE_UP


class Certs:
    """ca.pem, server.pem/key and client.pem/key from one CA; other-ca.pem and a client cert from another."""

    def __init__(self, root):
        self.dir = root / "certs"
        self.ca, _ = tls.make_ca(self.dir)
        self.server, self.server_key = tls.issue_cert(self.dir, "server", ["127.0.0.1", "localhost"])
        self.client, self.client_key = tls.issue_cert(self.dir, "client", ["hera-client"])
        other = root / "other-certs"
        self.other_ca, _ = tls.make_ca(other, common_name="some other CA")
        self.other_client, self.other_client_key = tls.issue_cert(other, "client", ["hera-client"])

    def serve_args(self, ca: bool = True, client_auth: bool = False) -> list[str]:
        args = ["--tls-cert-file", str(self.server), "--tls-key-file", str(self.server_key)]
        return args + (["--tls-ca-file", str(self.ca)] if ca else []) + (["--tls-client-auth"] if client_auth else [])

    def dial(self, with_cert: bool = False) -> TLSFiles:
        if with_cert:
            return TLSFiles(ca_file=self.ca, cert_file=self.client, key_file=self.client_key)
        return TLSFiles(ca_file=self.ca)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_registry(module_procs, certs):
    """A registry serving TLS (no client certificates asked)."""
    return module_procs.registry(extra_args=certs.serve_args(ca=False))


@pytest.fixture(scope="module")
def tls_edge(module_procs, certs, tls_registry):
    """An edge node serving TLS that registers with the TLS registry, verifying it with the CA."""
    return module_procs.edge("edge-tls", tls_registry, extra_args=certs.serve_args())


@pytest.fixture(scope="module")
def mtls_registry(module_procs, certs):
    return module_procs.registry(extra_args=certs.serve_args(client_auth=True))


@pytest.fixture(scope="module")
def mtls_edge(module_procs, certs, mtls_registry):
    """An edge node that requires client certificates and presents its own to an mTLS registry."""
    return module_procs.edge("edge-mtls", mtls_registry, extra_args=certs.serve_args(client_auth=True))


async def generate(address: str, tls_files: TLSFiles | None, timeout: float = 60, **fields):
    request = edge_pb2.GenerateRequest(**fields)
    async with tls.channel(address, tls_files) as ch:
        return await edge_pb2_grpc.EdgeWorkerStub(ch).Generate(request, timeout=timeout)


def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        run(call)
    return exc.value


# -- (a) TLS end to end -----------------------------------------------------------------------------


def test_edge_registers_over_tls_and_answers_over_tls(module_procs, certs, tls_registry, tls_edge):
    assert "over TLS" in tls_registry.log_path.read_text()
    nodes = {n["node_id"]: n for n in list_nodes(tls_registry.address, module_procs.token, tls=certs.dial())}
    assert nodes["edge-tls"]["state"] == "up" and nodes["edge-tls"]["address"] == tls_edge.address

    reply = run(generate(tls_edge.address, certs.dial(), prompt="Once upon a time", max_tokens=6))
    assert reply.completion_tokens == 6 and reply.node_id == "edge-tls"


def test_cli_generate_and_nodes_over_tls(module_procs, certs, tls_registry, tls_edge):
    ca = ["--tls-ca-file", str(certs.ca)]
    out = subprocess.run([sys.executable, "-m", "hera_ray", "edge", "generate", tls_edge.address, "Hi", "--max-tokens",
                          "3", "--json", *ca], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["completion_tokens"] == 3
    out = subprocess.run([sys.executable, "-m", "hera_ray", "nodes", "--registry", tls_registry.address, "--token-file",
                          str(module_procs.token_file), "--json", *ca], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [n["node_id"] for n in json.loads(out.stdout)] == ["edge-tls"]
    # A client certificate without a CA to check the server with is a mistake, not a reason to dial plaintext.
    out = subprocess.run([sys.executable, "-m", "hera_ray", "nodes", "--registry", tls_registry.address,
                          "--tls-cert-file", str(certs.client), "--tls-key-file", str(certs.client_key)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--tls-ca-file" in out.stderr


# -- (b) what a TLS server refuses ----------------------------------------------------------------------


def test_plaintext_client_and_wrong_ca_are_refused(module_procs, certs, tls_registry, tls_edge):
    for tls_files in (None, TLSFiles(ca_file=certs.other_ca)):
        err = refused(generate(tls_edge.address, tls_files, timeout=5, prompt="hi", max_tokens=2))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        err = refused(_list_nodes(tls_registry.address, module_procs.token, tls_files))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert tls_edge.popen.poll() is None and tls_registry.popen.poll() is None


async def _list_nodes(address: str, token: str, tls_files: TLSFiles | None):
    async with tls.channel(address, tls_files) as ch:
        stub = registry_pb2_grpc.EdgeRegistryStub(ch)
        reply = await stub.ListNodes(registry_pb2.ListNodesRequest(), metadata=auth_metadata(token), timeout=5)
        return {n.spec.node_id: n for n in reply.nodes}


# -- (c) mutual TLS -------------------------------------------------------------------------------------


def test_mtls_refuses_clients_without_a_certificate_from_the_ca(module_procs, certs, mtls_registry, mtls_edge):
    assert "over mTLS" in mtls_registry.log_path.read_text()
    # The edge presented its certificate to the mTLS registry, so it registered.
    nodes = run(wait_for(lambda: _list_nodes(mtls_registry.address, module_procs.token, certs.dial(with_cert=True))))
    assert nodes["edge-mtls"].state == UP

    no_cert = certs.dial()
    other_ca_cert = TLSFiles(ca_file=certs.ca, cert_file=certs.other_client, key_file=certs.other_client_key)
    for tls_files in (no_cert, other_ca_cert):
        err = refused(generate(mtls_edge.address, tls_files, timeout=5, prompt="hi", max_tokens=2))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        err = refused(_list_nodes(mtls_registry.address, module_procs.token, tls_files))
        assert err.code() == grpc.StatusCode.UNAVAILABLE

    reply = run(generate(mtls_edge.address, certs.dial(with_cert=True), prompt="Once upon a time", max_tokens=4))
    assert reply.completion_tokens == 4 and reply.node_id == "edge-mtls"


# -- (d) the cluster's executor dials TLS edges -------------------------------------------------------------


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_cluster_executor_calls_a_tls_edge(request, certs, mtls):
    edge = request.getfixturevalue("mtls_edge" if mtls else "tls_edge")
    params = GenerationParams(prompt="The sky is", max_tokens=5)

    async def call(executor):
        return await executor.edge(edge.address, params)

    result = run(call(ClusterExecutor(cloud_handle=None, timeout_s=60, tls=certs.dial(with_cert=True))))
    assert result.completion_tokens == 5 and result.text
    if mtls:  # without its certificate the executor is turned away
        with pytest.raises(Unavailable, match="edge node at .*UNAVAILABLE"):
            run(call(ClusterExecutor(cloud_handle=None, timeout_s=10, tls=certs.dial())))


# -- (e) bad setup: a clear error at start-up ------------------------------------------------------------------


def test_edge_with_cert_but_no_key_exits_naming_the_flag(module_procs, certs):
    with pytest.raises(LaunchError) as exc:
        start_edge(module_procs.workdir, "edge-nokey", extra_args=["--tls-cert-file", str(certs.server)], timeout=60)
    assert "--tls-cert-file needs --tls-key-file" in str(exc.value)
    assert "exited with code 1" in str(exc.value)


def test_registry_with_unreadable_cert_exits_naming_flag_and_path(module_procs, certs):
    missing = certs.dir / "nope.pem"
    with pytest.raises(LaunchError) as exc:
        start_registry(module_procs.workdir, module_procs.token_file, extra_args=[
            "--tls-cert-file", str(missing), "--tls-key-file", str(certs.server_key)])
    assert f"cannot read --tls-cert-file {missing}" in " ".join(str(exc.value).split())


@pytest.mark.parametrize("files, prefix, message", [
    (dict(key_file="server.key"), "--tls-", "--tls-key-file needs --tls-cert-file"),
    (dict(cert_file="server.pem", key_file="server.key", client_auth=True), "--tls-",
     "--tls-client-auth needs --tls-ca-file"),
    (dict(ca_file="ca.pem", client_auth=True), "--tls-", "--tls-client-auth needs --tls-cert-file"),
    (dict(cert_file="server.key", key_file="server.key"), "--tls-", "is not a PEM file holding a certificate"),
    (dict(cert_file="server.pem", key_file="server.pem"), "--tls-", "--tls-key-file"),
    (dict(ca_file="missing.pem"), "scheduler.tls.", "cannot read scheduler.tls.ca_file"),
], ids=["key-no-cert", "client-auth-no-ca", "client-auth-no-cert", "cert-not-pem", "key-not-a-key", "scheduler-names"])
def test_bad_tls_files_are_config_errors(certs, files, prefix, message):
    tls_files = TLSFiles(**{k: certs.dir / v if isinstance(v, str) else v for k, v in files.items()})
    with pytest.raises(ConfigError) as exc:
        tls.check(tls_files, prefix)
    assert message in exc.value.message


def test_executor_checks_its_tls_files_when_built(certs):
    with pytest.raises(ConfigError, match="scheduler.tls.key_file needs scheduler.tls.cert_file"):
        ClusterExecutor(cloud_handle=None, tls=TLSFiles(ca_file=certs.ca, key_file=certs.client_key))


def test_certs_init_writes_a_ca_and_a_certificate_with_private_keys(tmp_path):
    from cryptography import x509
    from typer.testing import CliRunner

    from hera_ray.cli import app

    out = tmp_path / "certs"
    result = CliRunner().invoke(app, ["certs", "init", "--out", str(out), "--host", "127.0.0.1", "--host", "edge1.lan"])
    assert result.exit_code == 0, result.output
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["edge1.lan"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH}

    result = CliRunner().invoke(app, ["certs", "issue", "--ca-dir", str(out), "--name", "edge-1", "--host", "10.0.0.7"])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((out / "edge-1.key").stat().st_mode) == 0o600
    # Nothing is overwritten by accident.
    result = CliRunner().invoke(app, ["certs", "init", "--out", str(out)])
    assert result.exit_code == 1 and "exists" in result.output
