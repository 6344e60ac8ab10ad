"""End to end over real RabbitMQ: the daemons as separate processes via the ``dfl`` command.

A tiny CNN on generated data keeps it to seconds of training; everything else is production:
the console command, process boundaries, the broker, SIGTERM.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from messages.transport.connect import connect
from messages.transport.topology import Topology
from tests.processes import Procs

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

TINY = ["--model", "worker.models:tiny_cnn", "--data", "worker.data:load_synthetic"]


def evaluations(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_daemons_train_over_rabbitmq_through_a_late_join_a_sigterm_and_a_kill(
        amqp_url: str, federation: str, procs: Procs, tmp_path: Path) -> None:
    common = ["--broker", amqp_url, "--federation", federation, "--seed", "1", *TINY]
    eval_log = tmp_path / "eval.jsonl"
    model_file = tmp_path / "global.keras"
    aggregator = procs.start(
        "aggregator", "aggregator", *common, "--min-parties", "2", "--max-versions", "60",
        "--local-steps", "20", "--batch-size", "16", "--eval-every-seconds", "1",
        "--eval-log", str(eval_log), "--save-model", str(model_file))
    # --slowdown keeps the tiny model from racing to the limit before the late party is up.
    party = ["--num-parties", "3", "--heartbeat-seconds", "1", "--slowdown", "10"]
    procs.start("w0", "worker", *common, "--party-id", "0", *party)
    w1 = procs.start("w1", "worker", *common, "--party-id", "1", *party)
    try:
        procs.wait_until("version 5", lambda: any(e["version"] >= 5 for e in evaluations(eval_log)),
                 120)
        w2 = procs.start("w2", "worker", *common, "--party-id", "2", *party)
        procs.wait_until("the late party to contribute",
                         lambda: "sent update" in procs.log("w2"), 90)
        w1.send_signal(signal.SIGTERM)
        assert w1.wait(60) == 0, procs.log("w1")
        w0 = procs.procs["w0"]
        w0.kill()  # kill -9: no goodbye; the others must carry on
        assert w0.wait(10) == -signal.SIGKILL
        assert aggregator.wait(180) == 0, procs.log("aggregator")
        assert w2.wait(60) == 0, procs.log("w2")
    finally:
        with connect(amqp_url) as b:
            t = Topology(federation)
            for q in (t.updates, t.control, t.dead):
                b.delete_queue(q)

    evals = evaluations(eval_log)
    assert evals[-1]["version"] == 60 and evals[0]["version"] < evals[-1]["version"]
    assert evals[-1]["accuracy"] > 0.3, evals[-1]  # ten classes: chance is 0.1
    assert model_file.exists()
    agg_log = procs.log("aggregator")
    assert "party 1 left (SIGTERM)" in agg_log
    for party in "012":  # every party, the late one included, had updates applied
        line = next(ln for ln in agg_log.splitlines() if f"party {party}: " in ln
                    and "updates applied" in ln)
        assert int(line.split(f"party {party}: ")[1].split()[0]) > 0, line
    assert "finished" in procs.log("w1") and "finished" in procs.log("w2")
