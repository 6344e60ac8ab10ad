"""Secure by default: over a broker that is not on this machine, the daemons refuse to start
without their keys unless --insecure; memory:// and loopback brokers need none.

Nothing here connects anywhere: the refusal comes from the settings, before any broker
connection, and every accepted setting is checked at the configuration level only.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aggregator.cli import build_parser as aggregator_parser
from aggregator.config import AggregatorConfig
from messages.daemon.cli import flags_for, warn_if_insecure
from messages.daemon.settings import remote_broker_host
from messages.errors import ConfigError
from tests.processes import ENV, dfl
from worker.cli import build_parser as worker_parser
from worker.config import WorkerConfig

REMOTE = "amqp://guest:guest@10.1.2.3:5672/"  # never dialled: refused before any connection
LOOPBACK = ["amqp://guest:guest@127.0.0.1:5672/%2F", "amqp://guest:guest@localhost:5672/%2F",
            "amqp://guest:guest@[::1]:5672/%2F", "amqp://127.8.9.10/", "amqp:///%2F",
            "memory://", "memory://named"]
WORKER_KEYS = {"signing_key": "keys/0.key", "aggregator_key": "keys/aggregator.pub"}


def refusal(*args: str) -> str:
    """The one error line of a ``dfl`` command that must exit 2 at once."""
    started = time.monotonic()
    done = subprocess.run([dfl(), *args], capture_output=True, text=True, timeout=60, env={
        k: v for k, v in ENV.items() if not k.startswith("DFL_")})
    assert done.returncode == 2, done.stdout + done.stderr
    assert time.monotonic() - started < 30  # refused before dialling anything
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "guest:guest" not in lines[0]  # the password is not repeated
    return lines[0]


def test_the_aggregator_refuses_a_remote_broker_without_keys() -> None:
    line = refusal("aggregator", "--broker", REMOTE, "--no-eval")
    assert line.startswith("dfl aggregator: error: --broker 10.1.2.3 is not on this machine")
    assert "--keys is not given" in line
    for fix in ("dfl admin add-aggregator", "dfl admin add-party", "pass --keys DIR",
                "--insecure", "accept unsigned messages"):
        assert fix in line, fix


@pytest.mark.parametrize(("keys", "missing"), [
    ([], "--signing-key and --aggregator-key are not given"),
    (["--signing-key", "keys/0.key"], "--aggregator-key is not given"),
    (["--aggregator-key", "keys/aggregator.pub"], "--signing-key is not given"),
])
def test_a_worker_refuses_a_remote_broker_without_its_keys(keys: list[str], missing: str
                                                           ) -> None:
    line = refusal("worker", "--broker", REMOTE, "--party-id", "0", *keys)
    assert line.startswith("dfl worker: error: --broker 10.1.2.3 is not on this machine")
    assert missing in line
    for fix in ("--signing-key DIR/ID.key", "--aggregator-key DIR/aggregator.pub",
                "dfl admin add-party", "--insecure"):
        assert fix in line, fix


def test_dfl_run_refuses_a_remote_broker_too() -> None:
    line = refusal("run", "--broker", REMOTE, "--no-progress")
    assert line.startswith("dfl run: error: --broker 10.1.2.3 is not on this machine")
    assert "dfl run signs nothing" in line and "--insecure" in line


def test_a_remote_tls_broker_name_is_refused_too() -> None:
    # a host name other than localhost is remote: nothing is looked up
    with pytest.raises(ConfigError, match=r"rabbit\.example\.org is not on this machine"):
        AggregatorConfig(broker="amqps://u:p@rabbit.example.org:5671/%2F")


@pytest.mark.parametrize("url", LOOPBACK)
def test_memory_and_loopback_brokers_need_no_keys(url: str) -> None:
    assert remote_broker_host(url) is None
    for config in (AggregatorConfig(broker=url), WorkerConfig(broker=url)):
        assert not config.insecure and config.insecure_warning() is None


@pytest.mark.parametrize(("url", "host"), [
    ("amqp://u:p@10.1.2.3:5672/", "10.1.2.3"),
    ("amqp://u:p@rabbit/", "rabbit"),
    ("amqps://u:p@localhost.example.org/", "localhost.example.org"),
    ("amqp://127.0.0.1.nip.io/", "127.0.0.1.nip.io"),  # a name, never resolved
    ("amqp://[2001:db8::1]:5672/", "2001:db8::1"),
    ("amqp://128.0.0.1/", "128.0.0.1"),
])
def test_every_other_host_is_remote(url: str, host: str) -> None:
    assert remote_broker_host(url) == host


def test_keys_make_a_remote_broker_acceptable() -> None:
    assert AggregatorConfig(broker=REMOTE, keys_dir="keys").insecure_warning() is None
    assert WorkerConfig(broker=REMOTE, **WORKER_KEYS).insecure_warning() is None


@pytest.mark.parametrize("parser, config_cls, argv", [
    (aggregator_parser, AggregatorConfig, ["--broker", REMOTE, "--insecure"]),
    (worker_parser, WorkerConfig, ["--broker", REMOTE, "--party-id", "1", "--insecure"]),
], ids=["aggregator", "worker"])
def test_insecure_flag_accepts_a_remote_broker_with_a_warning(
        parser: Callable[[], argparse.ArgumentParser],
        config_cls: type[AggregatorConfig | WorkerConfig], argv: list[str],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("DFL_BROKER", "DFL_INSECURE", "DFL_KEYS_DIR", "DFL_SIGNING_KEY",
                 "DFL_AGGREGATOR_KEY"):
        monkeypatch.delenv(name, raising=False)
    ns = parser().parse_args(argv)  # the daemons' own command line, up to the settings
    config = config_cls.load(flags_for(ns, config_cls))
    assert config.insecure and config.broker == REMOTE
    with caplog.at_level(logging.WARNING, logger="dfl"):
        warn_if_insecure(config)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert "--insecure" in record.getMessage() and "10.1.2.3" in record.getMessage()
    assert "guest" not in record.getMessage()


def test_insecure_is_layered_like_every_setting(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFL_INSECURE", raising=False)
    monkeypatch.setenv("DFL_BROKER", REMOTE)
    with pytest.raises(ConfigError, match="--insecure"):
        AggregatorConfig.load({})
    toml = tmp_path / "insecure.toml"
    toml.write_text("insecure = true\n")
    assert AggregatorConfig.load({}, str(toml)).insecure  # the file
    monkeypatch.setenv("DFL_INSECURE", "true")
    assert WorkerConfig.load({}).insecure  # the environment
    monkeypatch.setenv("DFL_INSECURE", "false")
    with pytest.raises(ConfigError, match="--insecure"):  # the environment beats the file
        AggregatorConfig.load({}, str(toml))
    assert AggregatorConfig.load({"insecure": True}).insecure  # the flag beats both


def test_no_warning_when_running_securely(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dfl"):
        warn_if_insecure(AggregatorConfig(broker="amqp://guest:guest@127.0.0.1/",
                                          insecure=True))  # loopback: nothing to warn about
        warn_if_insecure(WorkerConfig(broker=REMOTE, insecure=True, **WORKER_KEYS))  # signed
    assert not caplog.records


@pytest.mark.parametrize("role", ["aggregator", "worker", "run"])
def test_insecure_is_documented_in_each_help(role: str) -> None:
    done = subprocess.run([dfl(), role, "--help"], capture_output=True, text=True, timeout=60,
                          env=ENV)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--insecure accept unsigned messages over a broker that is not on this machine" in text
    assert "env DFL_INSECURE" in text
