"""Secure aggregation: leader (``dfl aggregator --secure-aggregation``) and helper (``dfl
helper``), and every refusal that keeps a misbehaving leader from unmasking one update.

Unit tests check the arithmetic and the crypto with no broker; service tests run the leader,
the helper and three protocol-level parties (masking with the real ``MaskingStage``) on
memory:// and on RabbitMQ; the crash tests run the helper as a process and kill it.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator import Aggregator, AggregatorConfig
from aggregator.helper.config import HelperConfig
from aggregator.helper.rules import REPLAYS, HelperRules, Refusal
from aggregator.helper.service import CRASH_HOOK, Helper
from aggregator.helper.store import HelperStore
from messages.errors import ConfigError, InvalidMessage
from messages.secagg import masks, sealing
from messages.secagg.quantize import LIMIT, dequantize, integer_weights, quantize, scale_for
from messages.transport.connect import connect
from messages.transport.topology import Topology
from messages.wire.codec import decode, encode
from messages.wire.kinds import MaskRequest, Report, Update, Welcome
from messages.wire.signing import (
    AGGREGATOR,
    HELPER,
    Signer,
    load_signer,
    make_ed25519,
)
from tests.processes import Procs
from tests.test_aggregator_service import SHAPES, Client, Env, delta
from tests.test_security import Party
from worker.pipeline import MaskingStage, Outgoing

PARTIES = ("a", "b", "c")


# -- the arithmetic ------------------------------------------------------------------------
def test_quantization_round_trips_within_one_unit_of_the_scale() -> None:
    rng = np.random.default_rng(0)
    clip, scale = 2.0, scale_for(2.0, k=4, max_weight=16)
    x = rng.uniform(-clip, clip, 10_000)
    back = dequantize(quantize(x, scale, clip, rng), scale, 1)
    assert np.max(np.abs(back - x)) < 1 / scale + 1e-6  # float32 of values up to 2
    # stochastic rounding is unbiased: the mean error is far below one unit
    assert abs(float(np.mean(back.astype(np.float64) - x))) < 0.05 / scale


def test_a_full_buffer_of_extreme_values_at_the_largest_weight_does_not_wrap() -> None:
    k, w, clip = 5, 16, 3.0
    scale = scale_for(clip, k, w)
    rng = np.random.default_rng(1)
    for sign in (1.0, -1.0):
        qs = [quantize(np.full(8, sign * clip), scale, clip, rng) for _ in range(k)]
        total = masks.weighted_sum(qs, [w] * k)
        signed = total.view(np.int32).astype(np.int64)
        assert np.all(np.abs(signed) <= LIMIT)
        assert np.allclose(dequantize(total, scale, k * w), sign * clip, atol=1 / scale)
    # the bound itself: |q| <= C*s + 1 and K*W*(C*s + 1) <= 2^31 - 1
    assert k * w * (clip * scale + 1) <= LIMIT


def test_scale_refuses_settings_that_leave_no_head_room() -> None:
    with pytest.raises(ConfigError, match="no head room"):
        scale_for(1.0, k=1 << 20, max_weight=1 << 16)


def test_mask_expansion_is_deterministic_per_seed_and_a_prefix_of_a_longer_one() -> None:
    seed, other = bytes(range(32)), bytes(32)
    assert np.array_equal(masks.expand(seed, 1000), masks.expand(seed, 1000))
    assert np.array_equal(masks.expand(seed, 10), masks.expand(seed, 1000)[:10])
    assert not np.array_equal(masks.expand(seed, 100), masks.expand(other, 100))
    assert masks.expand(seed, 5).dtype == np.uint32


def test_k_masked_updates_minus_the_helpers_sum_is_the_plain_weighted_sum() -> None:
    rng = np.random.default_rng(2)
    k, clip, n = 4, 1.0, 5000
    scale = scale_for(clip, k, 16)
    deltas = [rng.normal(0, 0.01, n) for _ in range(k)]
    weights = integer_weights([100.0, 50.0, 400.0, 25.0], 16)
    seeds = [masks.new_seed() for _ in range(k)]
    qs = [quantize(d, scale, clip, rng) for d in deltas]
    masked = [q + masks.expand(s, n) for q, s in zip(qs, seeds, strict=True)]
    unmasked = masks.weighted_sum(masked, weights) - masks.mask_sum(seeds, weights, n)
    assert np.array_equal(unmasked, masks.weighted_sum(qs, weights))  # exact, as integers
    mean = dequantize(unmasked, scale, sum(weights))
    plain = sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    assert np.max(np.abs(mean - plain)) < 1 / scale + 1e-7


def test_integer_weights_keep_the_proportions_at_sixteen_levels() -> None:
    assert integer_weights([100.0, 50.0, 25.0], 16) == [16, 8, 4]
    assert integer_weights([1000.0, 1.0], 16) == [16, 1]  # never 0: every update counts


# -- sealing -------------------------------------------------------------------------------
def test_a_sealed_seed_opens_only_with_the_helpers_key_and_for_its_own_update(
        tmp_path: Path) -> None:
    sealing.make_seal_keys(tmp_path / "helper")
    sealing.make_seal_keys(tmp_path / "other")
    key = sealing.load_seal_private(tmp_path / "helper" / sealing.SEAL_KEY)
    wrong = sealing.load_seal_private(tmp_path / "other" / sealing.SEAL_KEY)
    public = sealing.load_seal_public(tmp_path / "helper" / sealing.SEAL_PUBLIC)
    seed = masks.new_seed()
    sealed = sealing.seal(seed, public, "fed", "a", 7)
    assert len(sealed) == sealing.SEALED_BYTES and seed not in sealed
    assert sealing.open_sealed(sealed, key, "fed", "a", 7) == seed
    for attempt in (lambda: sealing.open_sealed(sealed, wrong, "fed", "a", 7),
                    lambda: sealing.open_sealed(sealed, key, "fed", "b", 7),  # another party
                    lambda: sealing.open_sealed(sealed, key, "fed", "a", 8),  # another seq
                    lambda: sealing.open_sealed(sealed, key, "other", "a", 7),
                    lambda: sealing.open_sealed(sealed[:-1] + bytes([sealed[-1] ^ 1]), key,
                                                "fed", "a", 7)):
        with pytest.raises(InvalidMessage) as err:
            attempt()
        assert err.value.reason == "unknown-seed"
    with pytest.raises(ConfigError, match="not an X25519 key"):
        make_ed25519(tmp_path, "x")
        sealing.load_seal_public(tmp_path / "x.pub")


def test_an_hmac_party_cannot_sign_for_the_helper(tmp_path: Path) -> None:
    from messages.wire.signing import make_hmac_secret

    signer = load_signer(make_hmac_secret(tmp_path, "h"), "h")
    with pytest.raises(ConfigError, match="Ed25519"):
        signer.sign_statement(b"x")


# -- the helper's rules --------------------------------------------------------------------
def request(n: int, parties: tuple[str, ...] = ("a", "b", "c"), seqs: list[int] | None = None,
            weights: list[int] | None = None, length: int = 4) -> MaskRequest:
    seqs = seqs if seqs is not None else [1] * len(parties)
    return MaskRequest(n, list(parties), seqs, weights or [1] * len(parties),
                       [bytes(80)] * len(parties), [bytes(64)] * len(parties), length)


def refusal(rules: HelperRules, req: MaskRequest) -> str:
    with pytest.raises(Refusal) as err:
        rules.check(req)
    return err.value.reason


def test_the_helper_refuses_small_sets_duplicates_bad_weights_overlap_and_reuse() -> None:
    rules = HelperRules(min_parties=3, max_weight=16)
    assert refusal(rules, request(0, ("a", "b"))) == "small-set"
    assert refusal(rules, request(0, ("a", "b", "a"))) == "duplicate-party"
    assert refusal(rules, request(0, weights=[1, 17, 1])) == "bad-weight"
    assert refusal(rules, request(0, weights=[0, 1, 1])) == "bad-weight"
    bad = request(0)
    bad.seqs.pop()
    assert refusal(rules, bad) == "bad-request"
    first = request(0, seqs=[1, 1, 1])
    assert rules.check(first) is False
    rules.record(first)
    assert rules.check(first) is True  # the same request again: a replay, answered again
    # the same updates with other weights (a second equation on the same unknowns)
    assert refusal(rules, request(1, seqs=[1, 1, 1], weights=[2, 1, 1])) == "reuse"
    # one fresh update beside two answered ones (their difference would reveal it)
    assert refusal(rules, request(1, ("a", "b", "d"), seqs=[1, 1, 1])) == "overlap"
    # an older seq of a party is never answered once a later one was
    assert refusal(rules, request(1, ("a", "d", "e"), seqs=[0, 1, 1])) == "overlap"
    assert rules.check(request(1, ("a", "b", "d"), seqs=[2, 2, 1])) is False


def test_what_the_helper_answered_survives_its_store_and_replays_are_bounded(
        tmp_path: Path) -> None:
    rules = HelperRules()
    for i in range(REPLAYS + 5):
        req = request(i, seqs=[i, i, i])
        rules.check(req)
        rules.record(req)
    store = HelperStore(tmp_path)
    store.save(rules.state())
    again = HelperRules()
    saved = store.load()
    assert saved is not None
    again.load_state(saved)
    assert again.answered == {"a": REPLAYS + 4, "b": REPLAYS + 4, "c": REPLAYS + 4}
    assert len(again.replays) == REPLAYS
    assert refusal(again, request(9, seqs=[3, 3, 3])) == "reuse"
    (tmp_path / "answered.json").write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        store.load()


# -- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "says"), [
    ({"strategy": "fedasync"}, "needs --strategy fedbuff"),
    ({"aggregation": "median"}, "median or trimmed mean needs every coordinate"),
    ({"max_update_norm": 1.0}, "cannot measure a masked delta's norm"),
    ({"buffer_k": 2}, "--buffer-k >= 3"),
])
def test_what_cannot_run_on_masked_values_is_refused_with_the_reason(
        options: dict[str, Any], says: str) -> None:
    base = {"strategy": "fedbuff", "buffer_k": 3, "secure_aggregation": True,
            "broker": "memory://x", "evaluate": False}
    with pytest.raises(ConfigError, match=says):
        AggregatorConfig(**{**base, **options})


def test_a_helper_without_its_keys_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--seal-key"):
        Helper(HelperConfig(broker="memory://x", party_keys=str(tmp_path)))
    with pytest.raises(ConfigError, match="--party-keys"):
        Helper(HelperConfig(broker="memory://x", seal_key=str(tmp_path / "k")))


# -- the federation ------------------------------------------------------------------------
@dataclass
class Keys:
    """The leader's key directory and the helper's own (parties' keys copied to it)."""

    leader: Path
    helper: Path

    def signer(self, party: str) -> Signer:
        return load_signer(self.leader / f"{party}.key", party)

    def stage(self, party: str, federation: str) -> MaskingStage:
        return MaskingStage(sealing.load_seal_public(self.helper / sealing.SEAL_PUBLIC),
                            self.signer(party), federation, party)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    leader, helper = tmp_path / "leader-keys", tmp_path / "helper-keys"
    make_ed25519(leader, AGGREGATOR)
    make_ed25519(helper, HELPER)
    for p in PARTIES:  # the helper's own copy of each party's public key
        make_ed25519(leader, p)
        shutil.copy(leader / f"{p}.pub", helper)
    shutil.copy(leader / f"{AGGREGATOR}.pub", helper)
    shutil.copy(helper / f"{HELPER}.pub", leader)
    sealing.make_seal_keys(helper)
    return Keys(leader, helper)


@dataclass
class Secure:
    """A leader on a thread, three signed protocol parties, and (maybe) a helper."""

    url: str
    federation: str
    keys: Keys
    state: Path
    agg: Aggregator
    client: Client
    welcomes: dict[str, Welcome]
    helper: Helper | None = None

    def start_helper(self) -> Helper:
        self.helper = Helper(HelperConfig(
            broker=self.url, federation=self.federation,
            seal_key=str(self.keys.helper / sealing.SEAL_KEY),
            party_keys=str(self.keys.helper), state_dir=str(self.state))).start()
        deadline = time.monotonic() + 30
        while not self.helper.metrics.readiness()[0]:
            assert self.helper.error is None and time.monotonic() < deadline
            time.sleep(0.01)
        return self.helper

    def masked(self, party: str, seq: int, base: int, value: float,
               num_samples: int = 100) -> bytes:
        out = self.keys.stage(party, self.federation)(Outgoing(
            delta(value), {}, seq=seq, settings=self.welcomes[party].settings))
        return encode(Update(party, seq, base, num_samples, out.tensors, out.metrics,
                             sealed_seed=out.sealed_seed, seed_signature=out.seed_signature))

    def send(self, party: str, body: bytes) -> None:
        Party(self.client, self.keys.signer(party)).send(body)

    def round(self, r: int, base: int, values: dict[str, float]) -> None:
        for p, v in values.items():
            self.send(p, self.masked(p, self.welcomes[p].next_seq + r, base, v))

    def status(self) -> dict[str, Any]:
        answer = self.client.ask("status")
        assert isinstance(answer, Report)
        return answer.data


SECURE_LEADER = {"strategy": "fedbuff", "buffer_k": 3, "min_parties": 3,
                 "staleness": "constant", "secure_aggregation": True, "secagg_clip": 10.0}


def joined(url: str, federation: str, keys: Keys) -> tuple[Client, dict[str, Welcome]]:
    """A client that joined as every party (signed) and holds model version 0."""
    client = Client(url, Topology(federation))
    client.listen("a")
    welcomes = {}
    for p in PARTIES:
        reply = decode(Party(client, keys.signer(p)).join(p).body)
        assert isinstance(reply, Welcome)
        welcomes[p] = reply
    client.pump(lambda: len(client.models) == 1)
    return client, welcomes


@pytest.fixture
def secure(broker_url: str, keys: Keys, tmp_path: Path) -> Iterator[Secure]:
    federation = f"sa{uuid.uuid4().hex[:8]}"
    agg = Env(broker_url, federation).start(**SECURE_LEADER, keys_dir=str(keys.leader))
    client, welcomes = joined(broker_url, federation, keys)
    s = Secure(broker_url, federation, keys, tmp_path / "helper-state", agg, client, welcomes)
    yield s
    for daemon in (s.helper, agg):
        if daemon is not None:
            daemon.stop()
            daemon.wait(10)
    t = Topology(federation)
    with connect(broker_url) as b:
        for q in (t.updates, t.control, t.dead, t.helper_requests, t.helper_sums):
            b.delete_queue(q)
    client.b.close()


def model_delta(s: Secure, version: int) -> dict[str, np.ndarray]:
    first = s.client.models[0].tensors
    model = next(m for m in s.client.models if m.version == version)
    return {k: model.tensors[k] - first[k] for k in first}


def test_the_leader_applies_the_weighted_mean_and_never_sees_an_update(
        secure: Secure) -> None:
    s = secure
    helper = s.start_helper()
    values = {"a": 0.1, "b": 0.2, "c": 0.6}
    counts = {"a": 100, "b": 100, "c": 200}  # weights 8, 8, 16 of 16 levels
    for p, v in values.items():
        body = s.masked(p, s.welcomes[p].next_seq, 0, v, counts[p])
        masked = decode(body)
        assert isinstance(masked, Update)
        # what the leader (and the broker) holds is uniform-looking words, not the delta
        assert all(t.dtype == np.uint32 for t in masked.tensors.values())
        s.send(p, body)
    s.client.pump(lambda: any(m.version == 1 for m in s.client.models)
                  and helper.stats.answered == 1, timeout=15)
    expected = (8 * 0.1 + 8 * 0.2 + 16 * 0.6) / 32
    scale = float(s.welcomes["a"].settings["secagg_scale"])
    for name, d in model_delta(s, 1).items():
        assert d.shape == SHAPES[name]
        assert np.allclose(d, expected, atol=1 / scale + 1e-6)
    status = s.status()
    assert status["secure_aggregation"]["waiting_requests"] == 0
    assert s.helper is not None and s.helper.stats.answered == 1


def test_a_helper_that_is_down_makes_the_leader_wait_and_say_so(secure: Secure) -> None:
    s = secure
    s.round(0, 0, {"a": 0.1, "b": 0.1, "c": 0.1})
    s.client.pump(lambda: s.status()["secure_aggregation"]["waiting_requests"] == 1, timeout=10)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # nothing is applied, however long it waits
        s.client.b.process_events(0.05)
    assert s.agg.version == 0 and [m.version for m in s.client.models] == [0]
    assert s.status()["secure_aggregation"]["waiting_seconds"] > 0
    s.start_helper()
    s.client.pump(lambda: any(m.version == 1 for m in s.client.models), timeout=15)
    assert s.status()["secure_aggregation"]["waiting_requests"] == 0


def test_plain_updates_to_a_secure_leader_are_dead_lettered_unmasked(secure: Secure) -> None:
    s = secure
    s.send("a", encode(Update("a", s.welcomes["a"].next_seq, 0, 100, delta(0.5))))
    s.client.pump(lambda: len(s.client.dead) >= 1, timeout=10)
    assert s.client.dead[0].reason == "unmasked"
    assert s.agg.status.updates == 0


def ask_as_leader(s: Secure, req: MaskRequest) -> None:
    """Publish ``req`` to F.helper as a leader would (signed with the leader's key)."""
    body = encode(req)
    s.client.b.publish("", Topology(s.federation).helper_requests, body,
                       headers=load_signer(s.keys.leader / f"{AGGREGATOR}.key",
                                           AGGREGATOR).headers(body))


def test_a_leader_asking_for_an_overlapping_set_is_refused(secure: Secure) -> None:
    s = secure
    helper = s.start_helper()
    s.round(0, 0, {"a": 0.1, "b": 0.2, "c": 0.3})
    s.client.pump(lambda: any(m.version == 1 for m in s.client.models), timeout=15)
    # a second round of updates that a misbehaving leader asks about as it likes
    updates = [decode(s.masked(p, s.welcomes[p].next_seq + 1, 1, 0.4)) for p in PARTIES]
    assert all(isinstance(u, Update) for u in updates)
    seqs = [u.seq for u in updates if isinstance(u, Update)]
    sealed = [u.sealed_seed for u in updates if isinstance(u, Update)]
    sigs = [u.seed_signature for u in updates if isinstance(u, Update)]

    def answered() -> int:
        return helper.stats.answered

    def refused() -> int:
        return sum(helper.stats.refused.values())

    ask_as_leader(s, MaskRequest(100, list(PARTIES), seqs, [1, 1, 1], sealed, sigs, 15))
    s.client.pump(lambda: answered() == 2, timeout=15)
    # the same three updates, weighted differently: a second equation, refused
    ask_as_leader(s, MaskRequest(101, list(PARTIES), seqs, [2, 1, 1], sealed, sigs, 15))
    # one of them beside two others the helper never saw: their difference would reveal it
    fresh = max(seqs) + 1000  # seqs the helper has not answered for
    ask_as_leader(s, MaskRequest(102, ["a", "b", "c"], [seqs[0], fresh, fresh], [1, 1, 1],
                                 sealed, sigs, 15))
    # a set of two, however fresh
    ask_as_leader(s, MaskRequest(103, ["a", "b"], [fresh] * 2, [1, 1], sealed[:2], sigs[:2],
                                 15))
    # a sybil: a party the helper holds no key for, whose mask the leader would know
    ask_as_leader(s, MaskRequest(104, ["zed", "a", "b"], [fresh] * 3, [1, 1, 1], sealed,
                                 sigs, 15))
    # real parties' seeds under another seq than the one they were sealed and signed for
    ask_as_leader(s, MaskRequest(105, list(PARTIES), [fresh + 1] * 3, [1, 1, 1], sealed,
                                 sigs, 15))
    s.client.pump(lambda: refused() == 5, timeout=15)
    assert helper.stats.refused == {"reuse": 1, "overlap": 1, "small-set": 1,
                                    "unknown-seed": 1, "bad-signature": 1}
    assert answered() == 2
    assert s.agg.version == 1  # answers to requests the leader never made change nothing


# -- crashes of the helper (real processes, RabbitMQ) -----------------------------------------
def helper_args(s: Secure) -> list[str]:
    return ["helper", "--broker", s.url, "--federation", s.federation,
            "--seal-key", str(s.keys.helper / sealing.SEAL_KEY),
            "--party-keys", str(s.keys.helper), "--state-dir", str(s.state)]


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_a_helper_killed_mid_run_loses_nothing_and_answers_nothing_twice(
        secure: Secure, procs: Procs) -> None:
    s = secure
    procs.start("helper", *helper_args(s), env={CRASH_HOOK: "1"})
    s.round(0, 0, {"a": 0.1, "b": 0.2, "c": 0.3})
    # it saved request 0 as answered, then died before answering (kill -9 equivalent)
    procs.wait_until("the helper to crash", lambda: procs.procs["helper"].poll() is not None,
                     30)
    saved = json.loads((s.state / "answered.json").read_text())
    assert saved["answered"] == {p: s.welcomes[p].next_seq for p in PARTIES}
    for r in (1, 2, 3):  # more buffers queue up while it is down
        s.round(r, 0, {"a": 0.1, "b": 0.2, "c": 0.3})
    assert s.agg.version == 0
    procs.start("helper-2", *helper_args(s))
    procs.wait_until("all four buffers applied", lambda: s.agg.version == 4
                     and procs.log("helper-2").count("answered request") == 4, 60)
    procs.procs["helper-2"].kill()  # kill -9 once more, after it answered everything
    procs.procs["helper-2"].wait()
    log = procs.log("helper-2")
    assert "answered request 0 again" in log  # the redelivered request: a replay
    assert log.count("answered request") == 4
    assert s.status()["secure_aggregation"]["refused_updates"] == 0
    assert s.agg.status.updates == 12


@pytest.mark.slow
def test_a_federation_of_keras_workers_trains_through_leader_and_helper(
        broker_url: str, keys: Keys, tmp_path: Path) -> None:
    from deploy.launcher import run_federation
    from worker import WorkerConfig

    federation = f"sa{uuid.uuid4().hex[:8]}"
    tiny = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic",
            "broker": broker_url, "federation": federation}
    for i, p in enumerate(PARTIES):  # workers are parties 0..2: their keys by those names
        shutil.copy(keys.leader / f"{p}.key", keys.leader / f"{i}.key")
        for d in (keys.leader, keys.helper):
            shutil.copy(d / f"{p}.pub", d / f"{i}.pub")
    helper = Helper(HelperConfig(**tiny, seal_key=str(keys.helper / sealing.SEAL_KEY),
                                 party_keys=str(keys.helper),
                                 state_dir=str(tmp_path / "state"))).start()
    workers = [WorkerConfig(**tiny, party_id=i, num_parties=3,
                            signing_key=str(keys.leader / f"{i}.key"),
                            aggregator_key=str(keys.leader / f"{AGGREGATOR}.pub"),
                            helper_key=str(keys.helper / sealing.SEAL_PUBLIC))
               for i in range(3)]
    try:
        agg = run_federation(AggregatorConfig(
            **tiny, strategy="fedbuff", buffer_k=3, min_parties=3, evaluate=False,
            secure_aggregation=True, keys_dir=str(keys.leader), max_versions=3,
            local_steps=5, max_seconds=120), workers, progress=False)
    finally:
        helper.stop()
        helper.wait(10)
        t = Topology(federation)
        with connect(broker_url) as b:
            for q in (t.updates, t.control, t.dead, t.helper_requests, t.helper_sums):
                b.delete_queue(q)
    assert agg.status.version == 3 and agg.status.finished == "version limit 3"
    assert helper.stats.answered == 3 and not helper.stats.refused
    assert agg.secure is not None and agg.secure.refused == 0
    assert not agg.status.rejected


