"""Fixtures for both brokers.

No ``DFL_*`` variable of the user's shell reaches a test (nor a process it starts) unless the
test sets it itself; only the suite's own (``tests.processes.TEST_SETTINGS``) pass through.

RabbitMQ comes from testcontainers where a Docker engine is reachable, otherwise from
``DFL_TEST_AMQP_URL`` (default: the local broker). Without either, broker tests skip on a
laptop but fail when ``CI`` is set, so CI can never pass by skipping them. The TLS tests
start a private node of their own (``tests/tls_node.py``), under the same rule.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from messages.errors import BrokerError
from messages.transport.broker import Broker
from messages.transport.connect import connect
from messages.transport.topology import Topology
from tests.processes import Procs, users_settings

if TYPE_CHECKING:
    from tests.tls_node import TLSNode

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the user's ``DFL_*`` settings from every test; restored after it."""
    for name in users_settings(os.environ):
        monkeypatch.delenv(name)


def _container_url() -> Iterator[str] | None:
    try:
        with warnings.catch_warnings():  # 4.x moved it to testcontainers.community
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13-management")
    except Exception:  # docker.errors.DockerException: no engine here
        return None

    def run() -> Iterator[str]:
        with container as rabbit:
            host, port = rabbit.get_container_host_ip(), rabbit.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/%2F"

    return run()


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A reachable RabbitMQ URL, or skip (fail under CI)."""
    from_container = None if os.environ.get("DFL_TEST_AMQP_URL") else _container_url()
    if from_container is not None:
        yield from from_container
        return
    url = os.environ.get("DFL_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    try:
        connect(url).close()
    except BrokerError as exc:
        message = f"no RabbitMQ for broker tests ({exc}); set DFL_TEST_AMQP_URL"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield url


@pytest.fixture(scope="session")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSNode]:
    """A private RabbitMQ node whose TLS listener requires client certificates, or skip
    (fail under CI). It takes several seconds to boot, so the session shares one."""
    try:
        from tests.tls_node import NodeError, start
    except ImportError as exc:  # cryptography, from the test extra
        problem = f"{exc}; pip install -e '.[test]'"
    else:
        try:
            node = start(tmp_path_factory.mktemp("tls-node"))
        except NodeError as exc:
            problem = str(exc)
        else:
            yield node
            node.stop()
            return
    if os.environ.get("CI"):
        pytest.fail(f"no RabbitMQ node for the TLS tests: {problem}")
    pytest.skip(f"no RabbitMQ node for the TLS tests: {problem.splitlines()[0]}")


@pytest.fixture(params=["memory", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each contract test runs once per broker."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex[:8]}"
    request.applymarker(pytest.mark.rabbitmq)
    return str(request.getfixturevalue("amqp_url"))


@pytest.fixture
def federation() -> str:
    """A fresh federation id, so runs never see each other's messages."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topology(federation: str) -> Topology:
    return Topology(federation)


class Brokers:
    """Opens connections to the broker under test and cleans up after the test."""

    def __init__(self, url: str, topology: Topology) -> None:
        self.url = url
        self.topology = topology
        self.opened: list[Broker] = []
        self.queues: list[str] = [topology.updates, topology.control, topology.dead]

    def open(self) -> Broker:
        b = connect(self.url)
        self.opened.append(b)
        return b

    def queue(self, suffix: str) -> str:
        """A queue name of this test's federation, deleted at teardown."""
        name = f"{self.topology.federation}.{suffix}"
        self.queues.append(name)
        return name

    def close(self) -> None:
        for b in self.opened:
            b.close()
        with connect(self.url) as cleaner:
            for name in self.queues:
                cleaner.delete_queue(name)


@pytest.fixture
def brokers(broker_url: str, topology: Topology) -> Iterator[Brokers]:
    b = Brokers(broker_url, topology)
    yield b
    b.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """``dfl`` processes for the test; any still running at the end are killed."""
    p = Procs(tmp_path)
    yield p
    p.stop_all()
