"""The command line: manual-like help, one-line errors, and a real one-machine run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import ENV, dfl


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.parametrize("command", [
    [dfl(), "run"], [dfl(), "aggregator"], [dfl(), "worker"],
    [sys.executable, "-m", "aggregator"], [sys.executable, "-m", "worker"],
], ids=["run", "aggregator", "worker", "python-m-aggregator", "python-m-worker"])
def test_every_command_has_a_help_page_with_an_example(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "example:" in result.stdout and "--broker" in result.stdout
    assert "--seed" in result.stdout and "--data-dir" in result.stdout


def test_the_required_options_exist_with_their_names() -> None:
    run_help = run(dfl(), "run", "--help").stdout
    for option in ("--parties", "--target-accuracy", "--max-seconds", "--eval-log",
                   "--save-model", "--strategy", "--staleness", "--partition", "--alpha",
                   "--aggregation", "--trim-fraction", "--max-update-norm"):
        assert option in run_help
    agg_help = run(dfl(), "aggregator", "--help").stdout
    for option in ("--min-parties", "--federation", "--strategy", "--staleness",
                   "--aggregation", "--trim-fraction", "--max-update-norm"):
        assert option in agg_help
    worker_help = run(dfl(), "worker", "--help").stdout
    for option in ("--party-id", "--num-parties", "--partition", "--alpha", "--federation"):
        assert option in worker_help


def test_dfl_without_a_command_lists_the_commands() -> None:
    result = run(dfl())
    assert result.returncode == 2 and "dfl run" in result.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["run", "--parties", "two"], "--parties: invalid int value"),
    (["run", "--strategy", "fedmagic"], "invalid choice: 'fedmagic'"),
    (["run", "--mixing-alpha", "1.5"], "--mixing-alpha 1.5"),
    (["run", "--broker", "redis://x"], "use memory:// or amqp://"),
    (["worker", "--party-id", "5", "--num-parties", "2"], "--party-id 5: must be in 0..1"),
    (["aggregator", "--target-accuracy", "98"], "--target-accuracy 98.0: Input should be less"),
    (["aggregator", "--strategy", "x"], "invalid choice: 'x'"),
    (["aggregator", "--federation", "a b"], "--federation 'a b'"),
    (["run", "--aggregation", "median"], "--aggregation median needs --strategy fedbuff"),
    (["aggregator", "--strategy", "fedbuff", "--aggregation", "trimmed-mean", "--no-eval",
      "--broker", "memory://", "--buffer-k", "4"], "trims nothing (floor(0.2 * 4) = 0)"),
    (["teleport"], "unknown command 'teleport'"),
])
def test_a_bad_argument_gets_one_line_saying_what_is_wrong(args: list[str], expected: str
                                                           ) -> None:
    result = run(dfl(), *args)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and expected in lines[0], result.stderr


@pytest.mark.slow
def test_dfl_run_trains_on_the_embedded_broker_and_writes_log_and_model(tmp_path: Path) -> None:
    eval_log, model = tmp_path / "eval.jsonl", tmp_path / "global.keras"
    result = run(dfl(), "run", "--parties", "2", "--model", "worker.models:tiny_cnn",
                 "--data", "worker.data:load_synthetic", "--local-steps", "10",
                 "--max-versions", "12", "--target-accuracy", "1.0", "--no-progress",
                 "--eval-every-seconds", "1", "--eval-log", str(eval_log),
                 "--save-model", str(model), "--log-format", "json", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [json.loads(ln) for ln in result.stderr.splitlines() if ln.startswith("{")]
    updates = [r for r in logged if r.get("outcome") == "applied"]
    assert updates and {"party", "version", "staleness", "message"} <= set(updates[0])
    assert "target accuracy 1 reached" in result.stdout or "version limit 12" in result.stdout
    records = [json.loads(line) for line in eval_log.read_text().splitlines()]
    assert {"time", "version", "accuracy", "loss", "updates"} <= set(records[-1])
    assert 0 < records[-1]["version"] <= 12 and records[-1]["accuracy"] > 0.3
    assert model.stat().st_size > 0
