"""``dfl plot``: accuracy against wall time from one or more evaluation logs.

The evaluation log (``--eval-log``, one JSON line per evaluation with ``time``,
``version``, ``accuracy``, ``loss`` and ``updates``) is the record of a run; plotting
several on one set of axes is how strategies, partitions or broker set-ups are compared
(wall time, not versions, because an asynchronous federation is judged by how soon it
reaches its target).

The figure is drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, never through
``pyplot``: no global state, no display needed, and safe to call from a notebook, a
thread or a headless CI machine.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from messages.daemon.cli import Formatter, Parser, fail
from messages.errors import ConfigError

REQUIRED_KEYS = ("time", "version", "accuracy", "loss", "updates")
"""Keys every evaluation record has (the evaluator writes exactly these)."""

PLOT_DESCRIPTION = """\
Plot test accuracy against wall time (seconds since the aggregator started) from one or
more evaluation logs (the JSONL files written by --eval-log), one line per log, and save
the figure as a PNG. Lines are labelled with the file names unless --labels is given;
--target draws the accuracy goal as a dashed line.

example:
  dfl plot runs/fedasync.jsonl runs/fedbuff.jsonl -o runs/accuracy.png \\
      --labels FedAsync,FedBuff --target 0.98
"""


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of one evaluation log, checked so a plot never silently drops a run.

    Raises ``ConfigError`` (one line naming the file, and the line number where it
    applies) when the file is missing, empty, not JSON lines, or lacks a required key.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such evaluation log") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the evaluation log ({exc.strerror})") from None
    records: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{number}: not a JSON line ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{p}:{number}: not a JSON object")
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise ConfigError(f"{p}:{number}: missing {', '.join(missing)} "
                              f"(an evaluation record has {', '.join(REQUIRED_KEYS)})")
        for key in ("time", "accuracy"):
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{p}:{number}: {key} {value!r} is not a number")
        records.append(record)
    if not records:
        raise ConfigError(f"{p}: the evaluation log is empty (did the run evaluate at all?)")
    return records


def plot_logs(logs: Sequence[str | Path], output: str | Path, *,
              labels: Sequence[str] | None = None, target: float | None = None) -> Path:
    """Draw accuracy against wall time for each log and save a PNG at ``output``.

    Every log is read and checked before anything is drawn, so a bad input leaves no
    half-written figure behind. Returns the path written (its folder is created).
    """
    if not logs:
        raise ConfigError("give at least one evaluation log to plot")
    if labels is not None and len(labels) != len(logs):
        raise ConfigError(f"{len(labels)} labels for {len(logs)} logs: give one label per log")
    if target is not None and not 0 < target <= 1:
        raise ConfigError(f"target {target}: give an accuracy fraction in (0, 1], e.g. 0.98")
    runs = [read_log(log) for log in logs]
    names = list(labels) if labels is not None else [Path(log).stem for log in logs]

    # Imported here so that ``dfl`` itself starts without loading matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, records in zip(names, runs, strict=True):
        axes.plot([r["time"] for r in records], [r["accuracy"] for r in records],
                  marker="o", markersize=3, linewidth=1.5, label=name)
    if target is not None:
        axes.axhline(target, color="grey", linestyle="--", linewidth=1,
                     label=f"target {target:g}")
    axes.set_xlabel("wall time since the aggregator started (s)")
    axes.set_ylabel("test accuracy")
    axes.set_title("global model accuracy")
    axes.grid(True, alpha=0.4)
    axes.legend(loc="lower right")
    figure.tight_layout()

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out


def main(argv: list[str] | None = None) -> int:
    """``dfl plot``: exit 0 with the PNG's path, or 2 with a one-line error."""
    prog = "dfl plot"
    parser = Parser(prog=prog, description=PLOT_DESCRIPTION, formatter_class=Formatter)
    parser.add_argument("logs", nargs="+", metavar="LOG.jsonl",
                        help="evaluation logs (--eval-log of dfl run / dfl aggregator)")
    parser.add_argument("-o", "--output", default="runs/accuracy.png", metavar="PNG",
                        help="where to write the figure (default: %(default)s)")
    parser.add_argument("--labels", default=None, metavar="A,B,...",
                        help="comma-separated legend labels, one per log (default: file names)")
    parser.add_argument("--target", type=float, default=None, metavar="ACC",
                        help="draw this accuracy as a dashed line, e.g. 0.98")
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    labels = [s.strip() for s in ns.labels.split(",")] if ns.labels is not None else None
    try:
        written = plot_logs(ns.logs, ns.output, labels=labels, target=ns.target)
    except ConfigError as exc:
        fail(prog, exc)
    except OSError as exc:
        fail(prog, f"{ns.output}: cannot write the figure ({exc.strerror or exc})")
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
