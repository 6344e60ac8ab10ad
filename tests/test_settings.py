"""Settings: flags > DFL_* environment > TOML file > defaults, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator import AggregatorConfig
from messages.errors import ConfigError
from worker import WorkerConfig
from worker.config import ordinal_from_hostname


def test_flags_beat_the_environment_which_beats_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "aggregator.toml"
    toml.write_text('min_parties = 5\nstrategy = "fedbuff"\nbuffer_k = 7\nfederation = "file"\n')
    monkeypatch.setenv("DFL_MIN_PARTIES", "4")
    monkeypatch.setenv("DFL_FEDERATION", "env")
    config = AggregatorConfig.load({"federation": "flag"}, str(toml))
    assert config.federation == "flag"  # flag
    assert config.min_parties == 4  # environment
    assert (config.strategy, config.buffer_k) == ("fedbuff", 7)  # file
    assert config.eta == 1.0  # default


@pytest.mark.parametrize(("source", "expected"), [
    ("flag", "--min-parties 0: Input should be greater than or equal to 1"),
    ("env", "--min-parties '0': Input should be greater than or equal to 1"),
    ("file", "--min-parties 0: Input should be greater than or equal to 1"),
])
def test_a_bad_value_from_any_source_is_refused_naming_the_setting(
        source: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text("min_parties = 0\n" if source == "file" else "")
    if source == "env":
        monkeypatch.setenv("DFL_MIN_PARTIES", "0")
    with pytest.raises(ConfigError) as info:
        AggregatorConfig.load({"min_parties": 0} if source == "flag" else {}, str(toml))
    assert str(info.value).startswith(expected) and "DFL_MIN_PARTIES" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_settings_and_missing_files_are_refused(tmp_path: Path) -> None:
    toml = tmp_path / "w.toml"
    toml.write_text("partyid = 3\n")
    with pytest.raises(ConfigError, match="partyid"):
        WorkerConfig.load({}, str(toml))
    with pytest.raises(ConfigError, match="no such file"):
        WorkerConfig.load({}, str(tmp_path / "missing.toml"))


def test_choices_name_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="'iid', 'dirichlet' or 'shards'"):
        WorkerConfig(partition="random")


def test_effective_settings_mask_the_broker_password() -> None:
    text = AggregatorConfig(broker="amqp://user:s3cret@rabbit:5672/%2F",
                            keys_dir="keys").effective()
    assert "s3cret" not in text and "amqp://user:***@rabbit" in text


def test_party_ids_come_from_a_statefulset_host_name() -> None:
    assert ordinal_from_hostname("worker-12") == 12
    assert ordinal_from_hostname("dfl-worker-3.dfl.svc.cluster.local") == 3
    with pytest.raises(ValueError, match="does not end in a number"):
        ordinal_from_hostname("worker")
