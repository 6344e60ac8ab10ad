"""Party-side differential privacy: clipping, noise, the epsilon accountant, the settings and
flags that switch it on (numpy and dp-accounting only), and one small federation on
``memory://`` whose parties report their epsilon to the aggregator (slow: trains Keras)."""

from __future__ import annotations

import math
import subprocess
import uuid
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dp_accounting
import numpy as np
import pytest

from messages.errors import ConfigError
from messages.types import NDArrays
from tests.processes import ENV, dfl
from worker import WorkerConfig
from worker.privacy import PrivacyFilter, epsilon_for

DELTA = 1e-5


def norm(tensors: NDArrays) -> float:
    return math.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in tensors))


def delta_of_norm(target: float, seed: int = 0) -> NDArrays:
    """Three tensors of different shapes whose global L2 norm is ``target``."""
    rng = np.random.default_rng(seed)
    tensors = [rng.normal(size=s).astype(np.float32) for s in ((3, 4), (7,), (2, 3, 5))]
    return [t * np.float32(target / norm(tensors)) for t in tensors]


# -- clipping ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0.01, 0.5, 1.0, 1.5, 40.0])
def test_without_noise_the_norm_becomes_the_smaller_of_its_own_and_the_clip(size: float) -> None:
    clip = 1.0
    delta = delta_of_norm(size)
    out = PrivacyFilter(clip).apply(delta)
    assert norm(out) == pytest.approx(min(size, clip), rel=1e-5)


@pytest.mark.parametrize("size", [0.3, 7.0])
def test_clipping_keeps_the_direction_and_the_shapes(size: float) -> None:
    delta = delta_of_norm(size)
    out = PrivacyFilter(1.0).apply(delta)
    assert [o.shape for o in out] == [d.shape for d in delta]
    assert all(o.dtype == np.float32 for o in out)
    scale = min(1.0, 1.0 / size)
    for o, d in zip(out, delta, strict=True):
        np.testing.assert_allclose(o, d * scale, rtol=1e-5, atol=1e-7)
    flat_out = np.concatenate([o.ravel() for o in out])
    flat_in = np.concatenate([d.ravel() for d in delta])
    cosine = flat_out @ flat_in / (np.linalg.norm(flat_out) * np.linalg.norm(flat_in))
    assert cosine == pytest.approx(1.0, abs=1e-6)


def test_the_input_arrays_are_left_untouched_with_and_without_noise() -> None:
    delta = delta_of_norm(5.0)
    before = [d.copy() for d in delta]
    for noise in (0.0, 1.0):
        PrivacyFilter(1.0, noise, seed=1).apply(delta)
        for d, b in zip(delta, before, strict=True):
            np.testing.assert_array_equal(d, b)


def test_a_zero_delta_passes_clipping_as_zeros() -> None:
    delta = [np.zeros((3, 3), np.float32), np.zeros(4, np.float32)]
    out = PrivacyFilter(1.0).apply(delta)
    assert all(np.isfinite(o).all() and not o.any() for o in out)


def test_a_float64_delta_comes_back_as_float32() -> None:
    out = PrivacyFilter(1.0).apply([np.full(4, 2.0)])
    assert out[0].dtype == np.float32 and norm(out) == pytest.approx(1.0, rel=1e-6)


# -- noise ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("clip", "sigma"), [(1.0, 0.5), (0.2, 3.0)])
def test_the_noise_has_standard_deviation_sigma_times_the_clip(clip: float, sigma: float
                                                               ) -> None:
    # a zero delta of a million coordinates: the output is the noise alone
    delta = [np.zeros((500, 1000), np.float32), np.zeros(500_000, np.float32)]
    out = np.concatenate([o.ravel() for o in PrivacyFilter(clip, sigma, seed=3).apply(delta)])
    assert out.std() == pytest.approx(sigma * clip, rel=0.01)
    assert abs(out.mean()) < 5 * sigma * clip / math.sqrt(out.size)


def test_the_noise_is_added_to_the_clipped_delta() -> None:
    clip, sigma = 1.0, 0.1
    delta = [np.full(200_000, 1.0, np.float32)]  # norm ~447, clipped to 1
    out = PrivacyFilter(clip, sigma, seed=4).apply(delta)[0]
    clipped = 1.0 / math.sqrt(delta[0].size)
    assert out.mean() == pytest.approx(clipped, abs=5 * sigma * clip / math.sqrt(out.size))
    assert (out - clipped).std() == pytest.approx(sigma * clip, rel=0.01)


