"""TLS and mutual TLS for every hera-ray gRPC server and channel, and a small certificate maker.

A server serves TLS when it has a certificate and key; with ``client_auth`` it also requires
clients to present a certificate signed by ``ca_file`` (mTLS). A client dials over TLS when it
has ``ca_file`` (the CA it verifies the server with) and presents its own certificate and key
when it has them. With none of the files set, everything stays plaintext, as before.

    tls = TLSFiles(cert_file="certs/server.pem", key_file="certs/server.key", ca_file="certs/ca.pem")
    check(tls)                                       # at start-up: ConfigError naming the flag
    port = add_port(server, "0.0.0.0:50061", tls)    # TLS port (insecure if tls is None/empty)
    ch = channel("edge1.lan:50061", tls)             # grpc.aio channel, TLS when ca_file is set

``make_ca`` / ``issue_cert`` (``hera certs init`` / ``hera certs issue``) make a self-signed CA and
certificates whose extended key usage is serverAuth and clientAuth, so one certificate can
serve a node's server and its client side.

grpc and cryptography are imported where they are used, so the config models can import
:class:`TLSFiles` without either.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from hera_ray.errors import ConfigError

if TYPE_CHECKING:
    import grpc

#: Flag prefix used in error messages for the ``--tls-*`` flags of ``hera edge serve`` and ``hera registry serve``.
FLAGS = "--tls-"


class TLSFiles(BaseModel):
    """The PEM files of one TLS endpoint; all unset means plaintext."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: Path | None = Field(None, description="PEM certificate (chain) this endpoint presents: a server's, or a client's for mTLS.")
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    ca_file: Path | None = Field(None, description="PEM CA bundle: clients verify servers with it (and dial over TLS when it is set); servers verify client certificates with it under client_auth.")
    client_auth: bool = Field(False, description="Servers require clients to present a certificate signed by ca_file (mutual TLS).")

    @property
    def serves_tls(self) -> bool:
        return self.cert_file is not None and self.key_file is not None

    @property
    def dials_tls(self) -> bool:
        return self.ca_file is not None


def _flag(prefix: str, name: str) -> str:
    """``("--tls-", "cert_file")`` -> ``--tls-cert-file``; ``("scheduler.tls.", "cert_file")`` -> ``scheduler.tls.cert_file``."""
    return prefix + name.replace("_", "-") if prefix.startswith("--") else prefix + name


