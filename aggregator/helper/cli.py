"""``dfl helper``: the second server of secure aggregation."""

from __future__ import annotations

import argparse
import sys

from aggregator.helper.config import HelperConfig
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
Run the helper of a federation's secure aggregation (the leader is `dfl aggregator
--secure-aggregation`). Run it under a different operator than the leader: neither alone
learns a party's update, both together learn everything. For each full buffer the leader
asks for the weighted sum of its updates' masks; the helper checks every party's signature
over its sealed seed against its own key list (--party-keys), opens the seeds with its
X25519 key (--seal-key), and answers each (party, seq) at most once, only for sets of at
least --min-buffer distinct parties. What it answered is saved in --state-dir before each
answer, so a restart never answers a set twice.

example:
  dfl admin add-helper --federation mnist --keys helper-keys/
  dfl helper --broker amqps://... --federation mnist --seal-key helper-keys/helper-seal.key \\
      --party-keys helper-keys/ --state-dir /var/lib/dfl-helper
"""


def build_parser(prog: str = "dfl helper") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=DESCRIPTION, formatter_class=Formatter)
    add_common_options(parser)
    g = parser.add_argument_group("secure aggregation")
    g.add_argument("--seal-key", metavar="FILE",
                   help="the helper's X25519 private key (helper-seal.key); parties seal "
                        "their seeds to its public key helper-seal.pem")
    g.add_argument("--party-keys", metavar="DIR",
                   help="the helper's own copy of every party's <id>.pub (Ed25519), with "
                        "aggregator.pub (requests must be signed by the leader) and "
                        "helper.key (answers are signed with it)")
    g.add_argument("--state-dir", metavar="DIR",
                   help="where the helper records what it answered (default helper-state)")
    g.add_argument("--min-buffer", type=int, metavar="N",
                   help="answer only for sets of at least N distinct parties (default 3)")
    g.add_argument("--max-weight", type=int, metavar="W",
                   help="largest integer weight of one update in a sum (default 16); the "
                        "leader's --secagg-max-weight must not exceed it")
    g.add_argument("--delivery-limit", type=int, metavar="N",
                   help="RabbitMQ dead-letters a request after N+1 deliveries")
    add_daemon_options(parser)
    add_insecure_option(parser)
    bind_settings(parser, HelperConfig)
    return parser


def main(argv: list[str] | None = None, prog: str = "dfl helper") -> int:
    ns = build_parser(prog).parse_args(argv)
    from aggregator.helper.service import Helper

    def run(helper: Helper) -> str:
        stats = helper.run()
        return (f"helper stopped: {stats.answered} sets answered, {stats.replayed} replayed, "
                f"{sum(stats.refused.values())} refused")

    return run_daemon(prog, ns, HelperConfig, Helper, run)


if __name__ == "__main__":
    sys.exit(main())