def test_the_same_seed_draws_the_same_noise_and_steps_draw_fresh_noise() -> None:
    delta = delta_of_norm(2.0)
    a, b = PrivacyFilter(1.0, 1.0, seed=7), PrivacyFilter(1.0, 1.0, seed=7)
    first_a, first_b = a.apply(delta), b.apply(delta)
    for x, y in zip(first_a, first_b, strict=True):
        np.testing.assert_array_equal(x, y)
    second_a = a.apply(delta)
    assert not all(np.array_equal(x, y) for x, y in zip(first_a, second_a, strict=True))
    other = PrivacyFilter(1.0, 1.0, seed=8).apply(delta)
    assert not all(np.array_equal(x, y) for x, y in zip(first_a, other, strict=True))


def test_without_a_seed_the_noise_cannot_be_regenerated() -> None:
    # what a worker uses: noise derived from a known seed could be subtracted again
    delta = delta_of_norm(2.0)
    a, b = PrivacyFilter(1.0, 1.0).apply(delta), PrivacyFilter(1.0, 1.0).apply(delta)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# -- epsilon -------------------------------------------------------------------------------

def test_nothing_is_spent_before_the_first_update() -> None:
    assert PrivacyFilter(1.0, 1.0).epsilon == 0.0
    assert PrivacyFilter(1.0, 0.0).epsilon == 0.0


def test_clipping_without_noise_spends_an_infinite_epsilon() -> None:
    f = PrivacyFilter(1.0, 0.0)
    f.apply(delta_of_norm(1.0))
    assert f.steps == 1 and f.epsilon == math.inf


def test_each_update_is_one_step_of_the_accountant() -> None:
    f = PrivacyFilter(1.0, 1.2, delta=DELTA, seed=0)
    spent = []
    for steps in range(1, 6):
        f.apply(delta_of_norm(3.0))
        assert f.steps == steps
        spent.append(f.epsilon)
        assert f.epsilon == epsilon_for(1.2, steps, DELTA)
    assert all(later > earlier for earlier, later in pairwise(spent))


def test_epsilon_falls_as_sigma_grows_and_grows_with_the_steps() -> None:
    sigmas = [0.3, 0.5, 1.0, 2.0, 5.0]
    by_sigma = [epsilon_for(s, 10, DELTA) for s in sigmas]
    assert all(b < a for a, b in pairwise(by_sigma))
    by_steps = [epsilon_for(1.0, t, DELTA) for t in (1, 10, 100, 1000)]
    assert all(b > a for a, b in pairwise(by_steps))
    assert epsilon_for(1.0, 10, 1e-3) < epsilon_for(1.0, 10, 1e-7)  # looser delta, less eps


def test_epsilon_is_what_dp_accounting_says_for_composed_gaussian_mechanisms() -> None:
    accountant = dp_accounting.rdp.RdpAccountant()
    for _ in range(20):  # 20 separate Gaussian mechanisms, composed one at a time
        accountant.compose(dp_accounting.GaussianDpEvent(1.1))
    expected = accountant.get_epsilon(DELTA)
    assert epsilon_for(1.1, 20, DELTA) == pytest.approx(expected, rel=1e-9)
    # and a known value: sigma 1, 10 steps, delta 1e-5 (RDP, dp-accounting's default orders)
    assert epsilon_for(1.0, 10, DELTA) == pytest.approx(19.05, abs=0.01)


# -- settings and flags --------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"clip": 0.0}, "--dp-clip 0.0: must be a finite L2 norm > 0"),
    ({"clip": -1.0}, "--dp-clip -1.0"),
    ({"clip": math.inf}, "--dp-clip inf"),
    ({"clip": math.nan}, "--dp-clip nan"),
    ({"clip": 1.0, "noise_multiplier": -0.5}, "--dp-noise -0.5: must be >= 0"),
    ({"clip": 1.0, "noise_multiplier": math.nan}, "--dp-noise nan"),
    ({"clip": 1.0, "delta": 0.0}, "--dp-delta 0.0: must be in (0, 1)"),
    ({"clip": 1.0, "delta": 1.0}, "--dp-delta 1.0"),
])
def test_the_filter_refuses_settings_that_cannot_work_in_one_line(kwargs: dict[str, Any],
                                                                   expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        PrivacyFilter(**kwargs)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("settings", "expected"), [
    ({"dp_clip": 0}, "--dp-clip 0: Input should be greater than 0"),
    ({"dp_clip": -2.5}, "--dp-clip -2.5"),
    ({"dp_clip": 1.0, "dp_noise": -1}, "--dp-noise -1: Input should be greater than or equal"),
    ({"dp_clip": 1.0, "dp_delta": 0}, "--dp-delta 0: Input should be greater than 0"),
    ({"dp_clip": 1.0, "dp_delta": 1.5}, "--dp-delta 1.5: Input should be less than 1"),
    ({"dp_noise": 1.0}, "--dp-noise 1 needs --dp-clip"),
])
def test_bad_privacy_settings_are_refused_in_one_line(settings: dict[str, Any], expected: str
                                                      ) -> None:
    with pytest.raises(ConfigError) as info:
        WorkerConfig(**settings)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_privacy_is_off_by_default() -> None:
    config = WorkerConfig()
    assert config.dp_clip is None and config.dp_noise == 0 and config.dp_delta == DELTA