def _read_pem(path: Path, flag: str, marker: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    if marker.encode() not in data:
        raise ConfigError(f"{flag} {path} is not a PEM file holding a {marker.strip('-').lower()}")
    return data


_CERT = "CERTIFICATE-----"
_KEY = "PRIVATE KEY-----"


def _pem(tls: TLSFiles, prefix: str) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(certificate chain, private key, CA) as bytes, None where unset; ConfigError on bad setup."""
    if (tls.cert_file is None) != (tls.key_file is None):
        given, missing = ("cert_file", "key_file") if tls.key_file is None else ("key_file", "cert_file")
        raise ConfigError(f"{_flag(prefix, given)} needs {_flag(prefix, missing)} as well")
    if tls.client_auth and tls.ca_file is None:
        raise ConfigError(f"{_flag(prefix, 'client_auth')} needs {_flag(prefix, 'ca_file')}: the CA that signs client certificates")
    if tls.client_auth and not tls.serves_tls:
        raise ConfigError(f"{_flag(prefix, 'client_auth')} needs {_flag(prefix, 'cert_file')} and {_flag(prefix, 'key_file')}: "
                          "client certificates are checked only over TLS")
    cert = _read_pem(tls.cert_file, _flag(prefix, "cert_file"), _CERT) if tls.cert_file else None
    key = _read_pem(tls.key_file, _flag(prefix, "key_file"), _KEY) if tls.key_file else None
    ca = _read_pem(tls.ca_file, _flag(prefix, "ca_file"), _CERT) if tls.ca_file else None
    return cert, key, ca


def check(tls: TLSFiles | None, prefix: str = FLAGS) -> None:
    """Raise ConfigError, naming the flag (``prefix`` + field) and path, if ``tls`` cannot work."""
    if tls is not None:
        _pem(tls, prefix)


def server_credentials(tls: TLSFiles, prefix: str = FLAGS) -> grpc.ServerCredentials:
    """Credentials for a TLS server port; with ``client_auth``, mTLS against ``ca_file``."""
    import grpc

    cert, key, ca = _pem(tls, prefix)
    if cert is None:
        raise ConfigError(f"serving TLS needs {_flag(prefix, 'cert_file')} and {_flag(prefix, 'key_file')}")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=tls.client_auth)


def channel_credentials(tls: TLSFiles, prefix: str = FLAGS) -> grpc.ChannelCredentials:
    """Credentials for a TLS channel: verify the server with ``ca_file``, present our cert if we have one."""
    import grpc

    cert, key, ca = _pem(tls, prefix)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def add_port(server: grpc.aio.Server, address: str, tls: TLSFiles | None, prefix: str = FLAGS) -> int:
    """Bind ``address`` on ``server``: TLS when ``tls`` has a cert and key, plaintext otherwise.
    Returns the bound port (0 if it could not bind)."""
    try:
        if tls is not None and (tls.serves_tls or tls.cert_file or tls.key_file or tls.client_auth):
            return server.add_secure_port(address, server_credentials(tls, prefix))
        return server.add_insecure_port(address)
    except RuntimeError:  # grpc raises "Failed to bind" (a port in use, an address not on this host)
        return 0


def channel(address: str, tls: TLSFiles | None, options: Sequence[tuple[str, Any]] | None = None,
            prefix: str = FLAGS) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``: TLS when ``tls`` has a ``ca_file``, plaintext otherwise."""
    import grpc

    if tls is not None and tls.dials_tls:
        return grpc.aio.secure_channel(address, channel_credentials(tls, prefix), options=options)
    return grpc.aio.insecure_channel(address, options=options)


def cli_args(tls: TLSFiles | None) -> list[str]:
    """``tls`` as ``--tls-*`` flags of ``hera edge serve`` / ``hera registry serve``."""
    if tls is None:
        return []
    args: list[str] = []
    for name in ("cert_file", "key_file", "ca_file"):
        value = getattr(tls, name)
        if value is not None:
            args += [_flag(FLAGS, name), str(value)]
    return args + (["--tls-client-auth"] if tls.client_auth else [])


# -- certificates ------------------------------------------------------------------------------------


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ConfigError("making certificates needs the cryptography package: pip install cryptography") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    if path.exists() and not force:
        raise ConfigError(f"{path} exists: pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    # Created with its final mode, so a private key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it


def _key_pem(key) -> bytes:
    _, _, serialization, _, _, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(out: Path, common_name: str = "hera-ray CA", days: int = 3650, force: bool = False) -> tuple[Path, Path]:
    """Write a self-signed CA to ``out/ca.pem`` and ``out/ca.key`` (mode 600); return both paths."""
    x509, hashes, serialization, ec, _, NameOID = _crypto()
    out = Path(out)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    for path in (out / "ca.pem", out / "ca.key"):
        if path.exists() and not force:
            raise ConfigError(f"{path} exists: pass --force to replace it")
    _write(out / "ca.key", _key_pem(key), 0o600, force)
    _write(out / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return out / "ca.pem", out / "ca.key"


def _san(hosts: Sequence[str]):
    x509 = _crypto()[0]
    names = []
    for host in dict.fromkeys(h.strip() for h in hosts if h.strip()):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise ConfigError("a certificate needs at least one --host (a DNS name or an IP address)")
    return x509.SubjectAlternativeName(names)


def issue_cert(ca_dir: Path, name: str, hosts: Sequence[str], out: Path | None = None, days: int = 825,
               force: bool = False) -> tuple[Path, Path]:
    """Sign a certificate for ``hosts`` (DNS names and IPs) with the CA in ``ca_dir``; write
    ``out/<name>.pem`` and ``out/<name>.key`` (mode 600; ``out`` defaults to ``ca_dir``).
    Its extended key usage is serverAuth and clientAuth: it can serve and dial (mTLS)."""
    x509, hashes, serialization, ec, EKU, NameOID = _crypto()
    ca_dir = Path(ca_dir)
    out = Path(out) if out is not None else ca_dir
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"bad certificate name {name!r}: use a plain file name such as edge-1")
    if name == "ca":
        raise ConfigError("the name 'ca' is the CA's own: choose another --name")
    ca_pem = _read_pem(ca_dir / "ca.pem", "--ca-dir", _CERT)
    ca_key_pem = _read_pem(ca_dir / "ca.key", "--ca-dir", _KEY)
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot load the CA in {ca_dir}: {e}") from None
    san = _san(hosts)
    for path in (out / f"{name}.pem", out / f"{name}.key"):
        if path.exists() and not force:
            raise ConfigError(f"{path} exists: pass --force to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH, EKU.CLIENT_AUTH]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / f"{name}.key", _key_pem(key), 0o600, force)
    _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return out / f"{name}.pem", out / f"{name}.key"
