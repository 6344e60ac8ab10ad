"""Command-line pieces the daemons share: one-line errors, common options, logging, settings.

Both ``aggregator`` and ``worker`` import ``messages`` (never each other), so the options
they have in common are declared once here. Options that are settings carry no argparse
default: only the flags a user typed reach the settings object, so ``DFL_*`` variables and
the ``--config`` file fill in the rest (see ``messages.daemon.settings``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn, Protocol, TypeVar

from pydantic import BaseModel

from messages.daemon.settings import ENV_PREFIX, DaemonSettings, FederationSettings
from messages.errors import FederationError
from messages.transport.topology import QUEUE_TYPES


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error that says how to get help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


Formatter = argparse.RawDescriptionHelpFormatter


def fail(prog: str, message: object) -> NoReturn:
    """Exit with a one-line error (a bad setting, a refusal retrying cannot fix)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options every process of a federation takes."""
    g = parser.add_argument_group("federation")
    g.add_argument("--broker", metavar="URL",
                   help="message broker: memory:// (in-process) or "
                        "amqp://user:pass@host:5672/vhost (for TLS amqps://... with "
                        "?cacertfile=CA.pem, &certfile= and &keyfile= as needed); several "
                        "amqp URLs separated by commas are the nodes of one RabbitMQ cluster, "
                        "tried in turn (a list in a --config file)")
    g.add_argument("--federation", metavar="ID",
                   help="federation id; prefixes every queue, so federations can share a vhost")
    g.add_argument("--data-dir", metavar="DIR",
                   help="folder with the MNIST IDX .gz files or mnist.npz (else Keras's cache "
                        "or download)")
    g.add_argument("--seed", type=int, help="seed for model init, partitions, data order")
    g.add_argument("--model", metavar="MODULE:FUNC",
                   help="Keras model plug-in: a function returning a compiled model "
                        "(built-ins: worker.models:mnist_cnn, mnist_mlp, tiny_cnn)")
    g.add_argument("--data", metavar="MODULE:FUNC",
                   help="data plug-in returning x_train, y_train, x_test, y_test "
                        "(built-ins: worker.data:load_mnist, load_fashion_mnist, load_synthetic)")
    g.add_argument("--queue-type", choices=QUEUE_TYPES,
                   help="RabbitMQ queue type of the shared queues")
    g.add_argument("--updates-max-length", type=int, metavar="N",
                   help="bound the updates queue (reject-publish: parties back off and retry); "
                        "every process of a federation must give the same value")
    g.add_argument("--max-message-bytes", type=int, metavar="N",
                   help="largest message body accepted (a whole update or model, however "
                        "many chunks it travels in)")
    g.add_argument("--max-chunk-bytes", type=int, metavar="N",
                   help="bodies over N bytes travel in chunks of at most N, reassembled and "
                        "SHA-256-checked by the receiver; keep it under the broker's "
                        "max_message_size (RabbitMQ 4.x: 16 MiB)")
    g.add_argument("--chunk-timeout", type=float, metavar="S",
                   help="discard (dead-letter, never apply) an incomplete chunk set that got "
                        "no chunk for S seconds")
    g.add_argument("--max-pending-chunk-bytes", type=int, metavar="N",
                   help="bytes of incomplete chunk sets held in all; past it the oldest sets "
                        "are dead-lettered (chunk-overflow)")
    g.add_argument("--max-pending-chunks", type=int, metavar="N",
                   help="chunks of incomplete sets held in all (bounds the consumer window)")
    o = parser.add_argument_group("logging")
    o.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="log verbosity")
    o.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="json: one JSON object per line, with party, version and staleness "
                        "fields on update lines")


def add_daemon_options(parser: argparse.ArgumentParser) -> None:
    """Options of a long-running daemon (not of the one-machine ``dfl run``)."""
    g = parser.add_argument_group("operations")
    g.add_argument("--config", metavar="FILE.toml",
                   help=f"TOML file of settings (option names with underscores); flags and "
                        f"{ENV_PREFIX}* environment variables override it")
    g.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics, and health "
                        "checks at /livez (the service loop ticks) and /readyz (connected "
                        "to the broker and consuming)")
    g.add_argument("--liveness-seconds", type=float, metavar="S",
                   help="/livez fails once the service loop has not ticked for S seconds")
    g.add_argument("--ledger", metavar="FILE",
                   help="audit trail of (party, seq) for exactly-once checks")


def add_insecure_option(parser: argparse._ActionsContainer) -> None:
    """``--insecure``: the one way to run without keys over a broker on another machine."""
    parser.add_argument("--insecure", action="store_true",
                        help="accept unsigned messages over a broker that is not on this "
                             "machine (anything but localhost, 127.0.0.0/8, ::1); without it "
                             "such a broker needs the key options (made by `dfl admin`)")


def warn_if_insecure(config: DaemonSettings) -> None:
    """Log one warning line when a process runs ``--insecure`` over a remote broker."""
    warning = config.insecure_warning() if isinstance(config, FederationSettings) else None
    if warning:
        logging.getLogger("dfl").warning("%s", warning)


def bind_settings(parser: argparse.ArgumentParser, *models: type[BaseModel],
                  overrides: dict[str, Any] | None = None) -> None:
    """Show each setting's default in its help, and leave unset flags out of the namespace."""
    shown = dict(overrides or {})
    for action in parser._actions:  # argparse has no public way to walk its options
        field = next((m.model_fields[action.dest] for m in models
                      if action.dest in m.model_fields), None)
        if field is None or not action.option_strings:
            continue
        default = shown.get(action.dest, field.default)
        env = f"{ENV_PREFIX}{action.dest.upper()}"
        shown_default = str(default).replace("%", "%%")  # help strings are %-formatted
        action.help = f"{action.help or ''} (default: {shown_default}; env {env})"
        action.default = argparse.SUPPRESS


def flags_for(ns: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The options the user typed that belong to ``model``."""
    return {k: v for k, v in vars(ns).items() if k in model.model_fields}


class Daemon(Protocol):
    def stop(self, reason: str = ...) -> None: ...


D = TypeVar("D", bound=Daemon)


def run_daemon(prog: str, ns: argparse.Namespace, config_cls: type[DaemonSettings],
               make: Callable[[Any], D], run: Callable[[D], str]) -> int:
    """Load settings, log them, run the daemon until done; one-line errors, exit 2."""
    setup_logging(ns.log_level, ns.log_format)
    try:
        config = config_cls.load(flags_for(ns, config_cls), ns.config)
        logging.getLogger("dfl").info("settings in force:\n%s", config.effective())
        warn_if_insecure(config)
        daemon = make(config)
        on_termination(daemon.stop)
        summary = run(daemon)
    except FederationError as exc:
        fail(prog, exc)
    print(summary)
    return 0


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
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
