"""One new piece of behaviour added at each seam, in a few lines, with no change to the
service loops: an update stage and an observer in the aggregator, a delta stage and a
trainer wrapper in the worker (docs/architecture.md lists the seams)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from aggregator import Aggregator, AggregatorConfig
from aggregator.outcomes import DeliveryEvent, Ending
from messages.errors import InvalidMessage
from messages.types import NDArrays
from messages.wire.kinds import Update
from tests.test_aggregator_service import Env
from worker import Worker, WorkerConfig
from worker.pipeline import Outgoing, stages_for
from worker.trainers import TrainerWrapper, TrainResult, build_trainer

TINY = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic"}


def test_an_update_stage_and_an_observer_attach_without_touching_the_loop(
        broker_url: str, federation: str) -> None:
    env = Env(broker_url, federation)
    agg = env.start(min_parties=1, staleness="constant", mixing_alpha=0.5)
    events: list[DeliveryEvent] = []

    def at_most_50_samples(update: Update) -> None:  # a new stage: a few lines
        if update.num_samples > 50:
            raise InvalidMessage("too-many-samples", f"{update.num_samples} > 50")

    agg.update_stages.append(at_most_50_samples)
    agg.observers.add(events.append)  # a new observer: one line
    client = env.client()
    client.join("a")
    client.update("a", 0, 0, num_samples=100)
    client.update("a", 1, 0, num_samples=10)
    client.pump(lambda: agg.version == 1 and len(events) >= 2)
    assert [(e.ending, e.reason or e.outcome) for e in events[-2:]] == [
        (Ending.DEAD_LETTERED, "too-many-samples"), (Ending.APPLIED, "applied")]
    client.pump(lambda: len(client.dead) == 1)
    assert client.dead[0].reason == "too-many-samples"
    agg.stop()
    agg.wait(10)
    client.b.close()


class Counted(TrainerWrapper):
    """A trainer wrapper: counts rounds, changes nothing."""

    rounds = 0

    def train(self, base: NDArrays, steps: int, batch_size: int, learning_rate: float,
              *, proximal_mu: float = 0.0) -> TrainResult:
        Counted.rounds += 1
        return self.inner.train(base, steps, batch_size, learning_rate,
                                   proximal_mu=proximal_mu)


def marked(out: Outgoing) -> Outgoing:  # a delta stage: tags every update it sends
    out.metrics["marked"] = 1.0
    return out


@pytest.mark.slow
def test_a_delta_stage_and_a_trainer_wrapper_attach_to_a_worker() -> None:
    broker = f"memory://{uuid.uuid4().hex[:8]}"
    agg = Aggregator(AggregatorConfig(broker=broker, min_parties=1, max_versions=2,
                                      local_steps=5, evaluate=False, **TINY)).start()
    config = WorkerConfig(party_id=0, num_parties=1, broker=broker, **TINY)
    factory: Any = lambda cfg, pid: Counted(build_trainer(cfg, pid))  # noqa: E731
    party = Worker(config, trainer_factory=factory,
                   delta_stages=[*stages_for(config), marked]).start()
    assert agg.wait(240), agg.status
    assert party.wait(60)
    assert Counted.rounds >= 2
    assert agg.membership.parties["0"].metrics.get("marked") == 1.0