def test_the_worker_command_refuses_a_negative_noise_in_one_line() -> None:
    result = subprocess.run([dfl(), "worker", "--dp-clip", "1", "--dp-noise", "-1",
                             "--broker", "memory://"],
                            capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "--dp-noise -1" in lines[0], result.stderr


def test_both_commands_document_the_privacy_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.cli import main
    from worker.cli import build_parser

    worker_help = build_parser().format_help()
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    run_help = capsys.readouterr().out
    for text in (worker_help, run_help):
        for flag in ("--dp-clip", "--dp-noise", "--dp-delta", "DFL_DP_NOISE"):
            assert flag in text


def test_dfl_run_passes_the_privacy_flags_to_every_party(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from aggregator.report import Status
    from deploy import cli, launcher

    seen: list[WorkerConfig] = []

    def fake_run(agg_config: object, worker_configs: list[WorkerConfig], **_: object
                 ) -> SimpleNamespace:
        seen.extend(worker_configs)
        return SimpleNamespace(status=Status(finished="fake"), history=[])

    monkeypatch.setattr(launcher, "run_federation", fake_run)
    monkeypatch.setattr(cli, "setup_logging", lambda *_: None)  # keep pytest's log capture
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--parties", "3", "--dp-clip", "0.7", "--dp-noise", "1.3",
                     "--dp-delta", "1e-6", "--no-progress"]) == 0
    assert [c.party_id for c in seen] == [0, 1, 2]
    assert {(c.dp_clip, c.dp_noise, c.dp_delta) for c in seen} == {(0.7, 1.3, 1e-6)}


def test_dfl_run_refuses_noise_without_a_clip_in_one_line() -> None:
    result = subprocess.run([dfl(), "run", "--dp-noise", "0.5", "--no-progress"],
                            capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "--dp-noise 0.5 needs --dp-clip" in lines[0], result.stderr


# -- a federation --------------------------------------------------------------------------

TINY: dict[str, Any] = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic"}


@pytest.mark.slow
def test_parties_report_the_epsilon_they_spent_to_the_aggregator() -> None:
    from aggregator import Aggregator, AggregatorConfig
    from aggregator.report import status_report
    from deploy.remote import status_table
    from worker import Worker

    clip, sigma = 0.5, 1.5
    broker = f"memory://{uuid.uuid4().hex[:8]}"
    agg = Aggregator(AggregatorConfig(broker=broker, min_parties=2, max_versions=6,
                                      local_steps=5, evaluate=False, **TINY)).start()
    parties = [Worker(WorkerConfig(party_id=i, num_parties=2, broker=broker, dp_clip=clip,
                                   dp_noise=sigma, dp_delta=DELTA, **TINY)).start()
               for i in range(2)]
    try:
        assert agg.wait(240), f"version {agg.status.version}: {[p.stats for p in parties]}"
    finally:
        agg.stop()
        agg.wait(60)
        for p in parties:
            p.stop()
            p.wait(60)
    for p in parties:
        assert p.stats.updates_sent > 0
        assert 0 < p.stats.epsilon < math.inf
        # every update sent spent one step; an update trained when the stop came was noised
        # (and counted) but dropped unsent
        dropped = 1 if p._pending is not None else 0
        assert p.stats.epsilon == epsilon_for(sigma, p.stats.updates_sent + dropped, DELTA)
    report = status_report(agg.config.federation, agg.config.strategy, agg.status,
                           agg.membership, 0.0)
    by_party = {r["party"]: r for r in report["parties"]}
    assert set(by_party) == {"0", "1"}
    for party, row in by_party.items():
        recorded = agg.membership.parties[party]
        # the epsilon of the newest update applied, the one after `updates` steps
        assert row["epsilon"] == recorded.metrics["epsilon"] > 0
        assert row["epsilon"] == epsilon_for(sigma, recorded.updates, DELTA)
        sent = next(p for p in parties if p.config.party == party).stats
        assert row["epsilon"] <= sent.epsilon
    assert "epsilon" in status_table(report)


def test_the_status_table_has_no_epsilon_column_without_privacy() -> None:
    from deploy.remote import status_table

    row = {"party": "0", "state": "active", "last_seen_seconds": 0.1, "updates": 3,
           "mean_staleness": 0.5, "local_accuracy": 0.9, "lag": 0, "epsilon": None}
    data = {"federation": "f", "strategy": "fedasync", "version": 3, "updates": 3,
            "updates_per_second": 1.0, "active_parties": 1, "accuracy": None,
            "dead_lettered": {}, "duplicates": 0, "parties": [row]}
    assert "epsilon" not in status_table(data)
    assert "epsilon" in status_table({**data, "parties": [{**row, "epsilon": 4.2}]})
