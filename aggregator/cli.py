"""``dfl aggregator`` / ``python -m aggregator``: the aggregation daemon."""

from __future__ import annotations

import argparse
import sys

from aggregator.config import ROLES, START_MODES, AggregatorConfig
from aggregator.staleness import STALENESS_FUNCTIONS
from aggregator.strategies import AGGREGATIONS, SERVER_OPTIMIZERS, STRATEGIES
from messages.daemon.cli import (
    Formatter,
    Parser,
    add_common_options,
    add_daemon_options,
    add_insecure_option,
    bind_settings,
    run_daemon,
)

DESCRIPTION = """\
Run the aggregator of a federation: it waits for --min-parties parties to join (or, with
--start manual, admits joins until `dfl start` asks it to begin), releases model version 0,
then folds every party's weight delta into the global model (FedAsync, FedBuff or
synchronous FedAvg), broadcasts each new version, and evaluates the global model on the
held-out test set every --eval-every-seconds. It exits 0 when it reaches
--target-accuracy, --max-seconds or --max-versions (after broadcasting a stop so workers
exit too), or on Ctrl-C/SIGTERM.

example:
  dfl aggregator --broker amqp://guest:guest@localhost:5672/%2F --min-parties 2 \\
      --target-accuracy 0.98 --eval-log eval.jsonl --save-model global.keras
  dfl aggregator --start manual ...   # then, from any host: dfl start --federation mnist
"""


def add_strategy_options(parser: argparse.ArgumentParser) -> None:
    """How updates are combined; shared by ``dfl aggregator`` and ``dfl run``."""
    g = parser.add_argument_group("aggregation")
    g.add_argument("--strategy", choices=STRATEGIES,
                   help="fedasync: apply each update at once; fedbuff: average every K updates; "
                        "fedavg: synchronous rounds over all active parties (the baseline)")
    g.add_argument("--staleness", choices=STALENESS_FUNCTIONS,
                   help="staleness weight S(s): constant 1; polynomial (1+s)^-a; "
                        "hinge 1 if s<=b else 1/(a(s-b)+1)")
    g.add_argument("--staleness-a", type=float, metavar="A",
                   help="a of the staleness function (default 0.5 polynomial, 10 hinge)")
    g.add_argument("--staleness-b", type=int, metavar="B",
                   help="b of the hinge function (default 4)")
    g.add_argument("--mixing-alpha", type=float, metavar="ALPHA",
                   help="FedAsync mixing weight: w += ALPHA * S(s) * delta")
    g.add_argument("--buffer-k", type=int, metavar="K",
                   help="FedBuff: updates per aggregation")
    g.add_argument("--eta", type=float,
                   help="server learning rate of FedBuff and FedAvg")
    g.add_argument("--aggregation", choices=AGGREGATIONS,
                   help="FedBuff: how a full buffer is combined: mean (weighted by samples and "
                        "S(s)); median or trimmed-mean (coordinate-wise, unweighted, need "
                        "--buffer-k >= 3; resist a minority of malicious parties sending "
                        "scaled or sign-flipped deltas)")
    g.add_argument("--trim-fraction", type=float, metavar="BETA",
                   help="trimmed-mean: drop floor(BETA*K) largest and smallest values of each "
                        "coordinate, 0 <= BETA < 0.5 (must trim at least one: BETA >= 1/K)")
    g.add_argument("--max-update-norm", type=float, metavar="C",
                   help="FedAsync, FedBuff: scale every delta down to global L2 norm C before "
                        "using it (bounds how far one update moves the model)")
    g.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS,
                   help="how the aggregated delta d moves the model: plain w += lr*d; "
                        "momentum (FedAvgM); adam or yogi (FedAdam/FedYogi, Reddi et al. "
                        "2021: use a small --eta/--mixing-alpha, e.g. 0.01); lr is --eta "
                        "(FedBuff, FedAvg) or --mixing-alpha (FedAsync)")
    g.add_argument("--server-beta1", type=float, metavar="B1",
                   help="momentum of momentum, adam and yogi")
    g.add_argument("--server-beta2", type=float, metavar="B2",
                   help="second-moment decay of adam and yogi")
    g.add_argument("--server-tau", type=float, metavar="TAU",
                   help="adaptivity of adam and yogi: w += lr*m/(sqrt(v)+TAU)")
    g.add_argument("--server-staleness-threshold", type=int, metavar="T",
                   help="FedAsync, FedBuff: past T versions of staleness (the largest in a "
                        "buffer) the step shrinks to lr*T/staleness (FADAS, Wang et al. 2024)")
    g.add_argument("--max-staleness", type=int,
                   help="dead-letter updates staler than this many versions")
    g.add_argument("--max-delta-abs", type=float,
                   help="dead-letter updates with any |value| above this (finite but huge "
                        "deltas would overflow the model)")
    t = parser.add_argument_group("training settings sent to every party")
    t.add_argument("--local-steps", type=int,
                   help="minibatches a party trains per update")
    t.add_argument("--batch-size", type=int, help="local minibatch size")
    t.add_argument("--learning-rate", type=float, help="local Adam learning rate")
    t.add_argument("--proximal-mu", type=float, metavar="MU",
                   help="FedProx: parties add MU/2 * ||w - w_base||^2 to their local loss, "
                        "pulling local training towards the model it started from (helps "
                        "under skewed data; 0 = off)")
    s = parser.add_argument_group("stopping and output")
    s.add_argument("--min-parties", type=int,
                   help="parties that must join before model version 0 is released")
    s.add_argument("--target-accuracy", type=float, metavar="FRACTION",
                   help="stop when the global model's test accuracy reaches this (e.g. 0.98)")
    s.add_argument("--max-seconds", type=float, metavar="S",
                   help="stop after this much wall time")
    s.add_argument("--max-versions", type=int, metavar="N",
                   help="stop at this global model version")
    s.add_argument("--eval-log", metavar="FILE.jsonl",
                   help="write one JSON line per evaluation: time, version, accuracy, loss, "
                        "updates")
    s.add_argument("--save-model", metavar="FILE.keras",
                   help="save the final global model here")
    s.add_argument("--initial-model", metavar="FILE.keras",
                   help="start the federation from this saved Keras model's weights")
    s.add_argument("--tensorboard", metavar="DIR",
                   help="also write the evaluations as TensorBoard scalars here")
    s.add_argument("--eval-every-seconds", type=float, metavar="S",
                   help="evaluate the newest global model at most this often")
    s.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="no evaluation: the aggregator never imports TensorFlow")


