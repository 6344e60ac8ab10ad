"""DP-SGD inside a party: per-example clipping against hand-computed gradients, the noise's
scale, Poisson sampling, the step ledger and its epsilon (against dp-accounting), the
budget that stops a party, the settings and flags; and a small federation whose parties
leave when their budget is spent and stay stopped after a restart (slow)."""

from __future__ import annotations

import json
import math
import threading
import uuid
from pathlib import Path
from typing import Any

import dp_accounting
import keras
import numpy as np
import pytest

from messages.errors import ConfigError, StateError
from messages.types import NDArrays
from worker import WorkerConfig
from worker.accounting import LEDGER_FILE, Segment, StepLedger, StepSetting, dp_sgd_epsilon
from worker.data import load_synthetic

DELTA = 1e-5


def linear_model(w: list[float], b: float) -> keras.Model:
    """y = w . x + b with a squared-error loss: gradients small enough to work out by hand."""
    model = keras.Sequential([keras.Input(shape=(len(w),)), keras.layers.Dense(
        1, kernel_initializer=keras.initializers.Constant(np.array(w)[:, None]),
        bias_initializer=keras.initializers.Constant(b), name="linear")])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="mse")
    return model


def epsilon_of(z: float, q: float, steps: int, delta: float = DELTA) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    for _ in range(steps):  # one Poisson-sampled Gaussian mechanism at a time
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(z)))
    return float(accountant.get_epsilon(delta))


# -- the step ------------------------------------------------------------------------------

def test_each_example_is_clipped_on_its_own_before_the_sum() -> None:
    from worker.dpsgd import DpSgdStep

    w, b, clip = [1.0, -2.0], 0.5, 1.0
    x = np.array([[0.1, 0.0], [3.0, 1.0], [0.0, 0.2]], np.float32)
    y = np.array([[0.2], [0.0], [-0.1]], np.float32)
    # by hand: loss (w.x + b - y)^2, gradient 2 r [x, 1] with r the residual
    # example 1: r = 0.1 + 0.5 - 0.2 = 0.4 -> (0.08, 0, 0.8), norm 0.804: kept as it is
    # example 2: r = 3 - 2 + 0.5 = 1.5 -> (9, 3, 3), norm sqrt(99): scaled to norm 1
    # example 3: r = -0.4 + 0.5 + 0.1 = 0.2 -> (0, 0.08, 0.4), norm 0.408: kept
    s = math.sqrt(99)
    kernel = [0.08 + 9 / s, 0.0 + 3 / s + 0.08]
    bias = 0.8 + 3 / s + 0.4
    step = DpSgdStep(linear_model(w, b), clip, 1.0, x, y, secret_seed=0)
    got_kernel, got_bias = step.clipped_sum(x, y)
    np.testing.assert_allclose(got_kernel.ravel(), kernel, rtol=1e-5)
    np.testing.assert_allclose(got_bias, [bias], rtol=1e-5)
    # the average gradient clipped as a whole would be another vector altogether
    plain = 2 * (np.array([0.4, 1.5, 0.2])[:, None] * np.c_[x, np.ones(3)]).sum(axis=0)
    assert not np.allclose(plain, [*kernel, bias], rtol=0.1)


def per_example_by_loop(model: keras.Model, x: NDArrays, y: NDArrays) -> list[NDArrays]:
    """Each example's gradient on its own, the plain way (no vectorisation)."""
    import tensorflow as tf

    from worker.dpsgd import per_example_loss

    loss = per_example_loss(model)
    out = []
    for xi, yi in zip(x, y, strict=True):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(loss(yi[None], model(xi[None], training=True)))
        out.append([g.numpy() for g in tape.gradient(value, model.trainable_variables)])
    return out


@pytest.mark.parametrize("clip", [1e6, 0.3])
def test_the_vectorised_conv_gradients_match_a_loop_over_the_examples(clip: float) -> None:
    # the DP-SGD CNN: 8x8 kernels strides 2 padding same, 4x4 valid (worker.dpsgd's
    # im2col converter for Conv2D kernels, against TensorFlow's gradient of one example)
    from messages.daemon.plugins import build_model
    from worker.dpsgd import DpSgdStep

    data = load_synthetic(num_train=6, num_test=1, seed=2)
    model = build_model("worker.models:dp_cnn", 0)
    step = DpSgdStep(model, clip, 1.0, data.x_train, data.y_train, secret_seed=0)
    expected = [np.zeros_like(v) for v in model.get_weights()]
    for grads in per_example_by_loop(model, data.x_train, data.y_train):
        norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads))
        for e, g in zip(expected, grads, strict=True):
            e += g * min(1.0, clip / norm)
    got = step.clipped_sum(data.x_train, data.y_train)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-6)


