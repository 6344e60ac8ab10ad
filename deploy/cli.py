"""``dfl``: the front door. ``dfl run`` (one machine), ``dfl aggregator``, ``dfl worker``."""

from __future__ import annotations

import sys
from pathlib import Path

from aggregator import AggregatorConfig
from aggregator import cli as aggregator_cli
from aggregator.helper import cli as helper_cli
from deploy import admin, dead, plot, remote
from messages.daemon.cli import (
    Formatter,
    Parser,
    add_common_options,
    add_insecure_option,
    bind_settings,
    fail,
    flags_for,
    setup_logging,
    warn_if_insecure,
)
from messages.errors import FederationError
from worker import WorkerConfig
from worker import cli as worker_cli

RUN_DESCRIPTION = """\
Train a federation on this machine: an aggregator and --parties parties, each on its own
thread with its own shard, talking through the embedded memory:// broker (or any --broker).
Stops at --target-accuracy or --max-seconds/--max-versions, writes the evaluation log
(JSONL) and saves the final global model (.keras).

example:
  dfl run --parties 2 --data-dir ~/mnist --target-accuracy 0.98 \\
      --eval-log runs/eval.jsonl --save-model runs/global.keras
"""


class RunConfig(AggregatorConfig):
    """The aggregator of ``dfl run``, which signs nothing: over a broker on another machine
    it needs ``--insecure``, or the federation runs as separate daemons with keys."""

    def _missing_keys(self) -> tuple[list[str], str]:
        return ["a signing key"], ("dfl run signs nothing, so run the federation as `dfl "
                                   "aggregator --keys DIR` and `dfl worker --signing-key FILE "
                                   "--aggregator-key FILE` (keys made by `dfl admin`)")


RUN_DEFAULTS = {"target_accuracy": 0.98, "max_seconds": 1800.0, "broker": "memory://",
                "eval_log": "runs/eval.jsonl", "save_model": "runs/global.keras"}


def _run(argv: list[str]) -> int:
    prog = "dfl run"
    parser = Parser(prog=prog, description=RUN_DESCRIPTION, formatter_class=Formatter)
    parser.add_argument("--parties", type=int, default=2, help="number of parties (default: 2)")
    add_common_options(parser)
    aggregator_cli.add_strategy_options(parser)
    worker_cli.add_partition_options(parser)
    worker_cli.add_privacy_options(parser)
    worker_cli.add_compression_options(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (e.g. in CI logs)")
    add_insecure_option(parser)
    bind_settings(parser, AggregatorConfig, WorkerConfig, overrides=RUN_DEFAULTS)
    ns = parser.parse_args(argv)
    setup_logging(ns.log_level, ns.log_format)
    from deploy.launcher import run_federation

    try:
        if ns.parties < 1:
            fail(prog, f"--parties {ns.parties}: must be at least 1")
        agg_flags = {**RUN_DEFAULTS, "min_parties": ns.parties,
                     "start": "min-parties",  # nobody would call start (even with $DFL_START)
                     **flags_for(ns, AggregatorConfig)}
        agg_config = RunConfig.load(agg_flags)
        worker_flags = {k: v for k, v in flags_for(ns, WorkerConfig).items()}
        worker_flags.setdefault("broker", agg_config.broker)
        worker_configs = [WorkerConfig.load({**worker_flags, "party_id": i,
                                             "num_parties": ns.parties})
                          for i in range(ns.parties)]
        warn_if_insecure(agg_config)
        for path in (agg_config.eval_log, agg_config.save_model):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        aggregator = run_federation(agg_config, worker_configs, progress=ns.progress)
    except FederationError as exc:
        fail(prog, exc)
    status = aggregator.status
    last = aggregator.history[-1] if aggregator.history else None
    print(f"{status.finished or 'stopped'}: version {status.version}, {status.updates} updates"
          + (f", test accuracy {last['accuracy']:.4f} after {last['time']:.0f} s" if last else ""))
    if agg_config.eval_log:
        print(f"evaluation log: {agg_config.eval_log}")
    if agg_config.save_model:
        print(f"global model: {agg_config.save_model}")
    return 0


COMMANDS = {
    "run": ("train a whole federation on this machine (embedded broker)", _run),
    "aggregator": ("run the aggregator daemon", lambda a: aggregator_cli.main(a)),
    "worker": ("run one party's daemon", lambda a: worker_cli.main(a)),
    "helper": ("run the helper of secure aggregation (another operator's server)",
               lambda a: helper_cli.main(a)),
    "status": ("show a running federation as a table (or --json)",
               lambda a: remote.status_main(a)),
    "export": ("save a running federation's global model as .keras",
               lambda a: remote.export_main(a)),
    "start": ("start training (an aggregator run with --start manual)",
              lambda a: remote.start_main(a)),
    "plot": ("plot test accuracy against wall time from evaluation logs",
             lambda a: plot.main(a)),
    "admin": ("create broker users, permissions and signing keys of parties",
              lambda a: admin.main(a)),
    "dead": ("list, replay or purge dead-lettered messages (F.dead)",
             lambda a: dead.main(a)),
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        usage = "\n".join(f"  dfl {name:<11} {text}" for name, (text, _) in COMMANDS.items())
        text = (f"usage: dfl {{{','.join(COMMANDS)}}} [options]\n\n"
                "Asynchronous federated learning with Keras over RabbitMQ.\n\n"
                f"commands:\n{usage}\n\n'dfl COMMAND --help' describes each command.\n")
        if args and args[0] not in ("-h", "--help"):
            print(f"dfl: error: unknown command {args[0]!r} (use one of {', '.join(COMMANDS)})",
                  file=sys.stderr)
            return 2
        print(text, end="")
        return 0 if args else 2
    return COMMANDS[args[0]][1](args[1:])


if __name__ == "__main__":
    sys.exit(main())
