"""``dfl status``, ``dfl export`` and ``dfl start``: ask a running aggregator over the broker.

All are RPCs on the federation's control queue, so they work from any host that reaches
RabbitMQ; nothing connects to the aggregator's machine directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

from messages.daemon.cli import Formatter, Parser, fail
from messages.daemon.settings import DEFAULT_AMQP_URL, ENV_PREFIX
from messages.errors import FederationError, PublishRejected
from messages.transport.broker import mask_url
from messages.transport.chunked import ChunkedBroker
from messages.transport.connect import connect
from messages.transport.topology import Topology
from messages.wire.codec import decode, encode
from messages.wire.kinds import Message, Model, Query, Report
from messages.wire.signing import Signer, load_signer

STATUS_DESCRIPTION = """\
Show a running federation: model version, updates/s, every party (state, last seen,
updates applied, mean staleness, last local accuracy, lag) and dead-lettered messages by
reason. Asks the aggregator over the broker, so it works from any host.

example:
  dfl status --broker amqp://guest:guest@rabbit:5672/%2F --federation mnist
  dfl status --json | jq .parties
"""

EXPORT_DESCRIPTION = """\
Save the current global model of a running federation as a .keras file: the weights come
from the aggregator over the broker and go into the model plug-in's architecture.

example:
  dfl export --broker amqp://guest:guest@rabbit:5672/%2F --federation mnist -o now.keras
"""

START_DESCRIPTION = """\
Start training: the aggregator of a federation run with --start manual releases model
version 0 to the parties that joined so far (with --start min-parties, before
--min-parties joined). Asks the aggregator over the broker, so it works from any host.
When the aggregator runs with --keys, the request must be signed with a key from its key
directory (--signing-key), e.g. an operator key: `dfl admin add-party operator --keys DIR`.

example:
  dfl start --broker amqp://guest:guest@rabbit:5672/%2F --federation mnist
