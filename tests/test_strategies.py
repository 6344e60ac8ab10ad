"""Aggregation strategies against small hand-computed arrays."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.staleness import make_staleness
from aggregator.strategies import (
    STRATEGIES,
    Contribution,
    FedAsync,
    FedAvg,
    FedBuff,
    Outcome,
    make_strategy,
)
from messages.errors import ConfigError
from messages.types import NDArrays

CONSTANT = make_staleness("constant")
ONE_OVER_1_PLUS_S = make_staleness("polynomial", a=1.0)


def vec(*values: float) -> NDArrays:
    """One float32 tensor, the way the model's weights and decoded deltas look."""
    return [np.array(values, dtype=np.float32)]


def readonly(*values: float) -> NDArrays:
    """A read-only delta, like one decoded from a message body."""
    (a,) = vec(*values)
    a.flags.writeable = False
    return [a]


def contrib(party: str, *d: float, n: int = 1, s: int = 0) -> Contribution:
    return Contribution(party=party, delta=readonly(*d), num_samples=n, staleness=s)


def assert_weights(weights: NDArrays, *expected: float) -> None:
    np.testing.assert_allclose(weights[0], np.array(expected, dtype=np.float32), rtol=1e-6)


# --- Contribution ------------------------------------------------------------------------------


def test_a_contribution_needs_at_least_one_sample() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        contrib("a", 1.0, n=0)


def test_a_contribution_cannot_have_negative_staleness() -> None:
    with pytest.raises(ValueError, match="staleness"):
        contrib("a", 1.0, s=-1)


# --- FedAsync ----------------------------------------------------------------------------------


def test_fedasync_adds_alpha_times_staleness_weight_times_delta() -> None:
    weights = vec(1.0, 1.0)
    half_at_3 = make_staleness("polynomial", a=0.5)  # S(3) = 0.5
    outcome = FedAsync(half_at_3, alpha=0.5).offer(weights, contrib("a", 2.0, 4.0, s=3))
    assert outcome is Outcome.APPLIED
    assert_weights(weights, 1.5, 2.0)


def test_fedasync_applies_every_offer_and_ignores_sample_counts() -> None:
    weights = vec(0.0, 0.0)
    strategy = FedAsync(CONSTANT, alpha=0.5)
    assert strategy.offer(weights, contrib("a", 2.0, 0.0, n=100)) is Outcome.APPLIED
    assert strategy.offer(weights, contrib("b", 0.0, 2.0, n=1)) is Outcome.APPLIED
    assert_weights(weights, 1.0, 1.0)


