"""Ack batching (aggregator.durability): what a checkpoint must hold before its acks, and what
needs none (a heartbeat, a read-only query)."""

from __future__ import annotations

from pathlib import Path

from aggregator.checkpoint import AggregatorState, CheckpointStore
from aggregator.durability import Durability
from messages.transport.broker import Delivery
from messages.transport.memory import MemoryBroker


def _setup(tmp_path: Path, every: int = 4) -> tuple[Durability, MemoryBroker, list[Delivery]]:
    broker = MemoryBroker(f"memory://durability-{tmp_path.name}")
    broker.declare_queue("q")
    for i in range(8):
        broker.publish("", "q", str(i).encode())
    got: list[Delivery] = []
    broker.consume("q", got.append, prefetch=8)
    broker.process_events(0.05)
    assert len(got) == 8
    durability = Durability(CheckpointStore(tmp_path), every, AggregatorState)
    durability.session(broker)
    return durability, broker, got


def unacked(broker: MemoryBroker) -> int:
    return len(broker._unacked)


def test_heartbeats_are_acked_at_once_and_never_make_a_checkpoint(tmp_path: Path) -> None:
    durability, broker, got = _setup(tmp_path)
    for d in got[:6]:
        assert durability.handled(d, durable=False) is False
    assert unacked(broker) == 2 and durability.store is not None
    assert durability.store.files() == []


def test_a_heartbeat_behind_an_update_waits_for_the_update_s_checkpoint(tmp_path: Path) -> None:
    durability, broker, got = _setup(tmp_path)
    durability.handled(got[0])  # an update: its ack needs a checkpoint
    durability.handled(got[1], durable=False)  # must not ack got[0] with it
    assert unacked(broker) == 8
    assert durability.commit()  # the checkpoint, then both acks
    assert unacked(broker) == 6


def test_held_acks_are_not_released_by_a_heartbeat(tmp_path: Path) -> None:
    durability, broker, got = _setup(tmp_path)
    durability.handled(got[0])
    durability.commit(hold_acks=True)  # secure aggregation's backpressure
    durability.handled(got[1], durable=False)
    assert unacked(broker) == 8
    durability.handled(got[2])
    durability.commit()
    assert unacked(broker) == 5


def test_updates_still_make_a_checkpoint_due_by_count(tmp_path: Path) -> None:
    durability, _broker, got = _setup(tmp_path, every=2)
    assert durability.handled(got[0]) is False
    assert durability.handled(got[1], durable=False) is False  # not counted
    assert durability.handled(got[2]) is True