"""


def _parser(prog: str, description: str) -> Parser:

    parser = Parser(prog=prog, description=description, formatter_class=Formatter)
    add_target_options(parser)
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the aggregator's answer (default: 10)")
    return parser


def ask(broker_url: str, federation: str, what: str, timeout: float,
        signer: Signer | None = None) -> Message:
    """Send a query to the federation's aggregator (signed by ``signer``, if given) and
    return its answer."""
    topology = Topology(federation)
    body = encode(Query(what))
    with ChunkedBroker(connect(broker_url)) as broker:  # a big model is answered in chunks
        try:
            reply = broker.call(topology.control, body, timeout=timeout,
                                 headers=signer.headers(body) if signer else None,
                                 exchange=topology.ingress)
        except PublishRejected:
            raise FederationError(f"no federation {federation!r} on {mask_url(broker_url)} "
                                  "(its control queue does not exist)") from None
    answer = decode(reply.body)
    if isinstance(answer, Report) and "error" in answer.data:
        raise FederationError(str(answer.data["error"]))
    return answer


def status_table(data: dict[str, Any]) -> str:
    head = (f"federation {data['federation']} ({data['strategy']}): version {data['version']}, "
            f"{data['updates']} updates, {data['updates_per_second']} updates/s, "
            f"{data['active_parties']} active parties, accuracy "
            f"{'none yet' if data['accuracy'] is None else format(data['accuracy'], '.4f')}")
    rows = [[p["party"], p["state"], f"{p['last_seen_seconds']} s ago", p["updates"],
             p["mean_staleness"], p["local_accuracy"], p["lag"]] for p in data["parties"]]
    headers = ["party", "state", "last seen", "updates", "mean staleness", "local accuracy",
               "lag"]
    if any(p.get("epsilon") is not None for p in data["parties"]):  # parties with --dp-noise
        headers.append("epsilon")
        for row, p in zip(rows, data["parties"], strict=True):
            row.append(p.get("epsilon"))
    table = tabulate(rows, headers=headers)
    dead = ", ".join(f"{k}: {v}" for k, v in data["dead_lettered"].items()) or "none"
    in_dead = data.get("dead_queue")
    queue = "" if in_dead is None else (
        f"\nF.dead holds {in_dead} messages (with reason records and those the broker "
        "dead-lettered at the delivery limit): dfl dead list")
    secure = data.get("secure_aggregation")
    helper = "" if secure is None else (
        f"\nsecure aggregation: {secure['buffered']} updates buffered, "
        + (f"waiting for the helper: {secure['waiting_requests']} requests, the oldest for "
           f"{secure['waiting_seconds']} s" if secure["waiting_requests"]
           else "no request waiting for the helper")
        + (f"; {secure['refused_updates']} updates dropped (the helper refused their set)"
           if secure["refused_updates"] else ""))
    return (f"{head}\n\n{table}\n\ndead-lettered: {dead}; duplicates dropped: "
            f"{data['duplicates']}{queue}{helper}")


def status_main(argv: list[str] | None = None) -> int:
    prog = "dfl status"
    parser = _parser(prog, STATUS_DESCRIPTION)
    parser.add_argument("--json", action="store_true", help="print the raw report as JSON")
    ns = parser.parse_args(argv)
    try:
        answer = ask(ns.broker, ns.federation, "status", ns.timeout)
    except FederationError as exc:
        fail(prog, exc)
    assert isinstance(answer, Report)
    print(json.dumps(answer.data, indent=2) if ns.json else status_table(answer.data))
    return 0


def export_main(argv: list[str] | None = None) -> int:
    prog = "dfl export"
    parser = _parser(prog, EXPORT_DESCRIPTION)
    parser.add_argument("-o", "--output", required=True, metavar="FILE.keras",
                        help="where to save the model")
    parser.add_argument("--model", default="worker.models:mnist_cnn", metavar="MODULE:FUNC",
                        help="the federation's model plug-in (default: worker.models:mnist_cnn)")
    ns = parser.parse_args(argv)
    try:
        answer = ask(ns.broker, ns.federation, "model", ns.timeout)
        assert isinstance(answer, Model)
        from messages.daemon.plugins import build_model

        model = build_model(ns.model, 0)
        names = [w.path for w in model.weights]
        if names != list(answer.tensors):
            raise FederationError("the federation's tensors do not match --model's weights; "
                                  "give the model plug-in the federation uses")
        model.set_weights(list(answer.tensors.values()))
        model.save(ns.output)
    except FederationError as exc:
        fail(prog, exc)
    print(f"saved global model version {answer.version} to {ns.output}")
    return 0


def start_main(argv: list[str] | None = None) -> int:
    """Exit 0 with one line when training started; 1 with the aggregator's refusal."""
    prog = "dfl start"
    parser = _parser(prog, START_DESCRIPTION)
    parser.add_argument("--signing-key", metavar="FILE",
                        help="sign the request with this key (ID.key or ID.secret from `dfl "
                             "admin`; the signer is ID): needed when the aggregator has --keys")
    ns = parser.parse_args(argv)
    try:
        signer = (load_signer(ns.signing_key, Path(ns.signing_key).stem)
                  if ns.signing_key else None)
        answer = ask(ns.broker, ns.federation, "start", ns.timeout, signer)
    except FederationError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    assert isinstance(answer, Report)
    print(f"started federation {ns.federation} at version {answer.data['version']} "
          f"with {answer.data['parties']} parties")
    return 0


if __name__ == "__main__":
    sys.exit(status_main())


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """``--broker`` and ``--federation`` of an operator command (defaults from ``DFL_*``)."""
    import os

    parser.add_argument("--broker", default=os.environ.get(f"{ENV_PREFIX}BROKER",
                                                           DEFAULT_AMQP_URL), metavar="URL",
                        help=f"the federation's broker (default: ${ENV_PREFIX}BROKER or the "
                             "local RabbitMQ)")
    parser.add_argument("--federation", default=os.environ.get(f"{ENV_PREFIX}FEDERATION",
                                                               "mnist"), metavar="ID",
                        help="federation id (default: mnist)")
