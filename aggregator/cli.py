"""``dfl aggregator`` / ``python -m aggregator``: the aggregation daemon."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aggregator.config import AggregatorConfig
from aggregator.staleness import STALENESS_FUNCTIONS
from aggregator.strategies import STRATEGIES
from messages.cli import (
    DEFAULT_AMQP_URL,
    Formatter,
    Parser,
    add_common_options,
    fail,
    on_termination,
    setup_logging,
)
from messages.errors import FederationError

DESCRIPTION = """\
Run the aggregator of a federation: it waits for --min-parties parties to join, releases
model version 0, then folds every party's weight delta into the global model (FedAsync,
FedBuff or synchronous FedAvg), broadcasts each new version, and evaluates the global
model on the held-out test set every --eval-every-seconds. It exits 0 when it reaches
--target-accuracy, --max-seconds or --max-versions (after broadcasting a stop so workers
exit too), or on Ctrl-C/SIGTERM.

example:
  dfl aggregator --broker amqp://guest:guest@localhost:5672/%2F --min-parties 2 \\
      --target-accuracy 0.98 --eval-log eval.jsonl --save-model global.keras
"""


def add_strategy_options(parser: argparse.ArgumentParser) -> None:
    """How updates are combined; shared by ``dfl aggregator`` and ``dfl run``."""
    g = parser.add_argument_group("aggregation")
    g.add_argument("--strategy", choices=STRATEGIES, default="fedasync",
                   help="fedasync: apply each update at once; fedbuff: average every K updates; "
                        "fedavg: synchronous rounds over all active parties (the baseline)")
    g.add_argument("--staleness", choices=STALENESS_FUNCTIONS, default="polynomial",
                   help="staleness weight S(s): constant 1; polynomial (1+s)^-a; "
                        "hinge 1 if s<=b else 1/(a(s-b)+1)")
    g.add_argument("--staleness-a", type=float, default=None, metavar="A",
                   help="a of the staleness function (default 0.5 polynomial, 10 hinge)")
    g.add_argument("--staleness-b", type=int, default=None, metavar="B",
                   help="b of the hinge function (default 4)")
    g.add_argument("--mixing-alpha", type=float, default=0.6, metavar="ALPHA",
                   help="FedAsync mixing weight: w += ALPHA * S(s) * delta")
    g.add_argument("--buffer-k", type=int, default=2, metavar="K",
                   help="FedBuff: updates per aggregation")
    g.add_argument("--eta", type=float, default=1.0,
                   help="server learning rate of FedBuff and FedAvg")
    g.add_argument("--max-staleness", type=int, default=50,
                   help="dead-letter updates staler than this many versions")
    t = parser.add_argument_group("training settings sent to every party")
    t.add_argument("--local-steps", type=int, default=100,
                   help="minibatches a party trains per update")
    t.add_argument("--batch-size", type=int, default=32, help="local minibatch size")
    t.add_argument("--learning-rate", type=float, default=1e-3, help="local Adam learning rate")
    s = parser.add_argument_group("stopping and output")
    s.add_argument("--min-parties", type=int, default=2,
                   help="parties that must join before model version 0 is released")
    s.add_argument("--target-accuracy", type=float, default=None, metavar="FRACTION",
                   help="stop when the global model's test accuracy reaches this (e.g. 0.98)")
    s.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="stop after this much wall time")
    s.add_argument("--max-versions", type=int, default=None, metavar="N",
                   help="stop at this global model version")
    s.add_argument("--eval-log", default=None, metavar="FILE.jsonl",
                   help="write one JSON line per evaluation: time, version, accuracy, loss, "
                        "updates")
    s.add_argument("--save-model", default=None, metavar="FILE.keras",
                   help="save the final global model here")
    s.add_argument("--eval-every-seconds", type=float, default=5.0, metavar="S",
                   help="evaluate the newest global model at most this often")
    s.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="no evaluation: the aggregator never imports TensorFlow")


def config_from_args(ns: argparse.Namespace, **overrides: Any) -> AggregatorConfig:
    """An ``AggregatorConfig`` from parsed options (raises ``ConfigError``)."""
    fields = {f for f in AggregatorConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(ns).items() if k in fields}
    values.update(overrides)
    return AggregatorConfig(**values)


def build_parser(prog: str = "dfl aggregator") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=DESCRIPTION, formatter_class=Formatter)
    add_common_options(parser, DEFAULT_AMQP_URL)
    add_strategy_options(parser)
    d = parser.add_argument_group("durability")
    d.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="checkpoint the state here and resume from it on start; deliveries are "
                        "acked only once a checkpoint holds their effect")
    d.add_argument("--checkpoint-every-updates", type=int, default=16, metavar="N",
                   help="checkpoint after this many handled messages (at most --prefetch)")
    d.add_argument("--checkpoint-every-seconds", type=float, default=2.0, metavar="S",
                   help="... or when the oldest unacked message is this old")
    parser.add_argument("--prefetch", type=int, default=16,
                        help="unacked messages the broker may push to the aggregator")
    parser.add_argument("--lease-seconds", type=float, default=60.0,
                        help="a party that sends nothing for this long is considered gone")
    return parser


def main(argv: list[str] | None = None, prog: str = "dfl aggregator") -> int:
    ns = build_parser(prog).parse_args(argv)
    setup_logging(ns.log_level)
    from aggregator.service import Aggregator

    try:
        aggregator = Aggregator(config_from_args(ns))
        on_termination(aggregator.stop)
        status = aggregator.run()
    except FederationError as exc:
        fail(prog, exc)
    print(f"finished at version {status.version}: {status.finished or 'stopped'}; "
          f"{status.updates} updates applied, accuracy {status.accuracy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
