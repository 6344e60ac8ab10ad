"""Command-line pieces the daemons share: one-line errors, common options, logging.

Both ``aggregator`` and ``worker`` import ``messages`` (never each other), so the options
they have in common are declared once here.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from messages.topology import QUEUE_TYPES

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error that says how to get help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the hand-made paragraphs of descriptions."""


def fail(prog: str, message: object) -> NoReturn:
    """Exit with a one-line error (a bad setting, a refusal retrying cannot fix)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def add_common_options(parser: argparse.ArgumentParser, default_broker: str) -> None:
    """Options every process of a federation takes."""
    g = parser.add_argument_group("federation")
    g.add_argument("--broker", default=default_broker, metavar="URL",
                   help="message broker: memory:// (in-process) or "
                        "amqp://user:pass@host:5672/vhost (amqps:// for TLS)")
    g.add_argument("--federation", default="mnist", metavar="ID",
                   help="federation id; prefixes every queue, so federations can share a vhost")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder with the MNIST IDX .gz files or mnist.npz (else $DFL_DATA_DIR, "
                        "else Keras's cache or download)")
    g.add_argument("--seed", type=int, default=0, help="seed for model init, partitions, order")
    g.add_argument("--model", default="worker.models:mnist_cnn", metavar="MODULE:FUNC",
                   help="Keras model plug-in: a function returning a compiled model "
                        "(built-ins: worker.models:mnist_cnn, mnist_mlp, tiny_cnn)")
    g.add_argument("--data", default="worker.data:load_mnist", metavar="MODULE:FUNC",
                   help="data plug-in returning x_train, y_train, x_test, y_test "
                        "(built-ins: worker.data:load_mnist, load_synthetic)")
    g.add_argument("--queue-type", choices=QUEUE_TYPES, default="quorum",
                   help="RabbitMQ queue type of the shared queues")
    g.add_argument("--updates-max-length", type=int, default=None, metavar="N",
                   help="bound the updates queue (reject-publish: parties back off and retry); "
                        "every process of a federation must give the same value")
    g.add_argument("--ledger", default=None, metavar="FILE",
                   help="audit trail of (party, seq): confirmed by a worker, applied by the "
                        "aggregator (written at exit)")
    g.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log verbosity")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pika logs every refused or dropped connection with a traceback; the daemons report
    # the same event once, translated, so pika speaks only when debugging.
    logging.getLogger("pika").setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
    # TensorFlow's C++ start-up chatter drowns the federation's own log lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def on_termination(stop: Callable[[str], None]) -> None:
    """Call ``stop(signal name)`` on SIGTERM and SIGINT: Ctrl-C and ``kill`` shut down cleanly."""

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        logging.getLogger("dfl").info("%s: shutting down", name)
        stop(name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
