"""A second, throw-away RabbitMQ node with a TLS listener, and the certificates it needs.

The broker the other tests use speaks plain AMQP and is shared, so its configuration is not
ours to change. This module starts a private node beside it (its own node name, ports, data
and log folders under a temporary directory, its own Erlang cookie) whose TLS listener uses
a CA, server and client certificates made here with ``cryptography``, and stops it again.

Nothing here touches the shared node: the private node registers another name with the same
``epmd``, listens on spare loopback ports, and ``rabbitmqctl`` only ever addresses it by name.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Debian and Ubuntu install the real scripts here; /usr/sbin/rabbitmq-server is a wrapper
# that switches to the rabbitmq user when run as root, who could not read our temp folder.
_SCRIPT_DIRS = ("/usr/lib/rabbitmq/bin",)


class NodeError(RuntimeError):
    """The private node could not be started (no RabbitMQ installed, or it failed to boot)."""


# -- certificates ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CA:
    """A certificate authority that can sign server and client certificates."""

    pair: Pair
    name: x509.Name
    key: ec.EllipticCurvePrivateKey

    @property
    def cert(self) -> Path:
        return self.pair.cert


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    key_path = path.with_suffix(".key.pem")
    cert_path = path.with_suffix(".pem")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Pair(cert_path, key_path)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             issuer_key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()), critical=False))


def make_ca(folder: Path, name: str = "DFL test CA") -> CA:
    """A self-signed CA in ``folder/<name>.pem`` (EC P-256 keys: quick to make)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (_builder(subject, subject, key, key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return CA(_write(folder / name.replace(" ", "-").lower(), cert, key), subject, key)


def issue(ca: CA, folder: Path, common_name: str, *, server: bool) -> Pair:
    """A certificate signed by ``ca``: for a server (SAN localhost and 127.0.0.1) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(subject, ca.name, key, ca.key)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return _write(folder / f"{ca.cert.stem}-{common_name}", cert, key)


# -- the node --------------------------------------------------------------------------------
def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _script(name: str) -> str:
    """The path of RabbitMQ's ``name`` script: ``$DFL_TEST_RABBITMQ_BIN``, Debian's, or PATH."""
    configured = os.environ.get("DFL_TEST_RABBITMQ_BIN")
    candidates = [Path(configured) / name] if configured else [Path(d) / name
                                                               for d in _SCRIPT_DIRS]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = None if configured else shutil.which(name)
    if found is None:
        where = f"in {configured}" if configured else "installed"
        raise NodeError(f"{name} is not {where} (set DFL_TEST_RABBITMQ_BIN to its folder)")
    return found


@dataclass
class TLSNode:
    """A running private RabbitMQ node: ``tls_port`` requires TLS with a client certificate.

    ``ca`` signed the server certificate and ``client`` (CN ``guest``); the node trusts only
    ``ca`` for client certificates.
    """

    root: Path
    name: str
    amqp_port: int
    tls_port: int
    dist_port: int
    ca: CA
    server: Pair
    client: Pair
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_in: float = 0.0

    def url(self, host: str = "localhost", /, **query: str | Path) -> str:
        """``amqps://guest:guest@host:tls_port/%2F`` with ``query`` as URL parameters."""
        base = f"amqps://guest:guest@{host}:{self.tls_port}/%2F"
        if not query:
            return base
        return f"{base}?{urlencode({k: str(v) for k, v in query.items()}, safe='/')}"

    def trusted_url(self, host: str = "localhost") -> str:
        """The URL of a client that trusts ``ca`` and presents ``client``."""
        return self.url(host, cacertfile=self.ca.cert, certfile=self.client.cert,
                        keyfile=self.client.key)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <this node> ARGS`` (with this node's cookie)."""
        return subprocess.run([_script("rabbitmqctl"), "-n", self.name, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def log_excerpt(self, lines: int = 20) -> str:
        """The first error lines of the node's logs (else their last lines): the first error
        says why a boot failed, the crash reports after it only repeat it."""
        text = [line for path in sorted((self.root / "log").glob("*.log"))
                for line in path.read_text(errors="replace").splitlines()]
        errors = [line for line in text if "error" in line.lower()]
        return "\n".join(errors[:lines] if errors else text[-lines:])

    def start(self, timeout: float = 90) -> None:
        """Boot the node and wait until it serves; ``NodeError`` with its log otherwise."""
        started = time.monotonic()
        out = (self.root / "log" / "server-stdout.log").open("wb")
        # start_new_session: a Ctrl-C in pytest's terminal must not reach the node directly;
        # stop() shuts it down in order.
        self.proc = subprocess.Popen([_script("rabbitmq-server")], env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.root, start_new_session=True)
        out.close()
        # Poll the TLS port first: a rabbitmqctl call costs a second of CPU, which on a small
        # machine slows the boot it waits for; await_startup then confirms the node is done.
        deadline = started + timeout
        while not _accepts(self.tls_port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise NodeError(f"RabbitMQ node {self.name} did not start (exit status "
                                f"{self.proc.returncode}):\n{self.log_excerpt()}")
            time.sleep(0.1)
        result = self.ctl("await_startup", "--timeout", "30", timeout=45)
        if result.returncode != 0:
            self.stop()
            raise NodeError(f"RabbitMQ node {self.name} did not finish starting: "
                            f"{(result.stderr or result.stdout).strip()[-500:]}\n"
                            f"{self.log_excerpt()}")
        self.started_in = time.monotonic() - started

    def stop(self) -> None:
        """Stop the node (in order, else by signal) and wait for it to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if self.ctl("stop", timeout=30).returncode == 0:
                self.proc.wait(30)
                return
        except subprocess.TimeoutExpired:
            pass
        self.proc.terminate()  # a node that never came up cannot be reached by rabbitmqctl
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def prepare(root: Path) -> TLSNode:
    """Certificates, configuration and environment of a private node under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    certs = root / "certs"
    for sub in (certs, root / "mnesia", root / "log", root / "home"):
        sub.mkdir(exist_ok=True)
    ca = make_ca(certs)
    server = issue(ca, certs, "localhost", server=True)
    client = issue(ca, certs, "guest", server=False)
    amqp_port, tls_port, dist_port = free_port(), free_port(), free_port()
    while len({amqp_port, tls_port, dist_port}) < 3:
        tls_port, dist_port = free_port(), free_port()
    (root / "rabbitmq.conf").write_text("\n".join([
        f"listeners.tcp.1 = 127.0.0.1:{amqp_port}",
        f"listeners.ssl.1 = 127.0.0.1:{tls_port}",
        f"ssl_options.cacertfile = {ca.cert}",
        f"ssl_options.certfile = {server.cert}",
        f"ssl_options.keyfile = {server.key}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
        "log.console = false",
        "log.file.level = info",
        "",
    ]))
    (root / "enabled_plugins").write_text("[].\n")  # no management listener to clash with
    (root / "rabbitmq-env.conf").write_text("")  # not the system's (it names the shared node)
    name = f"dfltls{uuid.uuid4().hex[:6]}@localhost"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
        # The Erlang cookie is read from (and, on first start, written to) $HOME; a private
        # HOME keeps ours out of the user's and the shared node's.
        "HOME": str(root / "home"),
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(amqp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
        "RABBITMQ_LOG_BASE": str(root / "log"),
        "RABBITMQ_PID_FILE": str(root / "rabbitmq.pid"),
        # Erlang distribution on loopback only, as the shared node does.
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    return TLSNode(root, name, amqp_port, tls_port, dist_port, ca, server, client, env)


def start(root: Path, timeout: float = 90) -> TLSNode:
    """``prepare`` and ``start`` a private node under ``root``; ``NodeError`` if it cannot."""
    node = prepare(root)
    _script("rabbitmq-server")
    _script("rabbitmqctl")
    node.start(timeout)
    return node