@pytest.mark.slow
def test_a_party_never_sends_a_delta_in_the_clear_nor_joins_unable_to_mask(
        keys: Keys, tmp_path: Path) -> None:
    from messages.errors import FederationError
    from worker import Worker, WorkerConfig

    tiny = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic",
            "num_parties": 3, "join_timeout": 5.0}
    shutil.copy(keys.leader / "a.key", keys.leader / "0.key")
    shutil.copy(keys.leader / "a.pub", keys.leader / "0.pub")
    cases = [  # (aggregator options, worker options, what the worker says)
        ({}, {"helper_key": str(keys.helper / sealing.SEAL_PUBLIC)},
         "does not run secure aggregation"),
        ({"secure_aggregation": True, "strategy": "fedbuff", "buffer_k": 3}, {},
         "uses secure aggregation: pass --helper-key"),
    ]
    for agg_options, worker_options, says in cases:
        url = f"memory://{uuid.uuid4().hex[:8]}"
        agg = Aggregator(AggregatorConfig(broker=url, evaluate=False, min_parties=3,
                                          keys_dir=str(keys.leader), **agg_options)).start()
        worker = Worker(WorkerConfig(**tiny, broker=url, party_id=0,
                                     signing_key=str(keys.leader / "0.key"),
                                     **worker_options)).start()
        try:
            with pytest.raises(FederationError, match=says):
                worker.wait(60)
        finally:
            worker.stop()
            agg.stop()
            agg.wait(10)


