"""Refusals that retrying cannot fix stop a daemon at once with one clear line."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from urllib.parse import urlparse, urlunparse

import pytest

from messages.transport.connect import connect
from messages.transport.topology import Topology
from tests.processes import ENV, dfl

pytestmark = pytest.mark.rabbitmq


def with_password(url: str, password: str) -> str:
    p = urlparse(url)
    return urlunparse(p._replace(netloc=f"{p.username}:{password}@{p.hostname}:{p.port}"))


def refused(*args: str) -> str:
    started = time.monotonic()
    result = subprocess.run([dfl(), *args], capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 30  # it did not sit in a reconnect loop
    errors = [ln for ln in result.stderr.splitlines() if ": error:" in ln]
    assert len(errors) == 1, result.stderr
    assert "wrong" not in errors[0]  # the password is never echoed
    return errors[0]


def test_bad_credentials_stop_the_aggregator_with_one_line(amqp_url: str) -> None:
    line = refused("aggregator", "--broker", with_password(amqp_url, "wrong"), "--no-eval")
    assert "login refused, check the user and password" in line


def test_a_user_without_rights_on_the_vhost_stops_the_aggregator(amqp_url: str) -> None:
    """The broker's own refusal (530) stops the daemon; pika calls a connection merely lost
    at that stage a "probable denial" too, which is retried instead (not tested here)."""
    host = urlparse(amqp_url).hostname
    if host not in ("localhost", "127.0.0.1") or shutil.which("rabbitmqctl") is None:
        message = "needs the local broker's rabbitmqctl to add a user"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    user = f"dfl-norights-{os.getpid()}"
    subprocess.run(["rabbitmqctl", "add_user", user, "pw-of-test"], check=True,
                   capture_output=True, timeout=60)
    try:
        p = urlparse(amqp_url)
        url = urlunparse(p._replace(netloc=f"{user}:pw-of-test@{p.hostname}:{p.port}"))
        line = refused("aggregator", "--broker", url, "--no-eval")
        assert "access to the vhost refused" in line
    finally:
        subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True, timeout=60)


def test_a_queue_declared_with_other_arguments_stops_the_aggregator(amqp_url: str,
                                                                    federation: str) -> None:
    """Only the aggregator declares the shared queues (parties check, never declare)."""
    t = Topology(federation, queue_type="classic")
    with connect(amqp_url) as b:
        t.declare(b)
    try:
        line = refused("aggregator", "--broker", amqp_url, "--federation", federation,
                       "--no-eval")
        assert "PRECONDITION_FAILED" in line
    finally:
        with connect(amqp_url) as b:
            for q in (t.updates, t.control, t.dead):
                b.delete_queue(q)
