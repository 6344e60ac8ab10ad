"""Transport security: ``amqps://`` against a private RabbitMQ node that requires TLS.

The node (``tls_node`` in conftest, ``tests/tls_node.py``) trusts only its own CA for client
certificates and has ``fail_if_no_peer_cert = true``, so every client here must both trust
the node's CA and present a certificate that CA signed; each way of getting that wrong is
refused at once with one line, never retried.
"""

from __future__ import annotations

import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from aggregator import Aggregator, AggregatorConfig
from messages.errors import ConfigError, TLSRefused
from messages.transport.broker import check_broker_url
from messages.transport.connect import connect
from messages.transport.tls import TLSOptions, explain, probe, split_url
from tests.processes import ENV, dfl
from tests.tls_node import TLSNode, free_port, issue, make_ca
from worker import Worker, WorkerConfig

TINY_MODEL, SYNTHETIC = "worker.models:tiny_cnn", "worker.data:load_synthetic"


def refused(url: str) -> str:
    """The one-line ``TLSRefused`` that connecting to ``url`` raises, checked for leaks."""
    started = time.monotonic()
    with pytest.raises(TLSRefused) as caught:
        connect(url)
    assert time.monotonic() - started < 10  # one attempt, no reconnect loop
    line = str(caught.value)
    assert "\n" not in line and "guest:guest" not in line and ":guest@" not in line
    return line