def test_a_restarted_leader_asks_again_for_the_same_set_and_applies_it(
        broker_url: str, keys: Keys, tmp_path: Path) -> None:
    """The waiting buffer, its request number and weights are in the checkpoint: the new
    leader sends the same request (not a new mix the helper would refuse) and applies it."""
    federation = f"sa{uuid.uuid4().hex[:8]}"
    env = Env(broker_url, federation)
    options = {**SECURE_LEADER, "keys_dir": str(keys.leader),
               "checkpoint_dir": str(tmp_path / "ckpt")}
    agg = env.start(**options)
    client, welcomes = joined(broker_url, federation, keys)
    s = Secure(broker_url, federation, keys, tmp_path / "helper-state", agg, client, welcomes)
    try:
        s.round(0, 0, {"a": 0.3, "b": 0.3, "c": 0.3})
        client.pump(lambda: s.status()["secure_aggregation"]["waiting_requests"] == 1,
                    timeout=10)
        agg.stop()
        agg.wait(10)
        s.agg = agg = env.start(**options)
        assert s.status()["secure_aggregation"]["waiting_requests"] == 1
        s.start_helper()
        helper = s.helper
        assert helper is not None
        client.pump(lambda: any(m.version == 1 for m in client.models)
                    and helper.stats.answered == 1, timeout=15)
        assert not helper.stats.refused
        model = next(m for m in reversed(client.models) if m.version == 1)
        first = client.models[0].tensors
        for name, w in model.tensors.items():
            assert np.allclose(w - first[name], 0.3, atol=1e-4)
    finally:
        for daemon in (s.helper, s.agg):
            if daemon is not None:
                daemon.stop()
                daemon.wait(10)
        t = Topology(federation)
        with connect(broker_url) as b:
            for q in (t.updates, t.control, t.dead, t.helper_requests, t.helper_sums):
                b.delete_queue(q)
        client.b.close()


