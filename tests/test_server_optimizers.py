"""Server optimizers: each step against a hand-written reference, and checkpoints that make a
restarted strategy continue exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aggregator import AggregatorConfig
from aggregator.staleness import make_staleness
from aggregator.strategies import Contribution, FedAsync, FedAvg, FedBuff, make_optimizer
from aggregator.strategies.optimizers import Adam, Momentum, Plain, Yogi, staleness_scaled
from aggregator.strategies.secure import SecureFedBuff
from messages.errors import ConfigError


def deltas(seed: int, n: int = 6) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(0, 0.01, (3, 4)).astype(np.float32),
             rng.normal(0, 0.01, (4,)).astype(np.float32)] for _ in range(n)]


def zeros() -> list[np.ndarray]:
    return [np.zeros((3, 4), np.float32), np.zeros((4,), np.float32)]


def test_momentum_adam_and_yogi_match_their_definitions() -> None:
    ds = [d[0].astype(np.float64) for d in deltas(0, 5)]
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    for opt in (Momentum(b1), Adam(b1, b2, tau), Yogi(b1, b2, tau)):
        w = [np.zeros((3, 4), np.float64)]
        ref = np.zeros((3, 4))
        m, v = np.zeros((3, 4)), np.full((3, 4), tau**2)
        for d in ds:
            opt.step(w, [d], lr)
            if isinstance(opt, Yogi):
                m = b1 * m + (1 - b1) * d
                v = v - (1 - b2) * d * d * np.sign(v - d * d)
                ref += lr * m / (np.sqrt(v) + tau)
            elif isinstance(opt, Adam):
                m = b1 * m + (1 - b1) * d
                v = b2 * v + (1 - b2) * d * d
                ref += lr * m / (np.sqrt(v) + tau)
            else:
                m = b1 * m + d
                ref += lr * m
            np.testing.assert_allclose(w[0], ref, rtol=1e-9, atol=1e-12)


def test_plain_is_the_step_every_strategy_took_before() -> None:
    w = zeros()
    Plain().step(w, deltas(1, 1)[0], 0.5)
    for a, d in zip(w, deltas(1, 1)[0], strict=True):
        np.testing.assert_array_equal(a, np.float32(0.5) * d)


def test_the_staleness_aware_step_shrinks_only_past_its_threshold() -> None:
    assert staleness_scaled(1.0, 3, 4) == 1.0
    assert staleness_scaled(1.0, 8, 4) == 0.5
    assert staleness_scaled(0.2, 100, None) == 0.2


def strategies(optimizer: str) -> list[Any]:
    s = make_staleness("polynomial", a=0.5)
    return [FedAsync(s, alpha=0.5, optimizer=make_optimizer(optimizer), staleness_threshold=2),
            FedBuff(s, k=2, eta=0.5, optimizer=make_optimizer(optimizer),
                    staleness_threshold=2),
            FedBuff(s, k=3, eta=0.5, aggregation="median", optimizer=make_optimizer(optimizer))]


@pytest.mark.parametrize("optimizer", ["momentum", "adam", "yogi"])
def test_a_strategy_restored_from_its_state_continues_exactly(optimizer: str) -> None:
    stream = deltas(2, 8)
    for i, strategy in enumerate(strategies(optimizer)):
        fresh = strategies(optimizer)[i]
        w_a, w_b = zeros(), zeros()
        for j, d in enumerate(stream):
            c = Contribution(f"p{j % 3}", d, 100 + j, j % 4)
            strategy.offer(w_a, c)
            if j == 4:  # a checkpoint and a restart half-way
                fresh.load_state(strategy.state())
                w_b = [a.copy() for a in w_a]
            elif j > 4:
                fresh.offer(w_b, c)
        for a, b in zip(w_a, w_b, strict=True):
            np.testing.assert_array_equal(a, b)


def test_fedavg_rounds_go_through_the_optimizer() -> None:
    plain, adam = FedAvg(eta=1.0), FedAvg(eta=0.01, optimizer=make_optimizer("adam"))
    for strategy in (plain, adam):
        w = zeros()
        strategy.parties_changed(w, frozenset({"a", "b"}))
        for p, d in zip("ab", deltas(3, 2), strict=True):
            strategy.offer(w, Contribution(p, d, 100, 0))
        assert any(np.any(a != 0) for a in w)
    state = adam.state()
    assert state["optimizer"]["optimizer"] == "adam" and len(state["optimizer"]["m"]) == 2


def test_a_snapshot_from_before_server_optimizers_loads_with_a_fresh_one() -> None:
    strategy = FedBuff(make_staleness("constant"), k=2, optimizer=make_optimizer("momentum"))
    old = FedBuff(make_staleness("constant"), k=2).state()
    del old["optimizer"], old["max_staleness"]
    strategy.load_state(old)
    with pytest.raises(ValueError, match="cannot be loaded"):
        strategy.load_state({**old, "optimizer": {"optimizer": "adam"}})


def test_secure_fedbuff_takes_a_server_optimizer_too() -> None:
    strategy = SecureFedBuff(make_staleness("constant"), 3, 0.01, 10.0,
                             optimizer=make_optimizer("adam"))
    assert strategy.state()["optimizer"]["optimizer"] == "adam"


@pytest.mark.parametrize(("options", "says"), [
    ({"server_optimizer": "lamb"}, "--server-optimizer"),
    ({"server_beta1": 1.0}, "--server-beta1"),
    ({"server_tau": 0}, "--server-tau"),
    ({"server_staleness_threshold": -1}, "--server-staleness-threshold"),
])
def test_bad_server_optimizer_settings_get_one_line(options: dict[str, Any], says: str
                                                    ) -> None:
    with pytest.raises(ConfigError, match=says) as err:
        AggregatorConfig(broker="memory://x", evaluate=False, **options)
    assert "\n" not in str(err.value)
