"""Several broker URLs: the nodes of one RabbitMQ cluster (parsing, checking, failover)."""

from __future__ import annotations

import logging
import socket

import pytest

from aggregator.config import AggregatorConfig
from messages.daemon.settings import FederationSettings
from messages.errors import ConfigError, ConnectionLost
from messages.transport.broker import broker_urls, check_broker_url, mask_url
from messages.transport.connect import connect


def _dead_port() -> int:
    with socket.socket() as s:  # bound, never listening: a connect is refused at once
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_list_splits_only_where_a_url_starts() -> None:
    two = "amqp://u:p,w@a:5672/%2F, amqps://u:x@b:5671/%2F?cacertfile=/ca,1.pem"
    assert broker_urls(two) == ["amqp://u:p,w@a:5672/%2F",
                                "amqps://u:x@b:5671/%2F?cacertfile=/ca,1.pem"]
    assert mask_url(two) == "amqp://u:***@a:5672/%2F,amqps://u:***@b:5671/%2F?cacertfile=/ca,1.pem"
    assert broker_urls("memory://x") == ["memory://x"]


@pytest.mark.parametrize("bad", ["amqp://a,memory://", "amqp://a,http://b",
                                 "amqp://a,amqp://b?bogus=1"])
def test_a_bad_list_is_refused_in_one_line(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_broker_url(bad)
    assert "\n" not in str(err.value)


def test_a_settings_file_list_means_the_same_as_commas(tmp_path: object) -> None:
    s = FederationSettings(broker=["amqp://guest:guest@localhost:5672/%2F",
                                   "amqp://guest:guest@127.0.0.1:5673/%2F"])
    assert broker_urls(s.broker)[1].endswith(":5673/%2F")


def test_a_remote_node_anywhere_in_the_list_needs_signatures() -> None:
    with pytest.raises(ConfigError, match="rabbit-2"):
        AggregatorConfig(broker="amqp://g:g@localhost:5672/%2F,amqp://g:g@rabbit-2:5672/%2F")


@pytest.mark.rabbitmq
def test_connect_fails_over_to_the_next_node_and_says_which(
        amqp_url: str, caplog: pytest.LogCaptureFixture) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{_dead_port()}/%2F"
    nodes = f"{dead},{amqp_url}"
    with caplog.at_level(logging.INFO, "dfl.broker"), connect(nodes) as broker:
        assert broker.url == amqp_url
    assert "connected to" in caplog.text and "unreachable" in caplog.text
    with connect(nodes) as again:  # it starts with the node that worked last time
        assert again.url == amqp_url


def test_no_reachable_node_is_a_connection_loss_naming_each() -> None:
    a, b = _dead_port(), _dead_port()
    with pytest.raises(ConnectionLost) as err:
        connect(f"amqp://guest:guest@127.0.0.1:{a}/%2F,amqp://guest:guest@127.0.0.1:{b}/%2F")
    assert str(a) in str(err.value) and str(b) in str(err.value)
    assert "guest:guest" not in str(err.value)