def test_the_noise_has_std_z_times_c_over_the_expected_batch_size() -> None:
    from messages.daemon.plugins import build_model
    from worker.dpsgd import DpSgdStep

    data = load_synthetic(num_train=5, num_test=1)
    z, clip, expected = 1.3, 0.7, 4.0
    step = DpSgdStep(build_model("worker.models:dp_cnn", 0), clip, z, data.x_train,
                     data.y_train, secret_seed=5)
    clipped = step.clipped_sum(data.x_train, data.y_train)
    noised = step.noised(data.x_train, data.y_train, expected)
    noise = np.concatenate([(n - c / expected).ravel()
                            for n, c in zip(noised, clipped, strict=True)])
    assert noise.size == 26_010
    assert noise.std() == pytest.approx(z * clip / expected, rel=0.02)
    assert abs(noise.mean()) < 5 * z * clip / expected / math.sqrt(noise.size)
    # an empty batch (Poisson sampling can draw one) is noise alone
    empty = step.noised(data.x_train[:0], data.y_train[:0], expected)
    flat = np.concatenate([e.ravel() for e in empty])
    assert flat.std() == pytest.approx(z * clip / expected, rel=0.02)


def test_without_a_secret_seed_two_steps_draw_different_noise() -> None:
    from worker.dpsgd import DpSgdStep

    x, y = np.zeros((1, 2), np.float32), np.zeros((1, 1), np.float32)
    a = DpSgdStep(linear_model([0.0, 0.0], 0.0), 1.0, 1.0, x, y).noised(x, y, 1.0)
    b = DpSgdStep(linear_model([0.0, 0.0], 0.0), 1.0, 1.0, x, y).noised(x, y, 1.0)
    assert not np.array_equal(a[0], b[0])


# -- the trainer ---------------------------------------------------------------------------

def tiny_trainer(state_dir: Path, **kwargs: Any) -> Any:
    from worker.dpsgd import DpSgdTrainer

    data = load_synthetic(num_train=200, num_test=10)
    options: dict[str, Any] = {"seed": 0, "noise_multiplier": 1.1, "l2_clip": 1.0,
                               "delta": DELTA, "state_dir": state_dir, "secret_seed": 3}
    return DpSgdTrainer("worker.models:tiny_cnn", data.x_train, data.y_train,
                        **{**options, **kwargs})


def test_batches_are_poisson_samples_of_the_shard(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path)
    sizes: list[int] = []
    trainer.step = lambda x, y, expected: sizes.append(len(y))  # record, do not train
    trainer.train(trainer.model.get_weights(), 2000, 20, 0.1)
    n, q = 200, 0.1
    assert np.mean(sizes) == pytest.approx(n * q, rel=0.02)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.1)  # binomial, not fixed


def test_a_round_reports_the_epsilon_of_every_step_so_far(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path)
    base = trainer.model.get_weights()
    for rounds in (1, 2):
        result = trainer.train(base, 5, 20, 0.1)
        assert result is not None
        delta, metrics = result
        assert [d.shape for d in delta] == [b.shape for b in base]
        assert any(np.abs(d).max() > 0 for d in delta)
        assert metrics["dp_steps"] == 5 * rounds
        assert metrics["epsilon"] == pytest.approx(epsilon_of(1.1, 0.1, 5 * rounds), rel=1e-9)
        assert set(metrics) == {"epsilon", "dp_steps", "train_seconds"}  # no loss on records


def test_epsilon_survives_a_restart_of_the_party(tmp_path: Path) -> None:
    first = tiny_trainer(tmp_path)
    first.train(first.model.get_weights(), 4, 20, 0.1)
    restarted = tiny_trainer(tmp_path, secret_seed=4)  # a new process: the same ledger
    assert restarted.ledger.steps == 4
    result = restarted.train(restarted.model.get_weights(), 3, 20, 0.1)
    assert result is not None
    assert result[1]["dp_steps"] == 7
    assert result[1]["epsilon"] == pytest.approx(epsilon_of(1.1, 0.1, 7), rel=1e-9)