# -- URLs (no broker) ------------------------------------------------------------------------
def test_tls_parameters_use_rabbitmqs_names_and_are_kept_from_pika(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    url = f"amqps://u:p@rabbit:5671/%2F?cacertfile={ca.cert}&heartbeat=30&verify=verify_peer"
    assert check_broker_url(url) == url
    rest, tls = split_url(url)
    assert rest == "amqps://u:p@rabbit:5671/%2F?heartbeat=30"
    assert tls == {"cacertfile": str(ca.cert), "verify": "verify_peer"}


@pytest.mark.parametrize(("query", "expected"), [
    ("cafile=ca.pem", "unknown URL parameter 'cafile'; amqps:// takes heartbeat"),
    ("cacertfile=/nowhere/ca.pem", "cacertfile '/nowhere/ca.pem' is not a file"),
    ("certfile=/nowhere/c.pem&keyfile=/nowhere/c.key", "certfile '/nowhere/c.pem' is not a"),
    ("verify=yes", "verify='yes': use verify_peer or verify_none"),
    ("heartbeat=1&heartbeat=2", "heartbeat is given twice"),
])
def test_a_bad_tls_parameter_is_a_one_line_config_error(query: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_broker_url(f"amqps://user:s3cret@rabbit/%2F?{query}")
    text = str(caught.value)
    assert expected in text and "s3cret" not in text and "\n" not in text


def test_tls_parameters_need_amqps(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    with pytest.raises(ConfigError, match=r"TLS parameters need amqps://"):
        check_broker_url(f"amqp://user:s3cret@rabbit/%2F?cacertfile={ca.cert}")


def test_an_unreadable_certificate_file_is_a_config_error(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"cacertfile .* holds no PEM certificate"):
        connect(f"amqps://user:s3cret@127.0.0.1:1/%2F?cacertfile={not_pem}")


def test_a_connection_dropped_during_the_handshake_is_not_a_refusal() -> None:
    # A broker restarting mid-handshake must leave the supervisor retrying, not stop it.
    options = TLSOptions()
    assert explain(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "h:1",
                   options) is None
    assert probe("127.0.0.1", free_port(), ssl.create_default_context(), "localhost") is None


# -- against the TLS node ----------------------------------------------------------------------
@pytest.mark.rabbitmq
def test_a_trusted_client_with_a_certificate_connects(tls_node: TLSNode) -> None:
    with connect(tls_node.trusted_url()) as b:
        b.declare_queue(f"t{uuid.uuid4().hex[:8]}.probe", durable=False, auto_delete=True)


@pytest.mark.rabbitmq
def test_an_ip_address_is_checked_against_server_name_indication(tls_node: TLSNode) -> None:
    node = tls_node
    url = node.url("127.0.0.1", cacertfile=node.ca.cert, certfile=node.client.cert,
                   keyfile=node.client.key, server_name_indication="localhost")
    connect(url).close()
    line = refused(url.replace("server_name_indication=localhost",
                               "server_name_indication=rabbit.example.org"))
    assert "not valid for 'rabbit.example.org'" in line
    assert "server_name_indication" in line


@pytest.mark.rabbitmq
def test_verify_none_encrypts_without_checking_the_broker(tls_node: TLSNode) -> None:
    node = tls_node
    connect(node.url(verify="verify_none", certfile=node.client.cert,
                     keyfile=node.client.key)).close()


@pytest.mark.rabbitmq
@pytest.mark.parametrize("trust", ["system CAs only", "another CA"])
def test_a_client_that_does_not_trust_the_brokers_ca_is_refused(
        tls_node: TLSNode, tmp_path: Path, trust: str) -> None:
    node = tls_node
    query: dict[str, str | Path] = {"certfile": node.client.cert, "keyfile": node.client.key}
    if trust == "another CA":
        query["cacertfile"] = make_ca(tmp_path, "stranger CA").cert
    line = refused(node.url(**query))
    assert line.startswith(f"TLS handshake with localhost:{node.tls_port} failed: "
                           "certificate verify failed")
    assert "pass ?cacertfile=CA.pem" in line


@pytest.mark.rabbitmq
def test_a_client_without_a_certificate_is_refused(tls_node: TLSNode) -> None:
    line = refused(tls_node.url(cacertfile=tls_node.ca.cert))
    assert "the broker requires a client certificate" in line
    assert "certfile=" in line


@pytest.mark.rabbitmq
def test_a_client_certificate_from_another_ca_is_refused(tls_node: TLSNode,
                                                         tmp_path: Path) -> None:
    stranger = issue(make_ca(tmp_path, "stranger CA"), tmp_path, "guest", server=False)
    line = refused(tls_node.url(cacertfile=tls_node.ca.cert, certfile=stranger.cert,
                                keyfile=stranger.key))
    assert "the broker refused our client certificate" in line


@pytest.mark.rabbitmq
def test_the_aggregator_stops_with_one_line_when_it_cannot_trust_the_broker(
        tls_node: TLSNode) -> None:
    node = tls_node
    url = node.url(certfile=node.client.cert, keyfile=node.client.key).replace(
        "guest:guest@", "guest:s3cret-pass@")
    started = time.monotonic()
    result = subprocess.run([dfl(), "aggregator", "--broker", url, "--no-eval",
                             "--federation", f"t{uuid.uuid4().hex[:10]}"],
                            capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 30  # it did not sit in a reconnect loop
    errors = [ln for ln in result.stderr.splitlines() if ": error:" in ln]
    assert len(errors) == 1, result.stderr
    assert "certificate verify failed" in errors[0] and "cacertfile" in errors[0]
    assert "s3cret-pass" not in result.stderr


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_a_federation_trains_over_amqps_with_client_certificates(tls_node: TLSNode) -> None:
    broker, federation = tls_node.trusted_url(), f"t{uuid.uuid4().hex[:10]}"
    agg = Aggregator(AggregatorConfig(broker=broker, federation=federation, model=TINY_MODEL,
                                      data=SYNTHETIC, min_parties=2, max_versions=4,
                                      local_steps=2, evaluate=False)).start()
    parties = [Worker(WorkerConfig(broker=broker, federation=federation, model=TINY_MODEL,
                                   data=SYNTHETIC, party_id=i, num_parties=2)).start()
               for i in range(2)]
    try:
        assert agg.wait(120)
        for p in parties:  # both took part over TLS (one fast party may make all 4 versions)
            assert p.wait(60)
            assert p.stats.model_version >= 0 and p.stats.stopped_by.startswith("aggregator")
        assert sum(p.stats.updates_sent for p in parties) >= 4
        assert agg.status.version == 4
    finally:
        agg.stop()
        for p in parties:
            p.stop()
