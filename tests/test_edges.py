"""Edge aggregators under one root (``--role edge|root``): partial sums, the handshake, and
that every update is counted once (``aggregator.partials``, ``aggregator.edge``).

The service tests run on memory:// and on RabbitMQ with a root and two edges on threads and
the parties played by a protocol client; the kill -9 test runs them as ``dfl`` processes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator import Aggregator, AggregatorConfig
from aggregator.dedupe import AppliedSeqs
from aggregator.edge import CRASH_HOOK, Edge
from aggregator.partials import DUPLICATE, Member, build_partial, check_partial, refusals
from aggregator.staleness import make_staleness
from aggregator.strategies import Contribution, Outcome
from aggregator.strategies.fedbuff import FedBuff
from messages.errors import ConfigError, InvalidMessage
from messages.transport.connect import connect
from messages.transport.topology import Topology
from messages.types import spec_of
from messages.wire.codec import decode, encode
from messages.wire.kinds import Partial, Taken
from tests.test_aggregator_service import SHAPES, Env, delta, initial
from tests.test_chaos import Books, Federation

POLY = make_staleness("polynomial", a=0.5)


def member(party: str, seq: int, base: int, value: float, samples: int = 100) -> Member:
    return Member(party, seq, base, samples, list(delta(value).values()), None)


# -- the pure parts ------------------------------------------------------------------------
def test_a_partial_sum_applied_equals_fedbuff_over_its_members_one_by_one() -> None:
    members = [member("a", 1, 3, 0.5, 100), member("b", 7, 1, -2.0, 50),
               member("c", 2, 4, 1.5, 10), member("a", 2, 4, 0.25, 100)]
    rng = np.random.default_rng(0)
    for m in members:  # distinct values per coordinate, not only per member
        m.delta = [d + rng.normal(size=d.shape).astype(np.float32) for d in m.delta]
    version = 4
    plain, split = (FedBuff(POLY, k=4, eta=0.7) for _ in range(2))
    w_plain = [w.copy() for w in initial().values()]
    w_split = [w.copy() for w in initial().values()]
    for m in members:
        outcome = plain.offer(w_plain, Contribution(m.party, m.delta, m.samples,
                                                    version - m.base))
    assert outcome is Outcome.APPLIED
    # two edges, two members each
    for part in (members[:2], members[2:]):
        p = build_partial("e", 0, version, list(SHAPES), part, POLY)
        outcome = split.offer_sum(w_split, list(p.tensors.values()), p.weight, p.parties,
                                  max(version - b for b in p.bases))
    assert outcome is Outcome.APPLIED
    for a, b in zip(w_plain, w_split, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_partial_round_trips_through_the_codec_and_checks_its_form() -> None:
    p = build_partial("edge-1", 3, 2, list(SHAPES), [member("a", 1, 2, 1.0)], POLY)
    back = decode(encode(p))
    assert isinstance(back, Partial) and back.parties == ["a"] and back.weight == 100.0
    spec = spec_of(initial())
    check_partial(back, spec)
    for bad, reason in ((Partial("e", 0, 0, ["a"], [1, 2], [0], [1], 1.0, p.tensors),
                         "bad-partial"),
                        (Partial("e", 0, 0, ["a"], [1], [0], [1], 0.0, p.tensors),
                         "bad-partial"),
                        (Partial("e", 0, 0, ["a"], [1], [0], [1], 1.0,
                                 {"x": np.zeros(3, np.float32)}), "tensor-names")):
        with pytest.raises(InvalidMessage) as exc:
            check_partial(bad, spec)
        assert exc.value.reason == reason
    with pytest.raises(InvalidMessage) as exc:  # bounded like every field
        decode(encode(Partial("e", 0, 0, ["bad party"], [1], [0], [1], 1.0, p.tensors)))
    assert exc.value.reason == "bad-party"


def test_the_root_names_each_member_it_cannot_take() -> None:
    applied = AppliedSeqs(64)
    applied.add("a", 5)
    p = Partial("e", 0, 9, ["a", "a", "b", "z", "b", "b", "b"], [5, 6, 3, 1, 3, 4, 2**40],
                [9, 9, 12, 9, 9, 1, 9], [1] * 7, 7.0, {})
    out = refusals(p, parties={"a", "b"}, granted={"a": 0, "b": 0}, applied=applied,
                   version=10, max_staleness=5)
    assert out == [(0, DUPLICATE), (2, "future-version"), (3, "unknown-party"),
                   (4, DUPLICATE), (5, "stale"), (6, "bad-seq")]


def test_roles_refuse_what_cannot_be_summed_in_parts() -> None:
    with pytest.raises(ConfigError, match="needs --strategy fedbuff"):
        AggregatorConfig(broker="memory://", role="edge", strategy="fedasync")
    with pytest.raises(ConfigError, match="needs --strategy fedbuff"):
        AggregatorConfig(broker="memory://", role="root", strategy="fedbuff",
                         aggregation="median", buffer_k=3)
    with pytest.raises(ConfigError, match="--max-update-norm"):
        AggregatorConfig(broker="memory://", role="root", strategy="fedbuff",
                         max_update_norm=1.0)
    with pytest.raises(ConfigError, match="--edge-id"):
        AggregatorConfig(broker="memory://", role="edge", strategy="fedbuff",
                         edge_id="no spaces")


# -- root and edges over a broker ----------------------------------------------------------
class Scaled(Env):
    def root(self, **options: Any) -> Aggregator:
        return self.start(role="root", strategy="fedbuff", **options)

    def edge(self, name: str, **options: Any) -> Edge:
        options.setdefault("edge_k", 2)
        edge = Edge(AggregatorConfig(broker=self.url, federation=self.federation,
                                     evaluate=False, role="edge", strategy="fedbuff",
                                     edge_id=name, **options)).start()
        return edge


@pytest.fixture
def scaled(broker_url: str, federation: str) -> Iterator[Scaled]:
    yield Scaled(broker_url, federation)
    with connect(broker_url) as b:
        t = Topology(federation)
        for q in (t.updates, t.control, t.dead, t.partials):
            b.delete_queue(q)


def wait_for(what: str, done: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def stop(*services: Aggregator | Edge) -> None:
    for s in services:
        s.stop()
    for s in services:
        assert s.wait(30)


def test_an_edge_and_a_root_apply_each_buffer_as_fedbuff_would(scaled: Scaled) -> None:
    # one edge, partials of 2 in arrival order, a root buffer of 4: versions 1 and 2 are
    # the means of updates 0-3 and 4-7 (constant staleness: every update weighs its samples)
    root = scaled.root(buffer_k=4, eta=1.0, staleness="constant", ledger=None)
    edge = scaled.edge("edge-0", edge_flush_seconds=10, staleness="constant")
    c = scaled.client()
    seq = {p: c.join(p).next_seq for p in ("a", "b")}
    wait_for("the edge to know the model", lambda: bool(edge.spec))
    values = [0.5, 1.0, 1.5, 2.0, -1.0, 3.0, 0.0, 1.0]
    for i, v in enumerate(values):
        party = "ab"[i % 2]
        c.update(party, seq[party] + i, 0, v, num_samples=10 * (i + 1))
    wait_for("8 updates at the root", lambda: root.status.updates == 8)
    assert root.version == 2
    wait_for("the edge to hear", lambda: edge.status.taken == 8)
    assert edge.status.partials == 4
    n = 10 * np.arange(1, 9)
    expected = 1.0 + sum(np.dot(n[s], values[s]) / n[s].sum()
                         for s in (slice(0, 4), slice(4, 8)))
    np.testing.assert_allclose(root.weights[0], expected, rtol=1e-6)
    stop(edge, root)


def test_two_edges_share_the_updates_and_the_root_takes_each_once(scaled: Scaled,
                                                                  tmp_path: Path) -> None:
    ledger = tmp_path / "applied.json"
    root = scaled.root(buffer_k=3, ledger=str(ledger))
    edges = [scaled.edge(f"edge-{i}", edge_k=3, edge_flush_seconds=0.2) for i in range(2)]
    c = scaled.client()
    seq = {p: c.join(p).next_seq for p in ("a", "b", "c")}
    wait_for("the edges to know the model", lambda: all(e.spec for e in edges))
    sent = [(p, seq[p] + i) for i in range(10) for p in ("a", "b", "c")]
    for party, s in sent:
        c.update(party, s, max(0, root.version - 1), 0.01)
    wait_for("30 updates at the root", lambda: root.status.updates == 30)
    wait_for("the edges to hear", lambda: sum(e.status.taken for e in edges) == 30)
    # a replay of a taken update is a duplicate at the root, acked by the edge
    c.update("a", seq["a"], root.version, 9.0)
    wait_for("the replay to settle", lambda: sum(e.status.duplicates for e in edges) == 1)
    assert root.status.updates == 30 and root.status.duplicates == 1
    stop(*edges, root)
    applied = [tuple(x) for x in json.loads(ledger.read_text())["applied"]]
    assert sorted(applied) == sorted(sent)
    c.b.process_events(0.3)
    assert not c.dead


def test_an_edge_dead_letters_what_the_root_or_the_edge_refuses(scaled: Scaled) -> None:
    root = scaled.root(buffer_k=2)
    edge = scaled.edge("edge-0", edge_k=1, metrics_port=0)
    c = scaled.client()
    seq = {p: c.join(p).next_seq for p in ("a", "b")}
    wait_for("the edge to know the model", lambda: bool(edge.spec))
    c.update("stranger", 5, 0, 1.0)  # never joined: the root refuses it
    c.update("a", seq["a"], 0, float("nan"))  # the edge refuses it
    c.update("a", seq["a"] + 1, 0, 1.0)
    c.update("b", seq["b"], 0, 1.0)
    c.pump(lambda: len(c.dead) == 2, timeout=30)
    wait_for("two updates applied", lambda: root.status.updates == 2)
    assert sorted(d.reason for d in c.dead) == ["non-finite", "unknown-party"]
    assert edge.status.dead == {"non-finite": 1, "unknown-party": 1}
    wait_for("the edge to hear", lambda: edge.status.taken == 2)
    wait_for("the metrics endpoint", lambda: edge.metrics.port is not None)
    base = f"http://127.0.0.1:{edge.metrics.port}"
    page = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    assert 'dfl_edge_updates_rejected_total{reason="non-finite"} 1.0' in page
    assert "dfl_edge_updates_taken_total 2.0" in page
    assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
    stop(edge, root)


def test_a_partial_sent_twice_is_applied_once_and_an_overlap_is_refused(
        scaled: Scaled) -> None:
    root = scaled.root(buffer_k=1)
    c = scaled.client()
    seq = c.join("a").next_seq
    c.join("b")
    t = Topology(scaled.federation)

    def send(p: Partial) -> Taken:
        reply = decode(c.b.call(t.partials, encode(p), timeout=10).body)
        assert isinstance(reply, Taken)
        return reply

    p = build_partial("edge-x", 0, 0, list(SHAPES),
                      [member("a", seq, 0, 1.0), member("a", seq + 1, 0, 1.0)], POLY)
    first = send(p)
    assert first.accepted and first.version == 1
    again = send(p)  # the first answer lost: the edge asks again
    assert again.accepted and again.version == 1 and root.status.updates == 2
    assert again.reasons == [DUPLICATE, DUPLICATE]
    overlap = build_partial("edge-y", 0, 1, list(SHAPES),
                            [member("a", seq + 1, 0, 1.0), member("a", seq + 2, 1, 1.0)], POLY)
    refused = send(overlap)
    assert not refused.accepted
    assert (refused.parties, refused.seqs, refused.reasons) == (["a"], [seq + 1], [DUPLICATE])
    assert root.version == 1 and root.status.updates == 2
    np.testing.assert_allclose(root.weights[0], 2.0)
    # a partial the root cannot use at all is answered too, every member named: unanswered,
    # its edge would send it again and again
    wrong = Partial("edge-z", 4, 1, ["a", "b"], [seq + 5, 9], [1, 1], [1, 1], 2.0,
                    {"x": np.zeros(3, np.float32)})
    answer = send(wrong)
    assert not answer.accepted and answer.number == 4
    assert answer.reasons == ["tensor-names", "tensor-names"]
    assert root.version == 1 and root.status.updates == 2
    stop(root)


# -- kill -9 of an edge: processes over RabbitMQ ---------------------------------------------
class EdgeFederation(Federation):
    """A root, two edges and two training workers as ``dfl`` processes (``tests.test_chaos``'s
    books: every confirmed update applied once, dead-lettered, or still queued)."""

    def aggregator(self) -> subprocess.Popen[str]:
        t = Topology(self.federation)
        with connect(self.url) as b:  # an audit of every model, as the chaos tests keep
            b.declare_exchange(t.models, "fanout")
            b.declare_queue(f"{t.models}.audit", **self.audit)
            b.bind(f"{t.models}.audit", t.models)
        return self.start(
            "aggregator", "aggregator", *self.common, "--role", "root", "--strategy",
            "fedbuff", "--buffer-k", "2", "--no-eval", "--min-parties", "2",
            "--max-versions", str(self.versions), "--local-steps", "10", "--batch-size", "16",
            "--checkpoint-dir", str(self.tmp / "checkpoints"), "--max-staleness", "1000",
            "--ledger", str(self.tmp / "applied.json"))

    def edge(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return self.start(name, "aggregator", *self.common, "--role", "edge", "--strategy",
                          "fedbuff", "--edge-id", name, "--edge-k", "2",
                          "--edge-flush-seconds", "0.3", "--no-eval", "--max-staleness",
                          "1000", env=env)

    def applied_so_far(self) -> int:
        return len(re.findall(r"update \S+#\d+ staleness", self.log("aggregator")))

    def books(self) -> Books:
        books = super().books()
        with connect(self.url) as b:
            b.delete_queue(Topology(self.federation).partials)
        return books


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_an_edge_killed_with_sigkill_loses_nothing_and_applies_nothing_twice(
        amqp_url: str, federation: str, tmp_path: Path) -> None:
    """e0 is killed with SIGKILL at a moment the test does not choose; e1 dies (exit 70,
    ``CRASH_HOOK``) at the worst one: its partial is in the root's state, and none of its
    updates is acked, so they come back and must count as duplicates, not twice."""
    fed = EdgeFederation(amqp_url, federation, tmp_path, versions=40)
    try:
        fed.aggregator()
        fed.edge("e0")
        fed.edge("e1", env={CRASH_HOOK: "4"})
        fed.worker(0)
        fed.worker(1)
        assert fed.procs["e1"].wait(180) == 70, fed.log("e1")[-3000:]
        fed.edge("e1")  # restarted, without the hook
        fed.wait_until("both edges to forward partials",
                       lambda: all("taken" in fed.log(e) for e in ("e0", "e1")), 120)
        fed.wait_for_more_confirmed(6)
        before = fed.applied_so_far()
        killed = time.monotonic()
        fed.procs["e0"].kill()  # SIGKILL: its held updates go back to F.updates
        fed.procs["e0"].wait()
        resumed = fed.wait_until("an update applied after the kill",
                                 lambda: fed.applied_so_far() > before, 120) - killed
        fed.edge("e0")  # restarted: it competes for the updates again
        books = fed.finish()
        summary = books.check(fed.versions)
        fed.check_versions()
        assert books.duplicates >= 1, "the crash at the worst moment left no duplicate"
        print(f"EDGE KILL resumed {resumed:.1f} s after the kill -9 of e0; e1 crashed after "
              f"the root took its partial: {summary}")
    finally:
        fed.stop_all()
