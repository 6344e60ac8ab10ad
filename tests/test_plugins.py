"""The plug-in contract: a data loader gets ``data_dir`` only if it declares it, by keyword;
a signature that cannot be met is refused at start with one line; ``DFL_DATA_DIR`` set for
MNIST does not break a federation on another loader."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from aggregator import Aggregator, AggregatorConfig
from messages.daemon.plugins import (
    check_data_plugin,
    check_model_plugin,
    load_dataset,
)
from messages.errors import PluginError
from tests.processes import ENV, TEST_SETTINGS, users_settings
from worker import Worker, WorkerConfig
from worker.data import Dataset

HERE = __name__
TINY = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic"}


# -- plug-ins under test, loaded by import path ----------------------------------------------
def keyword_only(*, data_dir: str | None = None) -> dict[str, Any]:
    return {"data_dir": data_dir}


def positional(data_dir: str | None = None, limit: int = 3) -> dict[str, Any]:
    return {"data_dir": data_dir, "limit": limit}


def anything(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def no_dir(num_train: int = 5) -> dict[str, Any]:
    return {"num_train": num_train}


def positional_only(data_dir: str | None = None, /) -> dict[str, Any]:
    return {"data_dir": data_dir}


def needs_num_train(num_train: int) -> dict[str, Any]:
    return {"num_train": num_train}


def needs_data_dir(data_dir: str) -> dict[str, Any]:
    return {"data_dir": data_dir}


def model_with_width(width: int) -> None:
    raise AssertionError("never called")


# -- data plug-ins ---------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "without"), [
    ("keyword_only", {"data_dir": None}),
    ("positional", {"data_dir": None, "limit": 3}),
    ("anything", {}),
])
def test_a_loader_that_declares_data_dir_gets_it_by_keyword(
        name: str, without: dict[str, Any]) -> None:
    assert check_data_plugin(f"{HERE}:{name}")[1] is True
    assert load_dataset(f"{HERE}:{name}", "/data/mnist") == {**without, "data_dir": "/data/mnist"}
    assert load_dataset(f"{HERE}:{name}") == without  # no folder: no argument at all


@pytest.mark.parametrize(("name", "called"), [("no_dir", {"num_train": 5}),
                                              ("positional_only", {"data_dir": None})])
def test_a_loader_without_a_keyword_data_dir_is_called_without_arguments(
        name: str, called: dict[str, Any]) -> None:
    assert check_data_plugin(f"{HERE}:{name}")[1] is False
    assert load_dataset(f"{HERE}:{name}", "/data/mnist") == called


def test_load_synthetic_ignores_a_data_dir_and_load_mnist_takes_it() -> None:
    """The newcomer's failure: DFL_DATA_DIR reached load_synthetic as num_train."""
    data = load_dataset("worker.data:load_synthetic", "/somewhere/mnist")
    assert isinstance(data, Dataset) and len(data.x_train) == 2000
    assert check_data_plugin("worker.data:load_mnist")[1] is True


@pytest.mark.parametrize(("name", "param"), [("needs_num_train", "num_train"),
                                             ("needs_data_dir", "data_dir")])
def test_a_loader_with_a_parameter_that_cannot_be_given_is_refused_in_one_line(
        name: str, param: str) -> None:
    with pytest.raises(PluginError) as caught:
        check_data_plugin(f"{HERE}:{name}")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--data {HERE}:{name}: parameter {param!r} has no default")
    assert f"declare `def {name}(data_dir=None, ...)`" in message


def test_a_model_plugin_must_be_callable_without_arguments() -> None:
    with pytest.raises(PluginError, match=r"^--model .*'width' has no default.*"
                                          r"declare `def model_with_width\(\)`"):
        check_model_plugin(f"{HERE}:model_with_width")


def test_daemons_refuse_a_wrong_data_signature_before_they_connect() -> None:
    broker = f"memory://{uuid.uuid4().hex[:8]}"
    bad = f"{HERE}:needs_num_train"
    with pytest.raises(PluginError, match="declare"):
        Worker(WorkerConfig(broker=broker, data=bad))
    with pytest.raises(PluginError, match="declare"):
        Aggregator(AggregatorConfig(broker=broker, data=bad))


# -- the user's environment ------------------------------------------------------------------
def test_no_user_dfl_variable_reaches_a_test_or_its_processes() -> None:
    assert users_settings(os.environ) == [] and users_settings(ENV) == []
    assert users_settings({"DFL_DATA_DIR": "x", "DFL_TEST_AMQP_URL": "y"}) == ["DFL_DATA_DIR"]
    assert all(name.startswith("DFL_") for name in TEST_SETTINGS)


@pytest.mark.slow
def test_a_federation_on_synthetic_data_trains_with_dfl_data_dir_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a user who exported DFL_DATA_DIR for MNIST and then ran the tests."""
    monkeypatch.setenv("DFL_DATA_DIR", str(tmp_path))  # empty: load_mnist would refuse it
    broker = f"memory://{uuid.uuid4().hex[:8]}"
    agg = Aggregator(AggregatorConfig(broker=broker, min_parties=2, max_versions=2,
                                      local_steps=5, eval_every_seconds=0.5, **TINY)).start()
    parties = [Worker(WorkerConfig(party_id=i, num_parties=2, broker=broker, **TINY)).start()
               for i in range(2)]
    assert all(p.config.data_dir == str(tmp_path) for p in parties)
    assert agg.wait(240), f"version {agg.status.version}; {[p.stats for p in parties]}"
    for p in parties:
        assert p.wait(60) and p.stats.stopped_by.startswith("aggregator"), p.stats
    assert agg.status.version >= 2 and sum(p.stats.updates_sent for p in parties) >= 2
    assert agg.history and agg.history[-1]["version"] > 0