def test_a_round_that_would_pass_the_target_is_not_run(tmp_path: Path) -> None:
    from worker.trainers import StopTraining

    target = epsilon_of(1.1, 0.1, 10)
    trainer = tiny_trainer(tmp_path, target_epsilon=target * 1.0001)
    base = trainer.model.get_weights()
    assert trainer.train(base, 10, 20, 0.1) is not None  # exactly within the budget
    with pytest.raises(StopTraining, match="privacy budget spent") as info:
        trainer.train(base, 1, 20, 0.1)
    assert "--target-epsilon" in str(info.value) and "\n" not in str(info.value)
    assert trainer.ledger.steps == 10  # nothing recorded for the refused round
    with pytest.raises(StopTraining):  # and a restarted party is refused as well
        tiny_trainer(tmp_path, target_epsilon=target * 1.0001).train(base, 1, 20, 0.1)


def test_an_interrupted_round_counts_only_the_steps_that_ran(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path)
    ran: list[int] = []
    real = trainer.step

    def step_then_stop(x: Any, y: Any, expected: float) -> None:
        real(x, y, expected)
        ran.append(1)
        if len(ran) == 3:
            trainer.interrupted.set()

    trainer.step = step_then_stop
    assert trainer.train(trainer.model.get_weights(), 10, 20, 0.1) is None
    assert trainer.ledger.steps == 3 == StepLedger(tmp_path).steps


def test_the_ledger_is_written_before_the_steps_run(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path)
    seen: list[int] = []
    trainer.step = lambda x, y, expected: seen.append(StepLedger(tmp_path).steps)
    trainer.train(trainer.model.get_weights(), 4, 20, 0.1)
    assert seen == [4, 4, 4, 4]


# -- the ledger and its epsilon ------------------------------------------------------------

def test_epsilon_is_dp_accountings_for_poisson_sampled_gaussian_steps() -> None:
    setting = StepSetting(1.1, 250 / 60_000, 1.0)
    assert dp_sgd_epsilon([Segment(setting, 50)], DELTA) == pytest.approx(
        epsilon_of(1.1, 250 / 60_000, 50), rel=1e-9)
    # the TF Privacy tutorial's setting, 15 epochs of 240 steps, with dp-accounting 0.6's
    # default RDP orders
    assert dp_sgd_epsilon([Segment(setting, 3600)], DELTA) == pytest.approx(1.2655, abs=1e-3)
    assert dp_sgd_epsilon([], DELTA) == 0.0


def test_segments_of_different_settings_compose(tmp_path: Path) -> None:
    a, b = StepSetting(1.1, 0.01, 1.0), StepSetting(0.8, 0.02, 1.0)
    ledger = StepLedger(tmp_path)
    ledger.record(a, 30)
    ledger.record(a, 20)  # the same setting: one segment
    ledger.record(b, 10)
    assert [(s.setting, s.steps) for s in ledger.segments] == [(a, 50), (b, 10)]
    accountant = dp_accounting.rdp.RdpAccountant()
    for setting, steps in ((a, 50), (b, 10)):
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            setting.sampling_rate, dp_accounting.GaussianDpEvent(setting.noise_multiplier)),
            steps)
    assert ledger.epsilon(DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)
    assert ledger.epsilon(DELTA, a, 5) > ledger.epsilon(DELTA)
    reloaded = StepLedger(tmp_path)
    assert reloaded.segments == ledger.segments
    assert not (tmp_path / (LEDGER_FILE + ".tmp")).exists()


@pytest.mark.parametrize("body", ["not json", json.dumps({"format": "other", "segments": []}),
                                  json.dumps({"format": "dfl-dp-sgd-ledger/1",
                                              "segments": [{"steps": 3}]}),
                                  json.dumps({"format": "dfl-dp-sgd-ledger/1", "segments": [
                                      {"noise_multiplier": 1.0, "sampling_rate": 2.0,
                                       "l2_clip": 1.0, "steps": 3}]})])
def test_a_ledger_that_cannot_be_read_stops_the_party_in_one_line(tmp_path: Path, body: str
                                                                  ) -> None:
    (tmp_path / LEDGER_FILE).write_text(body)
    with pytest.raises(StateError) as info:
        StepLedger(tmp_path)
    assert "restore it" in str(info.value) and "\n" not in str(info.value)


