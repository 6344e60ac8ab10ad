"""The worker's model queue has a boundary too: whatever arrives there is taken or ignored
(logged and counted by reason), and the worker keeps going."""

from __future__ import annotations

import pytest

from messages.transport.broker import Delivery
from messages.wire.codec import encode
from messages.wire.deadletters import ENVELOPE_ERROR_HEADER
from messages.wire.kinds import Model, Query
from worker import Worker, WorkerConfig

TINY = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic"}


def ignored(w: Worker, reason: str) -> float:
    return float(w.metrics.ignored.labels(reason)._value.get())


@pytest.fixture
def worker() -> Worker:
    return Worker(WorkerConfig(broker="memory://", party_id=0, num_parties=1, **TINY))


def test_garbage_and_bad_envelopes_on_the_model_queue_are_ignored_and_counted(
        worker: Worker) -> None:
    worker._on_model(Delivery(b"\xc1 not msgpack", 1, "q"))
    worker._on_model(Delivery(encode(Query("rejoin")), 2, "q",
                              {ENVELOPE_ERROR_HEADER: "header table not decodable"}))
    assert ignored(worker, "not-msgpack") == 1 and ignored(worker, "bad-envelope") == 1
    assert not worker._rejoin  # the unreadable envelope's body was not acted on


def test_an_unexpected_exception_on_a_model_message_is_an_internal_error_not_a_stop(
        worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(_d: Delivery) -> None:
        raise KeyError("a bug this message triggers")

    monkeypatch.setattr(worker, "_handle_model", buggy)
    worker._on_model(Delivery(encode(Model(3, {})), 1, "q"))
    assert ignored(worker, "internal-error") == 1


def test_a_good_model_is_still_taken(worker: Worker) -> None:
    worker._on_model(Delivery(encode(Model(7, {})), 1, "q"))  # tensorless: an announcement
    assert worker._announced == 7