def test_fedasync_mutates_the_callers_arrays_in_place() -> None:
    weights = [np.ones((2, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)]
    before = [id(w) for w in weights]
    delta = [np.full((2, 2), 2.0, dtype=np.float32), np.array([1, 2, 3], dtype=np.float32)]
    FedAsync(CONSTANT, alpha=0.5).offer(weights, Contribution("a", delta, 1, 0))
    assert [id(w) for w in weights] == before
    assert all(w.dtype == np.float32 for w in weights)
    np.testing.assert_array_equal(weights[0], np.full((2, 2), 2.0))
    np.testing.assert_array_equal(weights[1], [0.5, 1.0, 1.5])
    np.testing.assert_array_equal(delta[1], [1, 2, 3])  # the delta was only read


def test_fedasync_is_always_applied_and_ignores_membership() -> None:
    assert FedAsync(CONSTANT).parties_changed(vec(1.0), frozenset({"a"})) is False


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_fedasync_rejects_alpha_outside_zero_to_one(alpha: float) -> None:
    with pytest.raises(ConfigError, match=r"alpha must be a number in \(0, 1\]"):
        FedAsync(CONSTANT, alpha=alpha)


def test_fedasync_accepts_alpha_of_exactly_one() -> None:
    weights = vec(1.0)
    FedAsync(CONSTANT, alpha=1.0).offer(weights, contrib("a", 3.0))
    assert_weights(weights, 4.0)


def test_a_delta_whose_shapes_differ_from_the_weights_raises_value_error() -> None:
    weights = vec(1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        FedAsync(CONSTANT).offer(weights, contrib("a", 1.0))
    with pytest.raises(ValueError, match="tensors"):
        FedAsync(CONSTANT).offer(weights, Contribution("a", [], 1, 0))
    assert_weights(weights, 1.0, 1.0)


# --- FedBuff -----------------------------------------------------------------------------------


def test_fedbuff_buffers_k_minus_one_then_applies_the_weighted_mean() -> None:
    weights = vec(1.0, 1.0)
    strategy = FedBuff(ONE_OVER_1_PLUS_S, k=3, eta=0.5)
    # weights n * S(s): 2 * 1/2 = 1, 3 * 1 = 3, 4 * 1/4 = 1; total 5
    assert strategy.offer(weights, contrib("a", 4.0, 8.0, n=2, s=1)) is Outcome.BUFFERED
    assert strategy.offer(weights, contrib("b", 0.0, 4.0, n=3, s=0)) is Outcome.BUFFERED
    assert_weights(weights, 1.0, 1.0)
    assert strategy.count == 2
    assert strategy.parties == ("a", "b")
    assert strategy.offer(weights, contrib("c", -4.0, 0.0, n=4, s=3)) is Outcome.APPLIED
    # sum = [4 + 0 - 4, 8 + 12 + 0] = [0, 20]; / 5 = [0, 4]; * eta 0.5 = [0, 2]
    assert_weights(weights, 1.0, 3.0)


def test_fedbuff_weighs_by_sample_count() -> None:
    weights = vec(1.0, 1.0)
    strategy = FedBuff(CONSTANT, k=2)
    strategy.offer(weights, contrib("a", 2.0, 0.0, n=1))
    strategy.offer(weights, contrib("b", -2.0, 4.0, n=3))
    # [2 - 6, 0 + 12] / 4 = [-1, 3]
    assert_weights(weights, 0.0, 4.0)


def test_fedbuff_empties_its_buffer_after_applying() -> None:
    weights = vec(1.0, 1.0)
    strategy = FedBuff(CONSTANT, k=2, eta=0.5)
    strategy.offer(weights, contrib("a", 8.0, 8.0))
    strategy.offer(weights, contrib("b", 8.0, 8.0))
    assert_weights(weights, 5.0, 5.0)
    assert strategy.count == 0
    assert strategy.parties == ()
    assert strategy.offer(weights, contrib("a", 2.0, 0.0)) is Outcome.BUFFERED
    assert_weights(weights, 5.0, 5.0)
    assert strategy.offer(weights, contrib("b", 0.0, 2.0)) is Outcome.APPLIED
    assert_weights(weights, 5.5, 5.5)  # only the new buffer: [1, 1] * 0.5


def test_fedbuff_with_k_one_applies_every_offer() -> None:
    weights = vec(0.0)
    strategy = FedBuff(CONSTANT, k=1, eta=0.5)
    assert strategy.offer(weights, contrib("a", 4.0, n=7)) is Outcome.APPLIED
    assert_weights(weights, 2.0)


def test_fedbuff_counts_the_same_party_twice_in_one_buffer() -> None:
    weights = vec(0.0)
    strategy = FedBuff(CONSTANT, k=2)
    assert strategy.offer(weights, contrib("a", 2.0)) is Outcome.BUFFERED
    assert strategy.offer(weights, contrib("a", 4.0)) is Outcome.APPLIED
    assert_weights(weights, 3.0)


def test_fedbuff_mutates_the_callers_arrays_in_place() -> None:
    weights = [np.ones((2, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)]
    views = [w[...] for w in weights]
    strategy = FedBuff(CONSTANT, k=2)
    for _ in range(2):
        delta = [np.full((2, 2), 3.0, dtype=np.float32), np.array([1, 2, 3], dtype=np.float32)]
        strategy.offer(weights, Contribution("a", delta, 1, 0))
    np.testing.assert_array_equal(views[0], np.full((2, 2), 4.0))
    np.testing.assert_array_equal(views[1], [1.0, 2.0, 3.0])
    assert all(w.dtype == np.float32 for w in weights)


def test_fedbuff_ignores_membership() -> None:
    weights = vec(0.0)
    strategy = FedBuff(CONSTANT, k=2)
    strategy.offer(weights, contrib("a", 2.0))
    assert strategy.parties_changed(weights, frozenset()) is False
    assert strategy.count == 1


@pytest.mark.parametrize("k", [0, -1])
def test_fedbuff_rejects_k_below_one(k: int) -> None:
    with pytest.raises(ConfigError, match="k must be an integer >= 1"):
        FedBuff(CONSTANT, k=k)


@pytest.mark.parametrize("eta", [0.0, -1.0, float("inf")])
def test_fedbuff_rejects_a_non_positive_eta(eta: float) -> None:
    with pytest.raises(ConfigError, match="eta must be"):
        FedBuff(CONSTANT, eta=eta)


def test_fedbuff_state_holds_the_running_sum_weight_sum_count_and_parties() -> None:
    weights = vec(0.0, 0.0)
    strategy = FedBuff(ONE_OVER_1_PLUS_S, k=3)
    strategy.offer(weights, contrib("a", 1.0, 2.0, n=4, s=1))  # weight 2
    state = strategy.state()
    assert state["strategy"] == "fedbuff"
    assert state["count"] == 1
    assert state["parties"] == ["a"]
    assert state["weight_sum"] == 2.0
    np.testing.assert_array_equal(state["accumulator"][0], [2.0, 4.0])
    strategy.offer(weights, contrib("b", 1.0, 2.0))
    np.testing.assert_array_equal(state["accumulator"][0], [2.0, 4.0])  # a snapshot, a copy


def test_fedbuff_state_round_trip_continues_identically() -> None:
    original = FedBuff(ONE_OVER_1_PLUS_S, k=3, eta=0.7)
    restored = FedBuff(ONE_OVER_1_PLUS_S, k=3, eta=0.7)
    w1, w2 = vec(0.1, 0.2, 0.3), vec(0.1, 0.2, 0.3)
    original.offer(w1, contrib("a", 0.3, -1.7, 2.9, n=17, s=2))
    original.offer(w1, contrib("b", 1.1, 0.13, -0.5, n=5, s=0))
    restored.load_state(original.state())
    assert restored.parties == ("a", "b")
    last = contrib("c", -0.7, 0.4, 0.01, n=9, s=5)
    assert original.offer(w1, last) is Outcome.APPLIED
    assert restored.offer(w2, last) is Outcome.APPLIED
    np.testing.assert_array_equal(w1[0], w2[0])


def test_loading_another_strategys_state_raises_value_error() -> None:
    with pytest.raises(ValueError, match="fedavg"):
        FedBuff(CONSTANT).load_state(FedAvg().state())


# --- FedAvg ------------------------------------------------------------------------------------


def fedavg_with(*parties: str, eta: float = 1.0) -> tuple[FedAvg, NDArrays]:
    strategy = FedAvg(eta=eta)
    weights = vec(1.0, 1.0)
    assert strategy.parties_changed(weights, frozenset(parties)) is False
    return strategy, weights


def test_fedavg_waits_for_every_active_party_then_applies_the_sample_weighted_mean() -> None:
    strategy, weights = fedavg_with("a", "b")
    assert strategy.offer(weights, contrib("a", 4.0, 0.0, n=1)) is Outcome.BUFFERED
    assert_weights(weights, 1.0, 1.0)
    assert strategy.waiting_for == {"b"}
    assert strategy.offer(weights, contrib("b", 0.0, 4.0, n=3)) is Outcome.APPLIED
    # [4, 12] / 4 = [1, 3]
    assert_weights(weights, 2.0, 4.0)
    assert strategy.waiting_for == {"a", "b"}  # the next round waits for both again


def test_fedavg_scales_the_mean_by_eta() -> None:
    strategy, weights = fedavg_with("a", "b", eta=0.5)
    strategy.offer(weights, contrib("a", 4.0, 0.0, n=1))
    strategy.offer(weights, contrib("b", 0.0, 4.0, n=3))
    assert_weights(weights, 1.5, 2.5)


def test_fedavg_discards_a_stale_contribution() -> None:
    strategy, weights = fedavg_with("a", "b")
    assert strategy.offer(weights, contrib("a", 4.0, 4.0, s=1)) is Outcome.DISCARDED
    assert strategy.waiting_for == {"a", "b"}


def test_fedavg_discards_a_second_contribution_from_the_same_party() -> None:
    strategy, weights = fedavg_with("a", "b")
    assert strategy.offer(weights, contrib("a", 2.0, 2.0)) is Outcome.BUFFERED
    assert strategy.offer(weights, contrib("a", 100.0, 100.0)) is Outcome.DISCARDED
    assert strategy.offer(weights, contrib("b", 0.0, 0.0)) is Outcome.APPLIED
    assert_weights(weights, 2.0, 2.0)  # the first one counted: [2, 2] / 2


def test_fedavg_discards_a_party_that_is_not_active() -> None:
    strategy, weights = fedavg_with("a")
    assert strategy.offer(weights, contrib("stranger", 1.0, 1.0)) is Outcome.DISCARDED
    assert_weights(weights, 1.0, 1.0)


def test_fedavg_discards_everything_before_it_knows_any_party() -> None:
    weights = vec(1.0, 1.0)
    assert FedAvg().offer(weights, contrib("a", 1.0, 1.0)) is Outcome.DISCARDED
    assert_weights(weights, 1.0, 1.0)


def test_fedavg_completes_the_round_when_the_missing_party_leaves() -> None:
    strategy, weights = fedavg_with("a", "b", "c")
    strategy.offer(weights, contrib("a", 2.0, 0.0))
    strategy.offer(weights, contrib("b", 0.0, 2.0))
    assert strategy.parties_changed(weights, frozenset({"a", "b"})) is True
    assert_weights(weights, 2.0, 2.0)
    assert strategy.waiting_for == {"a", "b"}


def test_fedavg_drops_the_contribution_of_a_party_that_left() -> None:
    strategy, weights = fedavg_with("a", "b", "c")
    strategy.offer(weights, contrib("a", 100.0, 100.0))
    assert strategy.parties_changed(weights, frozenset({"b", "c"})) is False
    assert strategy.offer(weights, contrib("b", 2.0, 0.0)) is Outcome.BUFFERED
    assert strategy.offer(weights, contrib("c", 0.0, 2.0)) is Outcome.APPLIED
    assert_weights(weights, 2.0, 2.0)


def test_fedavg_keeps_waiting_when_a_party_that_already_contributed_leaves() -> None:
    strategy, weights = fedavg_with("a", "b")
    strategy.offer(weights, contrib("a", 100.0, 100.0))
    assert strategy.parties_changed(weights, frozenset({"b"})) is False
    assert strategy.waiting_for == {"b"}
    assert_weights(weights, 1.0, 1.0)


def test_fedavg_does_not_wait_for_a_party_that_joined_mid_round_until_the_next_round() -> None:
    strategy, weights = fedavg_with("a", "b")
    strategy.offer(weights, contrib("a", 2.0, 0.0))
    assert strategy.parties_changed(weights, frozenset({"a", "b", "c"})) is False
    assert strategy.waiting_for == {"b"}
    assert strategy.offer(weights, contrib("c", 50.0, 50.0)) is Outcome.DISCARDED
    assert strategy.offer(weights, contrib("b", 0.0, 2.0)) is Outcome.APPLIED
    assert_weights(weights, 2.0, 2.0)
    # the next round waits for the newcomer too
    assert strategy.offer(weights, contrib("a", 3.0, 0.0)) is Outcome.BUFFERED
    assert strategy.offer(weights, contrib("b", 0.0, 3.0)) is Outcome.BUFFERED
    assert strategy.offer(weights, contrib("c", 0.0, 0.0)) is Outcome.APPLIED
    assert_weights(weights, 3.0, 3.0)


def test_fedavg_fixes_a_rounds_participants_as_soon_as_it_has_any() -> None:
    strategy, weights = fedavg_with("a")
    strategy.parties_changed(weights, frozenset({"a", "b"}))
    assert strategy.waiting_for == {"a"}
    assert strategy.offer(weights, contrib("a", 1.0, 1.0)) is Outcome.APPLIED


def test_fedavg_opens_a_fresh_round_after_everyone_left() -> None:
    strategy, weights = fedavg_with("a", "b")
    strategy.offer(weights, contrib("a", 100.0, 100.0))
    assert strategy.parties_changed(weights, frozenset()) is False
    assert strategy.parties_changed(weights, frozenset({"c"})) is False
    assert strategy.waiting_for == {"c"}
    assert strategy.offer(weights, contrib("c", 1.0, 1.0)) is Outcome.APPLIED
    assert_weights(weights, 2.0, 2.0)


def test_fedavg_mutates_the_callers_arrays_in_place() -> None:
    strategy, weights = fedavg_with("a")
    view = weights[0][...]
    strategy.offer(weights, contrib("a", 1.0, 2.0))
    np.testing.assert_array_equal(view, [2.0, 3.0])
    assert weights[0].dtype == np.float32


@pytest.mark.parametrize("eta", [0.0, -1.0])
def test_fedavg_rejects_a_non_positive_eta(eta: float) -> None:
    with pytest.raises(ConfigError, match="eta must be"):
        FedAvg(eta=eta)


def test_fedavg_state_round_trip_continues_identically() -> None:
    original, w1 = fedavg_with("a", "b", "c", eta=0.9)
    original.offer(w1, contrib("a", 0.3, -1.7, n=17))
    original.parties_changed(w1, frozenset({"a", "b", "c", "d"}))
    state = original.state()
    assert state["parties"] == ["a"]
    assert state["participants"] == ["a", "b", "c"]
    assert state["active"] == ["a", "b", "c", "d"]
    restored, w2 = FedAvg(eta=0.9), vec(1.0, 1.0)
    restored.load_state(state)
    assert restored.waiting_for == {"b", "c"}
    for c in (contrib("b", 1.1, 0.13, n=5), contrib("c", -0.7, 0.01, n=9)):
        assert original.offer(w1, c) is restored.offer(w2, c)
    np.testing.assert_array_equal(w1[0], w2[0])
    assert restored.waiting_for == {"a", "b", "c", "d"}


# --- make_strategy -----------------------------------------------------------------------------


def test_the_strategies_on_offer_are_fedasync_fedbuff_and_fedavg() -> None:
    assert STRATEGIES == ("fedasync", "fedbuff", "fedavg")


def test_make_strategy_builds_each_strategy_with_its_options() -> None:
    fedasync, fedbuff, fedavg = (
        make_strategy(name, staleness=CONSTANT, alpha=0.3, k=7, eta=0.8) for name in STRATEGIES
    )
    assert isinstance(fedasync, FedAsync) and fedasync.alpha == 0.3
    assert isinstance(fedbuff, FedBuff) and (fedbuff.k, fedbuff.eta) == (7, 0.8)
    assert isinstance(fedavg, FedAvg) and fedavg.eta == 0.8
    assert [s.name for s in (fedasync, fedbuff, fedavg)] == list(STRATEGIES)


def test_make_strategy_rejects_an_unknown_name_listing_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="fedasync, fedbuff, fedavg"):
        make_strategy("fedprox", staleness=CONSTANT, alpha=0.5, k=2, eta=1.0)


def test_make_strategy_checks_the_options_of_the_chosen_strategy() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        make_strategy("fedasync", staleness=CONSTANT, alpha=2.0, k=2, eta=1.0)
    make_strategy("fedavg", staleness=CONSTANT, alpha=2.0, k=0, eta=1.0)  # unused: ignored
