"""``dfl plot`` / ``deploy.plot.plot_logs``: evaluation logs in, a PNG out, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.plot import main, plot_logs
from messages.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(path: Path, accuracies: list[float]) -> Path:
    lines = [json.dumps({"time": 2.5 * i, "version": i, "accuracy": acc, "loss": 1.0 - acc,
                         "updates": 2 * i})
             for i, acc in enumerate(accuracies)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def logs(tmp_path: Path) -> list[Path]:
    return [write_log(tmp_path / "fedasync.jsonl", [0.1, 0.6, 0.9, 0.97, 0.981]),
            write_log(tmp_path / "fedbuff.jsonl", [0.1, 0.4, 0.8, 0.95, 0.975, 0.985])]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 5 * 1024


def test_plot_logs_writes_a_png(logs: list[Path], tmp_path: Path) -> None:
    out = plot_logs(logs, tmp_path / "figs" / "accuracy.png", labels=["FedAsync", "FedBuff"],
                    target=0.98)
    assert out == tmp_path / "figs" / "accuracy.png"
    assert_png(out)


def test_plot_logs_defaults_to_file_stems(logs: list[Path], tmp_path: Path) -> None:
    assert_png(plot_logs(logs[:1], tmp_path / "one.png"))


def test_main_writes_a_png(logs: list[Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "accuracy.png"
    assert main([*map(str, logs), "-o", str(out), "--labels", "a,b", "--target", "0.98"]) == 0
    assert_png(out)
    assert capsys.readouterr().out.strip() == str(out)


def test_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "example:" in capsys.readouterr().out


@pytest.mark.parametrize(("content", "expected"), [
    (None, "no such evaluation log"),
    ("", "empty"),
    ("\n\n", "empty"),
    ('{"time": 1, "version": 0, "accuracy": 0.5}\n', "missing loss, updates"),
    ("not json\n", "not a JSON line"),
    ("[1, 2]\n", "not a JSON object"),
    ('{"time": "x", "version": 0, "accuracy": 0.5, "loss": 1, "updates": 0}\n',
     "is not a number"),
])
def test_bad_logs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      content: str | None, expected: str) -> None:
    log = tmp_path / "bad.jsonl"
    if content is not None:
        log.write_text(content)
    out = tmp_path / "out.png"
    with pytest.raises(ConfigError, match=expected) as exc:
        plot_logs([log], out)
    assert "\n" not in str(exc.value)
    assert not out.exists()

    with pytest.raises(SystemExit) as exit_:
        main([str(log), "-o", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dfl plot: error: ") and expected in err
    assert not out.exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--labels", "only-one"], "1 labels for 2 logs"),
    (["--target", "98"], "target 98"),
])
def test_bad_options_are_one_line_errors(logs: list[Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         args: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*map(str, logs), "-o", str(tmp_path / "out.png"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_no_logs_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "see dfl plot --help" in err
