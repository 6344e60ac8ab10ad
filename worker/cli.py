"""``dfl worker`` / ``python -m worker``: one party's daemon."""

from __future__ import annotations

import argparse
import sys

from messages.daemon.cli import (
    Formatter,
    Parser,
    add_common_options,
    add_daemon_options,
    add_insecure_option,
    bind_settings,
    run_daemon,
)
from messages.wire.compression import ENCODINGS
from worker.config import WorkerConfig
from worker.partition import SCHEMES
from worker.service import Worker

DESCRIPTION = """\
Run one party of a federation: it loads its own shard of the training data (party
--party-id of --num-parties, split by --partition), joins the aggregator, trains the
newest global model for the aggregator's --local-steps minibatches, publishes the weight
delta, and repeats until the aggregator broadcasts a stop or you press Ctrl-C/send
SIGTERM (it then finishes the current minibatch, says goodbye and exits 0). A party
started late joins and trains from the current global model.

example:
  dfl worker --party-id 0 --num-parties 2 --partition dirichlet --alpha 0.5 \\
      --broker amqp://guest:guest@localhost:5672/%2F --data-dir ~/mnist
"""


def add_partition_options(parser: argparse.ArgumentParser) -> None:
    """How the training set is split among parties; shared by ``dfl worker`` and ``dfl run``."""
    g = parser.add_argument_group("partition")
    g.add_argument("--partition", choices=SCHEMES,
                   help="iid: uniform random split; dirichlet: label skew with --alpha; "
                        "shards: McMahan's sorted shards, --shards-per-party classes each")
    g.add_argument("--alpha", type=float,
                   help="Dirichlet concentration: small = strong label skew, large = near iid")
    g.add_argument("--shards-per-party", type=int,
                   help="shards (about one class each) per party for --partition shards")


def add_privacy_options(parser: argparse.ArgumentParser) -> None:
    """Each party's differential privacy; shared by ``dfl worker`` and ``dfl run``."""
    dp = parser.add_argument_group(
        "differential privacy of each record (DP-SGD inside local training; "
        "docs/privacy.md)")
    dp.add_argument("--dp-sgd", action="store_true",
                    help="train with DP-SGD: Poisson-sampled batches (rate batch size / shard "
                         "size), each example's gradient clipped to --l2-clip, Gaussian noise "
                         "of std Z*C on their sum; epsilon is logged and sent with each update")
    dp.add_argument("--noise-multiplier", type=float, metavar="Z",
                    help="with --dp-sgd, the noise's std in units of the clip norm")
    dp.add_argument("--l2-clip", type=float, metavar="C",
                    help="with --dp-sgd, the L2 norm each example's gradient is clipped to")
    dp.add_argument("--target-epsilon", type=float, metavar="EPS",
                    help="with --dp-sgd, leave the federation before a round would take "
                         "epsilon (at --dp-delta) past EPS")
    dp.add_argument("--state-dir", metavar="DIR",
                    help="where each party keeps its DP-SGD step ledger (DIR/party-ID/): keep "
                         "it across restarts, or epsilon starts again from zero")
    dp.add_argument("--dp-delta", type=float, metavar="DELTA",
                    help="the delta at which epsilon is reported (both kinds)")
    party = parser.add_argument_group(
        "differential privacy of each party's whole data (added to each update)")
    party.add_argument("--dp-clip", type=float, metavar="C",
                       help="clip each update's delta to this L2 norm (over all tensors)")
    party.add_argument("--dp-noise", type=float, metavar="SIGMA",
                       help="then add Gaussian noise of std SIGMA*C to every coordinate (needs "
                            "--dp-clip); the epsilon spent is logged with each update sent. "
                            "Protects a party's whole data set, not one record: it fits many "
                            "parties and a large FedBuff --buffer-k, whose average divides the "
                            "noise by sqrt(K); with few parties the noise swamps the model")


def add_compression_options(parser: argparse.ArgumentParser) -> None:
    """How each party's deltas travel; shared by ``dfl worker`` and ``dfl run``."""
    g = parser.add_argument_group("delta compression (lossy ones carry what they drop into "
                                  "the next update: error feedback)")
    g.add_argument("--encoding", choices=ENCODINGS,
                   help="float32: as trained; float16: half precision (2x fewer bytes); int8: "
                        "one byte per value with a scale per tensor (4x fewer); topk: only the "
                        "--topk-fraction largest values of each tensor, with their positions")
    g.add_argument("--topk-fraction", type=float, metavar="F",
                   help="with --encoding topk, the fraction of each tensor's values sent "
                        "(0.01: about 50x fewer bytes)")


def build_parser(prog: str = "dfl worker") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=DESCRIPTION, formatter_class=Formatter)
    parser.add_argument("--party-id", metavar="ID",
                        help="this party's index 0..N-1 (picks its shard and names it); "
                             "'hostname' takes the host name's trailing number (a StatefulSet "
                             "ordinal); 'auto' claims the lowest id no running party holds")
    parser.add_argument("--num-parties", type=int,
                        help="N, the number of shards the training set is split into")
    add_common_options(parser)
    add_partition_options(parser)
    add_daemon_options(parser)
    parser.add_argument("--heartbeat-seconds", type=float,
                        help="how often the party tells the aggregator it is alive")
    parser.add_argument("--slowdown", type=float,
                        help="simulate a slower party: after each round, sleep (SLOWDOWN - 1) "
                             "times the measured training time")
    parser.add_argument("--slowdown-sigma", type=float, metavar="SIGMA",
                        help="draw each round's slowdown from a lognormal with median "
                             "--slowdown and this shape (heavy-tailed, seeded stragglers)")
    add_privacy_options(parser)
    add_compression_options(parser)
    sec = parser.add_argument_group("security")
    sec.add_argument("--signing-key", metavar="FILE",
                     help="sign every message with this key: <id>.key (Ed25519) or "
                          "<id>.secret (HMAC), made by `dfl admin add-party`")
    sec.add_argument("--aggregator-key", metavar="FILE.pub",
                     help="accept only models and replies signed by this aggregator key")
    sec.add_argument("--helper-key", metavar="FILE.pem",
                     help="secure aggregation: mask every delta and seal its seed to this "
                          "helper key (helper-seal.pem, made by `dfl admin add-helper`); the "
                          "aggregator then never sees a delta in the clear (needs "
                          "--signing-key, an Ed25519 key)")
    add_insecure_option(sec)
    bind_settings(parser, WorkerConfig)
    return parser


def main(argv: list[str] | None = None, prog: str = "dfl worker") -> int:
    ns = build_parser(prog).parse_args(argv)

    def run(worker: Worker) -> str:
        stats = worker.run()
        return (f"party {worker.config.party} finished: {stats.updates_sent} updates sent "
                f"({stats.stopped_by or 'stopped'})")

    return run_daemon(prog, ns, WorkerConfig, Worker, run)


if __name__ == "__main__":
    sys.exit(main())
