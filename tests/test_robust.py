"""Robust aggregation: the order statistics and the norm bound against reference
computations, the strategies' robust modes and their checkpoints, the settings that switch
them on, and a simulated federation with one malicious party (numpy only, no TensorFlow)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest

from aggregator import Aggregator, AggregatorConfig
from aggregator.checkpoint import AggregatorState, dumps, loads
from aggregator.cli import build_parser
from aggregator.robust import (
    clip_to_norm,
    coordinate_median,
    global_norm,
    norm_scale,
    trim_count,
    trimmed_mean,
)
from aggregator.staleness import make_staleness
from aggregator.strategies import (
    AGGREGATIONS,
    Clipped,
    Contribution,
    FedAsync,
    FedBuff,
    Outcome,
    Strategy,
    make_strategy,
)
from messages.daemon.cli import flags_for
from messages.errors import ConfigError
from messages.types import NDArrays

CONSTANT = make_staleness("constant")
ONE_OVER_1_PLUS_S = make_staleness("polynomial", a=1.0)
SHAPES = [(3, 4), (5,), (2, 1, 3)]


def readonly(*arrays: np.ndarray) -> NDArrays:
    """Read-only float32 copies, like tensors decoded from a message body."""
    out = []
    for a in arrays:
        b = np.array(a, dtype=np.float32)
        b.flags.writeable = False
        out.append(b)
    return out


def random_deltas(k: int, seed: int, ties: bool = False) -> list[NDArrays]:
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values: many equal values per coordinate
        return [readonly(*(rng.integers(-2, 3, s) for s in SHAPES)) for _ in range(k)]
    return [readonly(*(rng.standard_normal(s) for s in SHAPES)) for _ in range(k)]


def reference(deltas: list[NDArrays], keep: Callable[[np.ndarray], np.ndarray]) -> NDArrays:
    """Per coordinate: sort the K values (float64), ``keep`` a slice of them, average it."""
    result = []
    for i in range(len(deltas[0])):
        values = np.sort(np.stack([d[i].astype(np.float64) for d in deltas]), axis=0)
        result.append(keep(values).mean(axis=0))
    return result


def median_reference(deltas: list[NDArrays]) -> NDArrays:
    k = len(deltas)
    return reference(deltas, lambda v: v[(k - 1) // 2: k // 2 + 1])  # 1 or the 2 middle


def trimmed_reference(deltas: list[NDArrays], beta: float) -> NDArrays:
    k = len(deltas)
    b = int(round(beta * k, 9))  # floor for these exact products
    return reference(deltas, lambda v: v[b:k - b])


def assert_close(got: NDArrays, want: NDArrays) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def contrib(party: str, *d: float, n: int = 1, s: int = 0) -> Contribution:
    return Contribution(party, readonly(np.array(d)), n, s)


def assert_weights(weights: NDArrays, *expected: float) -> None:
    np.testing.assert_allclose(weights[0], np.array(expected, dtype=np.float32), rtol=1e-6)


# --- coordinate-wise median and trimmed mean ---------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_the_median_of_every_coordinate_matches_sorting_and_taking_the_middle(
        k: int, ties: bool) -> None:
    deltas = random_deltas(k, seed=k, ties=ties)
    assert_close(coordinate_median(deltas), median_reference(deltas))


def test_an_even_count_takes_the_mean_of_the_two_middle_values() -> None:
    deltas = [readonly(np.array([v, -v])) for v in (1.0, 7.0, 3.0, 100.0)]
    assert_close(coordinate_median(deltas), [np.array([5.0, -5.0])])


def test_the_median_of_one_delta_is_that_delta() -> None:
    (only,) = random_deltas(1, seed=3)
    assert_close(coordinate_median([only]), [a.astype(np.float64) for a in only])


@pytest.mark.parametrize(("k", "beta"), [(1, 0.4), (3, 0.34), (4, 0.2), (4, 0.25), (5, 0.2),
                                         (5, 0.4), (7, 0.3), (10, 0.1), (10, 0.49)])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_the_trimmed_mean_matches_sorting_dropping_both_ends_and_averaging(
        k: int, beta: float, ties: bool) -> None:
    deltas = random_deltas(k, seed=10 * k, ties=ties)
    assert_close(trimmed_mean(deltas, beta), trimmed_reference(deltas, beta))


def test_the_trimmed_count_rounds_down_per_end() -> None:
    assert [trim_count(k, 0.2) for k in (1, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]
    assert trim_count(4, 0.25) == 1 and trim_count(3, 0.49) == 1
    assert trim_count(100, 0.29) == 29  # 0.29 * 100 is 28.999999999999996 in floats


def test_trimming_nothing_is_the_plain_mean_and_trimming_to_one_value_is_the_median() -> None:
    deltas = random_deltas(5, seed=1)
    mean = [np.mean([d[i].astype(np.float64) for d in deltas], axis=0) for i in range(3)]
    assert_close(trimmed_mean(deltas, 0.0), mean)
    assert_close(trimmed_mean(deltas, 0.4), median_reference(deltas))  # drops 2 of 5 per end


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, float("nan"), "0.2"])
def test_a_trim_fraction_outside_zero_to_one_half_is_refused_in_one_line(beta: object) -> None:
    with pytest.raises(ConfigError, match=r"trim fraction must be a number in \[0, 0.5\)") as e:
        trimmed_mean(random_deltas(3, seed=0), beta)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_the_robust_functions_only_read_their_inputs_and_fill_the_given_buffers() -> None:
    deltas = random_deltas(5, seed=4)
    before = [[a.copy() for a in d] for d in deltas]
    for fn in (coordinate_median, lambda ds, out: trimmed_mean(ds, 0.2, out=out)):
        out = [np.full(s, np.nan, dtype=np.float32) for s in SHAPES]
        result = fn(deltas, out=out)
        assert result is out and not any(np.isnan(o).any() for o in out)
    for d, b in zip(deltas, before, strict=True):  # read-only inputs, and unchanged
        assert all(not a.flags.writeable for a in d)
        for a, c in zip(d, b, strict=True):
            np.testing.assert_array_equal(a, c)


def test_mismatched_or_missing_deltas_raise_value_error() -> None:
    with pytest.raises(ValueError, match="at least one delta"):
        coordinate_median([])
    with pytest.raises(ValueError, match="tensors"):
        trimmed_mean([readonly(np.ones(2)), readonly(np.ones(2), np.ones(1))], 0.0)
    with pytest.raises(ValueError):
        coordinate_median([readonly(np.ones(2)), readonly(np.ones(3))])


# --- the norm bound ----------------------------------------------------------------------------


def test_the_norm_is_taken_over_all_tensors_as_one_vector() -> None:
    assert global_norm(readonly(np.array([3.0]), np.array([[0.0], [4.0]]))) == 5.0
    assert global_norm([]) == 0.0


def test_a_delta_over_the_bound_is_scaled_down_to_it_in_the_given_buffer() -> None:
    delta = readonly(np.array([3.0, 0.0]), np.array([[4.0]]))
    out = [np.empty(2, np.float32), np.empty((1, 1), np.float32)]
    assert clip_to_norm(delta, 1.0, out=out) is out
    np.testing.assert_allclose(out[0], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out[1], [[0.8]], rtol=1e-6)
    assert math.isclose(global_norm(out), 1.0, rel_tol=1e-6)
    np.testing.assert_array_equal(delta[0], [3.0, 0.0])  # the input is untouched
    assert norm_scale(delta, 2.5) == 0.5


@pytest.mark.parametrize("values", [[0.3, 0.4], [3.0, 4.0], [0.0, 0.0]],
                         ids=["under", "at", "zero"])
def test_a_delta_within_the_bound_comes_back_unchanged(values: list[float]) -> None:
    delta = readonly(np.array(values))
    assert norm_scale(delta, 5.0) == 1.0
    np.testing.assert_array_equal(clip_to_norm(delta, 5.0)[0], delta[0])


@pytest.mark.parametrize("bound", [0.0, -1.0, float("inf"), float("nan")])
def test_a_norm_bound_must_be_a_finite_positive_number(bound: float) -> None:
    with pytest.raises(ConfigError, match="norm bound must be a finite number > 0"):
        clip_to_norm(readonly(np.ones(2)), bound)


# --- FedAsync with a norm bound ----------------------------------------------------------------


def test_fedasync_clips_each_delta_to_the_bound_before_mixing_it_in() -> None:
    weights = [np.zeros(2, np.float32)]
    strategy = Clipped(FedAsync(CONSTANT, alpha=0.5), 1.0)
    assert strategy.offer(weights, contrib("a", 3.0, 4.0)) is Outcome.APPLIED  # norm 5 -> 1
    assert_weights(weights, 0.3, 0.4)
    strategy.offer(weights, contrib("b", 0.2, 0.0))  # within the bound: as without one
    assert_weights(weights, 0.4, 0.4)


@pytest.mark.parametrize("bound", [0.0, -2.0, float("inf"), float("nan"), True])
def test_fedasync_refuses_a_bad_norm_bound(bound: float) -> None:
    with pytest.raises(ConfigError, match="max_update_norm must be a finite number > 0"):
        Clipped(FedAsync(CONSTANT), bound)


# --- FedBuff's robust modes --------------------------------------------------------------------


def test_fedbuff_median_applies_eta_times_the_unweighted_coordinate_median() -> None:
    weights = [np.ones(2, np.float32)]
    strategy = FedBuff(ONE_OVER_1_PLUS_S, k=3, eta=0.5, aggregation="median")
    assert strategy.offer(weights, contrib("a", 1.0, 30.0, n=1000, s=0)) is Outcome.BUFFERED
    assert strategy.offer(weights, contrib("b", -50.0, 2.0, n=1, s=9)) is Outcome.BUFFERED
    assert strategy.count == 2 and strategy.parties == ("a", "b")
    assert_weights(weights, 1.0, 1.0)
    assert strategy.offer(weights, contrib("c", 3.0, 4.0, n=1, s=0)) is Outcome.APPLIED
    assert_weights(weights, 1.5, 3.0)  # median [1, 4], not swayed by n=1000 or S(9)
    assert strategy.count == 0


def test_fedbuff_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    weights = [np.zeros(2, np.float32)]
    strategy = FedBuff(CONSTANT, k=5, aggregation="trimmed-mean", trim_fraction=0.2)
    for i, d in enumerate([(1.0, -100.0), (2.0, 5.0), (3.0, 6.0), (1000.0, 7.0), (4.0, 8.0)]):
        strategy.offer(weights, contrib(str(i), *d))
    # sorted: 1 2 3 4 1000 -> keep 2 3 4 -> 3; -100 5 6 7 8 -> keep 5 6 7 -> 6
    assert_weights(weights, 3.0, 6.0)


def test_fedbuff_robust_modes_discard_a_contribution_whose_staleness_weight_underflowed() -> None:
    strategy = FedBuff(lambda s: 0.0, k=3, aggregation="median")
    assert strategy.offer([np.zeros(1, np.float32)], contrib("a", 1.0)) is Outcome.DISCARDED
    assert strategy.count == 0


def test_fedbuff_mean_folds_the_norm_bound_into_each_deltas_multiply() -> None:
    weights = [np.zeros(2, np.float32)]
    strategy = Clipped(FedBuff(CONSTANT, k=2), 1.0)
    strategy.offer(weights, contrib("a", 3.0, 4.0, n=1))  # clipped to [0.6, 0.8]
    strategy.offer(weights, contrib("b", 0.0, 0.5, n=3))  # within the bound
    assert_weights(weights, 0.15, 0.575)  # (1 * [0.6, 0.8] + 3 * [0, 0.5]) / 4


def test_fedbuff_median_keeps_a_clipped_copy_and_leaves_the_offered_delta_alone() -> None:
    weights = [np.zeros(1, np.float32)]
    strategy = Clipped(FedBuff(CONSTANT, k=3, aggregation="median"), 2.0)
    big = contrib("evil", 1000.0)
    for c in (contrib("a", 1.0), big, contrib("b", -1.0)):
        strategy.offer(weights, c)
    assert_weights(weights, 1.0)  # median of [1, 2 (clipped), -1]
    assert big.delta[0][0] == 1000.0


def test_fedbuff_keeps_references_to_the_buffered_deltas_not_copies() -> None:
    strategy = FedBuff(CONSTANT, k=3, aggregation="trimmed-mean", trim_fraction=0.34)
    c = contrib("a", 1.0, 2.0)
    strategy.offer([np.zeros(2, np.float32)], c)
    assert strategy.state()["deltas"][0][0] is c.delta[0]


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_fedbuff_robust_state_survives_a_checkpoint_and_continues_identically(
        aggregation: str) -> None:
    options = {"k": 4, "eta": 0.7, "aggregation": aggregation, "trim_fraction": 0.25}
    original, restored = FedBuff(CONSTANT, **options), FedBuff(CONSTANT, **options)
    w1 = [np.zeros(s, np.float32) for s in SHAPES]
    w2 = [np.zeros(s, np.float32) for s in SHAPES]
    offered = random_deltas(4, seed=42)
    for i, d in enumerate(offered[:3]):
        original.offer(w1, Contribution(f"p{i}", d, 10 + i, i))
    snapshot = original.state()
    assert snapshot["aggregation"] == aggregation and snapshot["count"] == 3
    assert snapshot["num_samples"] == [10, 11, 12] and snapshot["staleness"] == [0, 1, 2]
    assert snapshot["accumulator"] == []
    on_disk = loads(dumps(AggregatorState(strategy=snapshot))).strategy
    restored.load_state(on_disk)
    assert restored.parties == ("p0", "p1", "p2")
    last = Contribution("p3", offered[3], 13, 0)
    assert original.offer(w1, last) is Outcome.APPLIED
    assert restored.offer(w2, last) is Outcome.APPLIED
    for a, b in zip(w1, w2, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(snapshot["deltas"]) == 3  # the snapshot did not change as the buffer emptied


def test_a_robust_buffer_loads_into_mean_mode_as_if_mean_mode_had_buffered_it() -> None:
    cs = [Contribution(f"p{i}", d, 5 + i, i) for i, d in enumerate(random_deltas(3, seed=7))]
    mean, robust = FedBuff(ONE_OVER_1_PLUS_S, k=3), FedBuff(ONE_OVER_1_PLUS_S, k=3,
                                                            aggregation="median")
    w1 = [np.zeros(s, np.float32) for s in SHAPES]
    w2 = [np.zeros(s, np.float32) for s in SHAPES]
    for c in cs[:2]:
        mean.offer(w1, c)
        robust.offer(w2, c)
    switched = FedBuff(ONE_OVER_1_PLUS_S, k=3)
    switched.load_state(robust.state())
    mean.offer(w1, cs[2])
    switched.offer(w2, cs[2])
    for a, b in zip(w1, w2, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_non_empty_running_sum_cannot_be_loaded_into_a_robust_mode() -> None:
    mean = FedBuff(CONSTANT, k=3)
    robust = FedBuff(CONSTANT, k=3, aggregation="median")
    robust.load_state(mean.state())  # an empty buffer loads anywhere
    mean.offer([np.zeros(1, np.float32)], contrib("a", 1.0))
    with pytest.raises(ValueError, match="cannot be loaded with aggregation 'median'"):
        robust.load_state(mean.state())


def test_a_snapshot_from_before_the_robust_modes_still_loads() -> None:
    old, new = FedBuff(CONSTANT, k=2), FedBuff(CONSTANT, k=2)
    w1, w2 = [np.zeros(1, np.float32)], [np.zeros(1, np.float32)]
    old.offer(w1, contrib("a", 2.0))
    snapshot = old.state()
    for key in ("aggregation", "deltas", "num_samples", "staleness"):
        del snapshot[key]
    new.load_state(snapshot)
    old.offer(w1, contrib("b", 4.0))
    new.offer(w2, contrib("b", 4.0))
    assert_weights(w2, 3.0)
    np.testing.assert_array_equal(w1[0], w2[0])


@pytest.mark.parametrize(("options", "message"), [
    ({"aggregation": "mode"}, "aggregation must be one of mean, median, trimmed-mean"),
    ({"aggregation": "median", "k": 2}, "fedbuff median needs k >= 3"),
    ({"aggregation": "trimmed-mean", "k": 2, "trim_fraction": 0.4}, "needs k >= 3"),
    ({"aggregation": "trimmed-mean", "k": 4, "trim_fraction": 0.2},
     r"trims nothing \(floor\(0.2 \* 4\) = 0\): use a trim fraction of at least 0.25"),
    ({"trim_fraction": 0.5}, r"trim fraction must be a number in \[0, 0.5\)"),
])
def test_fedbuff_refuses_options_that_cannot_work_or_would_not_protect(
        options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FedBuff(CONSTANT, **{"k": 4, **options})  # type: ignore[arg-type]


def test_make_strategy_passes_the_robust_options_and_refuses_them_where_unused() -> None:
    common = {"staleness": CONSTANT, "alpha": 0.5, "k": 5, "eta": 1.0}
    fedbuff = make_strategy("fedbuff", **common, aggregation="trimmed-mean",
                            trim_fraction=0.2, max_update_norm=3.0)
    assert isinstance(fedbuff, Clipped) and isinstance(fedbuff.inner, FedBuff)
    assert (fedbuff.aggregation, fedbuff.trim_fraction, fedbuff.max_update_norm) == (
        "trimmed-mean", 0.2, 3.0)
    with pytest.raises(ConfigError, match="max_update_norm must be a finite number > 0"):
        Clipped(FedBuff(CONSTANT, k=4), 0.0)
    fedasync = make_strategy("fedasync", **common, max_update_norm=2.0)
    assert isinstance(fedasync, Clipped) and isinstance(fedasync.inner, FedAsync)
    assert fedasync.max_update_norm == 2.0
    for name in ("fedasync", "fedavg"):
        with pytest.raises(ConfigError, match="aggregation 'median' needs strategy fedbuff"):
            make_strategy(name, **common, aggregation="median")
    with pytest.raises(ConfigError, match="max_update_norm needs strategy fedasync or fedbuff"):
        make_strategy("fedavg", **common, max_update_norm=1.0)
    assert AGGREGATIONS == ("mean", "median", "trimmed-mean")


# --- settings ----------------------------------------------------------------------------------


def test_the_robust_settings_default_to_plain_averaging() -> None:
    config = AggregatorConfig()
    assert (config.aggregation, config.trim_fraction, config.max_update_norm) == (
        "mean", 0.2, None)


@pytest.mark.parametrize(("values", "message"), [
    ({"aggregation": "median"}, "--aggregation median needs --strategy fedbuff"),
    ({"strategy": "fedavg", "aggregation": "trimmed-mean"},
     "--aggregation trimmed-mean needs --strategy fedbuff"),
    ({"strategy": "fedavg", "max_update_norm": 1.0},
     "--max-update-norm needs --strategy fedasync or fedbuff"),
    ({"strategy": "fedbuff", "trim_fraction": 0.5}, "--trim-fraction 0.5: Input should be less"),
    ({"max_update_norm": 0.0}, "--max-update-norm 0.0: Input should be greater than 0"),
    ({"strategy": "fedbuff", "aggregation": "average"}, "--aggregation 'average'"),
])
def test_robust_settings_that_cannot_work_are_refused_in_one_line(
        values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        AggregatorConfig(**values)  # type: ignore[arg-type]
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_flags_reach_the_aggregators_strategy() -> None:
    ns = build_parser().parse_args(["--strategy", "fedbuff", "--buffer-k", "4",
                                    "--aggregation", "trimmed-mean", "--trim-fraction", "0.25",
                                    "--max-update-norm", "2.5", "--no-eval"])
    strategy = Aggregator(AggregatorConfig.load(flags_for(ns, AggregatorConfig))).strategy
    assert isinstance(strategy, Clipped) and isinstance(strategy.inner, FedBuff)
    assert (strategy.aggregation, strategy.trim_fraction, strategy.max_update_norm, strategy.k
            ) == ("trimmed-mean", 0.25, 2.5, 4)
    ns = build_parser().parse_args(["--max-update-norm", "0.5", "--no-eval"])
    fedasync = Aggregator(AggregatorConfig.load(flags_for(ns, AggregatorConfig))).strategy
    assert isinstance(fedasync, Clipped) and isinstance(fedasync.inner, FedAsync)
    assert fedasync.max_update_norm == 0.5


# --- one malicious party in a simulated federation ---------------------------------------------
#
# Softmax regression on 10 Gaussian classes in 20 dimensions (overlapping, so the clean run
# reaches about 70 % rather than 100 % and damage shows). Five parties with 1000 IID samples
# each; an honest delta is 5 full-batch gradient steps (lr 0.5) from the current model. Party
# 0 is malicious: it sends its honest delta times -10 (sign flip) or times +50 (scaled).
# 100 updates, round-robin, every update trained on the newest model (staleness 0). FedBuff
# runs with K = 5 (one update of each party per buffer), FedAsync with alpha 0.6; the norm
# bound of 0.25 is about a sixth of an honest delta's norm at the start (about 1.4).

CLASSES, FEATURES, PARTIES, PER_PARTY, UPDATES = 10, 20, 5, 1000, 100
MALICIOUS = 0
SIGN_FLIP, SCALED = -10.0, 50.0
NORM_BOUND = 0.25
TOLERANCE = 0.02
"""Each robust option under attack ends within 2 accuracy points of the clean run."""


@dataclass(frozen=True)
class Task:
    means: np.ndarray
    shards: list[tuple[np.ndarray, np.ndarray]]
    x_test: np.ndarray
    y_test: np.ndarray


@cache
def task() -> Task:
    rng = np.random.default_rng(0)
    means = rng.normal(0.0, 0.5, (CLASSES, FEATURES))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, CLASSES, n)
        return (means[y] + rng.normal(0.0, 1.0, (n, FEATURES))).astype(np.float32), y

    x, y = sample(PARTIES * PER_PARTY)
    x_test, y_test = sample(3000)
    shards = [(x[p::PARTIES], y[p::PARTIES]) for p in range(PARTIES)]
    return Task(means, shards, x_test, y_test)


def probabilities(w: NDArrays, x: np.ndarray) -> np.ndarray:
    z = x @ w[0] + w[1]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def local_delta(w: NDArrays, x: np.ndarray, y: np.ndarray) -> NDArrays:
    """5 full-batch gradient steps of softmax regression from ``w``; returns new - old."""
    kernel, bias = w[0].copy(), w[1].copy()
    onehot = np.eye(CLASSES, dtype=np.float32)[y]
    for _ in range(5):
        g = probabilities([kernel, bias], x) - onehot
        kernel -= 0.5 * (x.T @ g) / len(y)
        bias -= 0.5 * g.mean(axis=0)
    return [kernel - w[0], bias - w[1]]


@cache
def federate(kind: str, factor: float | None) -> tuple[float, float]:
    """Test accuracy and cross-entropy after UPDATES updates; ``factor`` None = no attack."""
    strategy: Strategy = {
        "fedbuff-mean": lambda: FedBuff(CONSTANT, k=PARTIES),
        "fedbuff-median": lambda: FedBuff(CONSTANT, k=PARTIES, aggregation="median"),
        "fedbuff-trimmed": lambda: FedBuff(CONSTANT, k=PARTIES, aggregation="trimmed-mean",
                                           trim_fraction=0.2),
        "fedasync": lambda: FedAsync(CONSTANT, alpha=0.6),
        "fedasync-bounded": lambda: Clipped(FedAsync(CONSTANT, alpha=0.6), NORM_BOUND),
    }[kind]()
    t = task()
    w = [np.zeros((FEATURES, CLASSES), np.float32), np.zeros(CLASSES, np.float32)]
    for step in range(UPDATES):
        party = step % PARTIES
        delta = local_delta(w, *t.shards[party])
        if party == MALICIOUS and factor is not None:
            delta = [np.float32(factor) * d for d in delta]
        strategy.offer(w, Contribution(str(party), readonly(*delta), PER_PARTY, 0))
    p = probabilities(w, t.x_test)
    accuracy = float((p.argmax(axis=1) == t.y_test).mean())
    loss = float(-np.log(p[np.arange(len(t.y_test)), t.y_test] + 1e-12).mean())
    return accuracy, loss


CLEAN = {"fedbuff-median": "fedbuff-mean", "fedbuff-trimmed": "fedbuff-mean",
         "fedasync-bounded": "fedasync"}
"""Which clean run each robust option is measured against: its plain counterpart."""


def test_the_clean_federation_learns_and_the_robust_options_cost_it_almost_nothing() -> None:
    for plain in ("fedbuff-mean", "fedasync"):
        assert federate(plain, None)[0] > 0.6  # chance is 0.1
    for robust_kind, plain in CLEAN.items():
        assert abs(federate(robust_kind, None)[0] - federate(plain, None)[0]) <= TOLERANCE


@pytest.mark.parametrize("plain", ["fedbuff-mean", "fedasync"])
def test_plain_averaging_collapses_when_one_party_flips_and_scales_its_sign(plain: str) -> None:
    clean, _ = federate(plain, None)
    attacked, _ = federate(plain, SIGN_FLIP)
    assert clean - attacked > 0.5  # about 70 % down to about 0 %


@pytest.mark.parametrize("plain", ["fedbuff-mean", "fedasync"])
def test_plain_averaging_degrades_when_one_party_scales_its_delta_up(plain: str) -> None:
    clean, clean_loss = federate(plain, None)
    attacked, attacked_loss = federate(plain, SCALED)
    assert clean - attacked > 0.10  # about 12 points
    assert attacked_loss > 2 * clean_loss  # the model overshoots: test loss 2.5x to 7x


@pytest.mark.parametrize("factor", [SIGN_FLIP, SCALED], ids=["sign-flip", "scaled"])
@pytest.mark.parametrize("robust_kind", list(CLEAN))
def test_each_robust_option_stays_within_two_points_of_the_clean_run(
        robust_kind: str, factor: float) -> None:
    clean, _ = federate(CLEAN[robust_kind], None)
    attacked, _ = federate(robust_kind, factor)
    assert abs(clean - attacked) <= TOLERANCE, (robust_kind, factor, clean, attacked)
