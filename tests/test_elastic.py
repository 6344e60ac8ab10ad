"""Elastic membership over real RabbitMQ: parties join, leave, die; status tracks each change.

Processes come and go as in production (``dfl`` commands); ``dfl status --json`` is read the
way an operator would, from outside, over the broker.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from messages.transport.connect import connect
from messages.transport.topology import Topology
from tests.processes import ENV, Procs, dfl
from tests.test_end_to_end import TINY, evaluations

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(url: str, federation: str) -> dict[str, Any]:
    out = subprocess.run([dfl(), "status", "--broker", url, "--federation", federation,
                          "--json", "--timeout", "5"], capture_output=True, text=True,
                         timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def party_states(report: dict[str, Any]) -> dict[str, str]:
    return {p["party"]: p["state"] for p in report["parties"]}


def test_parties_join_leave_and_die_while_the_federation_keeps_training(
        amqp_url: str, federation: str, procs: Procs, tmp_path: Path) -> None:
    common = ["--broker", amqp_url, "--federation", federation, *TINY]
    port = free_port()
    eval_log = tmp_path / "eval.jsonl"
    agg = procs.start("aggregator", "aggregator", *common, "--min-parties", "2",
                      "--lease-seconds", "4", "--local-steps", "10", "--eval-every-seconds",
                      "1", "--eval-log", str(eval_log), "--metrics-port", str(port))
    party = ["--num-parties", "4", "--heartbeat-seconds", "0.5", "--slowdown", "5"]
    w0 = procs.start("w0", "worker", *common, "--party-id", "0", *party)
    procs.wait_until("party 0 to join", lambda: "party 0 joined" in procs.log("aggregator"), 90)
    w1 = procs.start("w1", "worker", *common, "--party-id", "auto", *party)
    procs.wait_until("two active parties", lambda: party_states(status(amqp_url, federation)) == {
        "0": "active", "1": "active"}, 90)
    assert "claimed party id 1 of 4" in procs.log("w1")
    procs.wait_until("training", lambda: status(amqp_url, federation)["version"] >= 3, 60)

    procs.start("w2", "worker", *common, "--party-id", "2", *party)
    procs.wait_until("the third party to contribute", lambda: any(
        p["party"] == "2" and p["updates"] > 0
        for p in status(amqp_url, federation)["parties"]), 90)

    twin = procs.start("twin", "worker", *common, "--party-id", "2", *party)
    assert twin.wait(90) == 2
    assert "party 2 is already active from another connection" in procs.log("twin")

    w1.send_signal(signal.SIGTERM)
    assert w1.wait(60) == 0
    procs.wait_until("party 1 to show as left", lambda: party_states(
        status(amqp_url, federation)).get("1") == "left", 15)

    w0.kill()
    killed = time.monotonic()
    w0.wait()
    expired = procs.wait_until("party 0's lease to expire", lambda: party_states(
        status(amqp_url, federation)).get("0") == "expired", 30)
    assert 3.0 <= expired - killed <= 20  # after the 4 s lease, not before

    before = status(amqp_url, federation)["version"]
    procs.wait_until("training to go on with one party", lambda: status(
        amqp_url, federation)["version"] >= before + 3, 60)
    report = status(amqp_url, federation)
    assert party_states(report) == {"0": "expired", "1": "left", "2": "active"}
    assert report["active_parties"] == 1

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    assert b"dfl_model_version" in metrics and b"dfl_updates_applied_total" in metrics
    exported = tmp_path / "now.keras"
    out = subprocess.run([dfl(), "export", "--broker", amqp_url, "--federation", federation,
                          "--model", "worker.models:tiny_cnn", "-o", str(exported)],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0 and exported.exists(), out.stderr

    agg.send_signal(signal.SIGTERM)
    assert agg.wait(120) == 0, procs.log("aggregator")
    final = evaluations(eval_log)[-1]
    assert final["version"] >= before + 3 and final["accuracy"] > 0.3  # evaluated at the end
    procs.procs["w2"].send_signal(signal.SIGTERM)
    assert procs.procs["w2"].wait(60) == 0
    with connect(amqp_url) as b:
        t = Topology(federation)
        for q in (t.updates, t.control, t.dead):
            b.delete_queue(q)