def test_an_update_waiting_for_slower_parties_is_weighted_by_its_staleness_when_asked_for(
        ) -> None:
    from aggregator.staleness import make_staleness
    from aggregator.strategies.base import Contribution, Outcome
    from aggregator.strategies.secure import SecureFedBuff
    from messages.secagg.sealing import SealedSeed

    strategy = SecureFedBuff(make_staleness("polynomial", a=0.5), 3, 1.0, 10.0)
    weights = [np.zeros(4, np.float32)]
    seq = iter(range(100))

    def offer(party: str) -> Outcome:
        return strategy.offer(weights, Contribution(
            party, [np.zeros(4, np.uint32)], 100, 0,
            sealed=SealedSeed(next(seq), bytes(80), bytes(64))))

    for p in ("a", "b", "c", "a", "a"):  # a runs ahead: into the second and third buffer
        assert offer(p) is Outcome.BUFFERED
    assert offer("a") is Outcome.DISCARDED  # past two open buffers it would only grow stale
    (first,) = strategy.take_requests()
    assert first.weights == [16, 16, 16]
    assert strategy.unmask(weights, first.request, np.zeros(4, np.uint32)) is Outcome.APPLIED
    for p in ("b", "c"):
        offer(p)
    (second,) = strategy.take_requests()
    # a's update arrived fresh, but one version was applied while it waited: S(1) = 0.71
    assert second.parties == ["a", "b", "c"] and second.weights == [11, 16, 16]