# -- settings and flags --------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "expected"), [
    ({"dp_sgd": True}, "--dp-sgd needs --noise-multiplier Z and --l2-clip C"),
    ({"dp_sgd": True, "noise_multiplier": 1.1}, "--dp-sgd needs"),
    ({"noise_multiplier": 1.1}, "--noise-multiplier is a DP-SGD setting: add --dp-sgd"),
    ({"target_epsilon": 3}, "--target-epsilon is a DP-SGD setting"),
    ({"dp_sgd": True, "noise_multiplier": 0, "l2_clip": 1}, "--noise-multiplier 0: Input"),
    ({"dp_sgd": True, "noise_multiplier": 1, "l2_clip": math.inf}, "--l2-clip inf"),
    ({"dp_sgd": True, "noise_multiplier": 1, "l2_clip": 1, "target_epsilon": -1},
     "--target-epsilon -1"),
    ({"dp_sgd": True, "noise_multiplier": 1, "l2_clip": 1, "dp_clip": 1},
     "--dp-sgd and --dp-clip: choose one"),
])
def test_bad_dp_sgd_settings_are_refused_in_one_line(settings: dict[str, Any], expected: str
                                                     ) -> None:
    with pytest.raises(ConfigError) as info:
        WorkerConfig(**settings)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_both_commands_document_the_dp_sgd_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.cli import main
    from worker.cli import build_parser

    worker_help = build_parser().format_help()
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    for text in (worker_help, capsys.readouterr().out):
        for flag in ("--dp-sgd", "--noise-multiplier", "--l2-clip", "--target-epsilon",
                     "--state-dir", "DFL_TARGET_EPSILON", "sqrt(K)"):
            assert flag in text


def test_the_worker_flags_become_dp_sgd_settings() -> None:
    from messages.daemon.cli import flags_for
    from worker.cli import build_parser

    ns = build_parser().parse_args(["--dp-sgd", "--noise-multiplier", "1.1", "--l2-clip", "1",
                                    "--target-epsilon", "3", "--state-dir", "/var/dfl"])
    config = WorkerConfig(**flags_for(ns, WorkerConfig))
    assert (config.dp_sgd, config.noise_multiplier, config.l2_clip, config.target_epsilon,
            config.state_dir) == (True, 1.1, 1.0, 3.0, "/var/dfl")


# -- a federation --------------------------------------------------------------------------

@pytest.mark.slow
def test_parties_leave_when_their_budget_is_spent_and_a_restart_does_not_reset_it(
        tmp_path: Path) -> None:
    from aggregator import Aggregator, AggregatorConfig
    from aggregator.report import status_report
    from worker import Worker

    broker = f"memory://{uuid.uuid4().hex[:8]}"
    tiny: dict[str, Any] = {"model": "worker.models:tiny_cnn",
                            "data": "worker.data:load_synthetic", "broker": broker}
    # 1000 samples per party, batches of 20 (q 0.02), 5 steps a round: about 0.5 per round
    target = epsilon_of(1.0, 0.02, 20) * 1.0001  # exactly four rounds
    agg = Aggregator(AggregatorConfig(min_parties=2, local_steps=5, batch_size=20,
                                      evaluate=False, **tiny)).start()
    dp: dict[str, Any] = {"dp_sgd": True, "noise_multiplier": 1.0, "l2_clip": 1.0,
                          "target_epsilon": target, "state_dir": str(tmp_path), **tiny}

    def party(i: int) -> Worker:
        return Worker(WorkerConfig(party_id=i, num_parties=2, **dp)).start()

    try:
        parties = [party(i) for i in range(2)]
        for p in parties:
            assert p.wait(240), p.stats
            assert p.stats.stopped_by.startswith("privacy budget spent"), p.stats
            assert p.stats.updates_sent == 4
            assert p.stats.epsilon == pytest.approx(epsilon_of(1.0, 0.02, 20), rel=1e-9)
        report = status_report(agg.config.federation, agg.config.strategy, agg.status,
                               agg.membership, 0.0)
        assert {r["party"]: r["epsilon"] for r in report["parties"]} == pytest.approx(
            {"0": parties[0].stats.epsilon, "1": parties[1].stats.epsilon})
        assert {r["party"]: r["state"] for r in report["parties"]} == {"0": "left",
                                                                       "1": "left"}
        again = party(0)  # a restart reads the ledger: nothing more to spend
        assert again.wait(120)
        assert again.stats.stopped_by.startswith("privacy budget spent")
        assert again.stats.updates_sent == 0
        assert StepLedger(tmp_path / "party-0").steps == 20
    finally:
        agg.stop()
        agg.wait(60)


def test_parallel_traces_leave_tensorflows_converter_as_it_was() -> None:
    from tensorflow.python.ops.parallel_for import pfor

    from worker.dpsgd import DpSgdStep

    before = pfor._pfor_converter_registry["Conv2DBackpropFilter"]
    data = load_synthetic(num_train=4, num_test=1)

    def build() -> None:
        from messages.daemon.plugins import build_model

        step = DpSgdStep(build_model("worker.models:tiny_cnn", 0), 1.0, 1.0, data.x_train,
                         data.y_train)
        step(data.x_train, data.y_train, 4.0)  # traced here, under the swapped converter

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pfor._pfor_converter_registry["Conv2DBackpropFilter"] is before