def build_parser(prog: str = "dfl aggregator") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=DESCRIPTION, formatter_class=Formatter)
    add_common_options(parser)
    add_strategy_options(parser)
    parser.add_argument("--start", choices=START_MODES,
                        help="when model version 0 is released: min-parties, once --min-parties "
                             "parties joined; manual, only when asked (`dfl start`, "
                             "Aggregator.start_training()), with the parties that joined by then")
    add_daemon_options(parser)
    d = parser.add_argument_group("durability")
    d.add_argument("--checkpoint-dir", metavar="DIR",
                   help="checkpoint the state here and resume from it on start; deliveries are "
                        "acked only once a checkpoint holds their effect")
    d.add_argument("--checkpoint-every-updates", type=int, metavar="N",
                   help="checkpoint after this many handled messages (at most half of "
                        "--prefetch)")
    d.add_argument("--checkpoint-every-seconds", type=float, metavar="S",
                   help="... or when the oldest unacked message is this old")
    d.add_argument("--broadcast-interval", type=float, metavar="S",
                   help="send the newest model at most every S seconds (default 0.1): "
                        "versions applied in between are skipped, parties train on the newest")
    d.add_argument("--push-max-parties", type=int, metavar="N",
                   help="push each new model to every party while at most N are active "
                        "(default 16); above that, only announce its version and let each "
                        "party fetch the newest model when it starts a round (0: always)")
    d.add_argument("--prefetch", type=int,
                   help="unacked messages the broker may push to the aggregator (default 32)")
    d.add_argument("--lease-seconds", type=float,
                   help="a party that sends nothing for this long is considered gone")
    d.add_argument("--delivery-limit", type=int, metavar="N",
                   help="RabbitMQ dead-letters a message after N+1 deliveries (it crashed "
                        "or stalled the aggregator N+1 times): no crash loop lasts longer")
    lim = parser.add_argument_group("limits")
    lim.add_argument("--max-parties", type=int, metavar="N",
                     help="refuse joins of new party ids past N known parties (the longest-"
                          "gone party that left or expired makes room)")
    lim.add_argument("--join-rate", type=float, metavar="PER_S",
                     help="take joins at most this often (each costs a checkpoint and a full "
                          "model); refused joins are dead-lettered and parties ask again")
    sec = parser.add_argument_group("security")
    sec.add_argument("--keys", dest="keys_dir", metavar="DIR",
                     help="require every party message to be signed: DIR holds each party's "
                          "<id>.pub (Ed25519) or <id>.secret (HMAC) and aggregator.key, with "
                          "which models are signed (made by `dfl admin`)")
    sa = parser.add_argument_group("secure aggregation (with `dfl helper`, another operator)")
    sa.add_argument("--secure-aggregation", action="store_true",
                    help="parties send masked deltas; the helper unmasks only the weighted sum "
                         "of each full buffer, so this aggregator never sees one update "
                         "(needs --strategy fedbuff, --aggregation mean, --buffer-k >= 3)")
    sa.add_argument("--secagg-clip", type=float, metavar="C",
                    help="parties clip each delta to L2 norm C before masking (default 100); "
                         "with --buffer-k and --secagg-max-weight it fixes the fixed-point "
                         "resolution, below 1/scale per coordinate")
    sa.add_argument("--secagg-max-weight", type=int, metavar="W",
                    help="integer weight levels of an update in a masked sum (default 16; "
                         "the helper's --max-weight must be at least this)")
    so = parser.add_argument_group("scale-out: edge aggregators under one root (FedBuff)")
    so.add_argument("--role", choices=ROLES,
                    help="single: apply the parties' updates (default); edge: compete with "
                         "other edges for the updates and forward each batch as one partial "
                         "sum; root: apply the edges' partial sums, run the control plane "
                         "and broadcast (needs --strategy fedbuff)")
    so.add_argument("--edge-id", metavar="ID",
                    help="an edge's name in logs and queues (default edge-<host>-<pid>)")
    so.add_argument("--edge-k", type=int, metavar="N",
                    help="updates per partial sum (default 8)")
    so.add_argument("--edge-flush-seconds", type=float, metavar="S",
                    help="send a partial sum of fewer updates once its oldest is this old "
                         "(default 0.5)")
    so.add_argument("--edge-answer-seconds", type=float, metavar="S",
                    help="send a partial sum again when the root has not answered it within "
                         "S seconds (default 30; the root answers a repeat without applying "
                         "it twice)")
    add_insecure_option(sec)
    bind_settings(parser, AggregatorConfig)
    return parser


def main(argv: list[str] | None = None, prog: str = "dfl aggregator") -> int:
    ns = build_parser(prog).parse_args(argv)
    from aggregator.edge import Edge
    from aggregator.service import Aggregator

    def run(daemon: Aggregator | Edge) -> str:
        if isinstance(daemon, Edge):
            edge = daemon.run()
            return (f"edge {daemon.edge_id} finished ({edge.finished or 'stopped'}): "
                    f"{edge.taken} updates taken by the root in {edge.partials} partials, "
                    f"{edge.duplicates} duplicates, {sum(edge.dead.values())} dead-lettered")
        status = daemon.run()
        return (f"finished at version {status.version}: {status.finished or 'stopped'}; "
                f"{status.updates} updates applied, accuracy {status.accuracy}")

    def make(config: AggregatorConfig) -> Aggregator | Edge:
        return Edge(config) if config.role == "edge" else Aggregator(config)

    return run_daemon(prog, ns, AggregatorConfig, make, run)


if __name__ == "__main__":
    sys.exit(main())
