"""Per-party broker identities made by ``dfl admin``: every action a party must not take is
refused by RabbitMQ itself, and a federation runs with nothing but those identities."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

import numpy as np
import pytest

from aggregator import Aggregator, AggregatorConfig
from deploy.admin import aggregator_user, party_user
from deploy.remote import status_main
from messages.errors import AccessRefused, FederationError
from messages.transport.connect import connect
from messages.transport.topology import Topology
from messages.wire.codec import encode
from messages.wire.kinds import Model
from tests.processes import ENV, dfl
from worker import Worker, WorkerConfig

pytestmark = pytest.mark.rabbitmq
TINY = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic"}


def management_url(amqp_url: str) -> str:
    """The management API beside the test broker (DFL_TEST_MANAGEMENT_URL overrides)."""
    if os.environ.get("DFL_TEST_MANAGEMENT_URL"):
        return os.environ["DFL_TEST_MANAGEMENT_URL"]
    p = urlparse(amqp_url)
    return f"http://{p.username}:{p.password}@{p.hostname}:15672"


def backend_options(backend: str, amqp_url: str) -> list[str]:
    """``dfl admin`` options for a backend, or skip (fail under CI) if it is not here."""
    problem = None
    if backend == "rabbitmqctl":
        if shutil.which("rabbitmqctl") is None or urlparse(amqp_url).hostname not in (
                "127.0.0.1", "localhost"):
            problem = "rabbitmqctl is not on this host with the test broker"
        options = []
    else:
        url = management_url(amqp_url)
        p = urlparse(url)
        try:
            urllib.request.urlopen(f"{p.scheme}://{p.hostname}:{p.port}/", timeout=5).close()
        except OSError as exc:
            problem = (f"no management API at {p.hostname}:{p.port} ({exc}); "
                       "rabbitmq-plugins enable rabbitmq_management")
        options = ["--management-url", url]
    if problem and os.environ.get("CI"):
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)
    return options


def admin(*args: str) -> str:
    done = subprocess.run([dfl(), "admin", *args], capture_output=True, text=True, timeout=120,
                          env=ENV)
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass
class Identities:
    federation: str
    keys: Path
    amqp_url: str

    def url(self, user: str) -> str:
        password = (self.keys / f"{user}.password").read_text().strip()
        p = urlparse(self.amqp_url)
        return f"amqp://{user}:{quote(password, safe='')}@{p.hostname}:{p.port}{p.path}"

    def party(self, party: str) -> str:
        return self.url(party_user(self.federation, party))

    @property
    def aggregator(self) -> str:
        return self.url(aggregator_user(self.federation))


@pytest.fixture(params=["rabbitmqctl", "http"])
def identities(request: pytest.FixtureRequest, amqp_url: str, tmp_path: Path
               ) -> Iterator[Identities]:
    options = backend_options(request.param, amqp_url)
    federation = f"s{uuid.uuid4().hex[:8]}"
    keys = tmp_path / "keys"
    out = admin("add-aggregator", "--federation", federation, "--keys", str(keys), *options)
    assert (keys / f"{aggregator_user(federation)}.password").read_text().strip() not in out
    for party in ("0", "1"):
        admin("add-party", party, "--federation", federation, "--keys", str(keys), *options)
    yield Identities(federation, keys, amqp_url)
    for party in ("0", "1"):
        admin("remove-party", party, "--federation", federation, *options)
    subprocess.run(["rabbitmqctl", "--quiet", "delete_user", aggregator_user(federation)],
                   capture_output=True, timeout=60)
    with connect(amqp_url) as b:
        t = Topology(federation)
        for q in (t.updates, t.control, t.dead, t.model_queue("1")):
            b.delete_queue(q)


def test_a_party_can_do_its_job_and_nothing_else(identities: Identities) -> None:
    t = Topology(identities.federation)
    with connect(identities.aggregator) as agg:
        t.declare(agg)  # the aggregator identity may configure the federation
        agg.declare_queue(t.model_queue("1"), durable=False)  # party 1's, to be attacked
        agg.bind(t.model_queue("1"), t.models)
    party = identities.party("0")
    model = encode(Model(9, {"w": np.zeros(2, np.float32)}))
    forbidden = {
        "consume the updates queue": lambda b: b.consume(t.updates, lambda d: None),
        "get from the updates queue": lambda b: b.get(t.updates),
        "read the dead-letter queue": lambda b: b.get(t.dead),
        "read another party's model queue": lambda b: b.get(t.model_queue("1")),
        "declare another party's model queue": lambda b: t.declare_model_queue(b, "1"),
        "declare a shared queue": lambda b: t.declare(b),
        "delete the updates queue": lambda b: b.delete_queue(t.updates),
        "bind the updates queue to the model fanout": lambda b: b.bind(t.updates, t.models),
        "publish a model to every party": lambda b: b.publish(t.models, "", model),
        "publish to the default exchange": lambda b: b.publish("", t.updates, b"x"),
        "publish into another party's queue": lambda b: b.publish("", t.model_queue("1"),
                                                                   model),
        "publish to the dead-letter exchange": lambda b: b.publish(t.dead, "", b"x"),
    }
    for what, action in forbidden.items():
        with connect(party) as b:
            with pytest.raises(AccessRefused, match="ACCESS_REFUSED"):
                action(b)
                b.process_events(0.2)
            print(f"refused: {what}")
    with connect(party) as b:  # what a party needs
        assert t.ready(b)
        q = t.declare_model_queue(b, "0")
        b.publish(t.ingress, t.updates, b"an update", mandatory=True)
        with connect(identities.aggregator) as agg:
            agg.publish(t.models, "", model, persistent=False)
            got = agg.get(t.updates)
            assert got is not None and got.body == b"an update"
        deadline = 50
        while b.get(q) is None and deadline:
            b.process_events(0.1)
            deadline -= 1
        assert deadline, "the party did not receive the broadcast"
    with pytest.raises(FederationError, match="login refused"):
        connect(identities.party("0").replace("dfl-", "xdfl-", 1))


def secrets_of(keys: Path) -> list[str]:
    """Every password and key line under ``keys`` (PEM bodies line by line)."""
    found = []
    for p in keys.iterdir():
        if p.suffix in (".password", ".key", ".secret"):
            found += [ln for ln in p.read_text().splitlines() if ln and "-----" not in ln]
    return found


def test_a_signed_federation_runs_on_restricted_identities(
        identities: Identities, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    """... and no password or key shows in its logs, status output or metrics."""
    caplog.set_level(logging.DEBUG)
    keys = identities.keys
    agg = Aggregator(AggregatorConfig(broker=identities.aggregator,
                                      federation=identities.federation, min_parties=2,
                                      max_versions=12, local_steps=20, evaluate=False,
                                      keys_dir=str(keys), metrics_port=0, **TINY)).start()
    workers = [Worker(WorkerConfig(broker=identities.party(str(i)),
                                   federation=identities.federation, party_id=i,
                                   num_parties=2, signing_key=str(keys / f"{i}.key"),
                                   aggregator_key=str(keys / "aggregator.pub"), metrics_port=0,
                                   **TINY)).start()
               for i in range(2)]
    deadline = time.monotonic() + 120
    while len(agg.membership.active) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    outputs = [status_main(["--broker", identities.party("0"), "--federation",
                            identities.federation]) == 0 and capsys.readouterr().out,
               status_main(["--broker", identities.party("0"), "--federation",
                            identities.federation, "--json"]) == 0 and capsys.readouterr().out]
    for port in [agg.metrics.port] + [w.metrics.port for w in workers]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            outputs.append(r.read().decode())
    assert agg.wait(180)
    for w in workers:
        assert w.wait(60)
        assert w.stats.updates_sent > 0 and w.stats.stopped_by.startswith("aggregator")
    assert agg.status.version == 12 and not agg.status.rejected
    assert all(outputs) and "dfl_updates_applied" in "".join(outputs)
    seen = {"logs": caplog.text, "status and metrics": "".join(str(o) for o in outputs),
            "aggregator settings": repr(agg.config) + str(agg.config) + agg.config.effective(),
            "worker settings": repr(workers[0].config) + workers[0].config.effective()}
    leaked = [where for where, text in seen.items() if any(s in text for s in secrets_of(keys))]
    assert not leaked, f"secrets appear in: {leaked}"


def test_the_helper_can_read_requests_and_answer_and_nothing_else(
        identities: Identities) -> None:
    """``dfl admin add-helper``: its keys, and a broker user limited to F.helper and F.sums."""
    from deploy.admin import helper_user
    from messages.secagg.sealing import SEAL_KEY, SEAL_PUBLIC, load_seal_public

    fed, keys = identities.federation, identities.keys
    admin("add-helper", "--federation", fed, "--keys", str(keys))
    for name in ("helper.key", "helper.pub", SEAL_KEY, SEAL_PUBLIC):
        assert (keys / name).exists()
    assert (keys / SEAL_KEY).stat().st_mode & 0o077 == 0
    load_seal_public(keys / SEAL_PUBLIC)
    t = Topology(fed)
    helper = identities.url(helper_user(fed))
    try:
        with connect(identities.aggregator) as agg:
            t.declare(agg)
            t.declare_helper(agg)
            agg.publish("", t.helper_requests, b"a request")
        with connect(helper) as b:  # what the helper needs
            t.declare_helper(b)
            got = b.get(t.helper_requests)
            assert got is not None and got.body == b"a request"
            b.publish("", t.helper_sums, b"an answer")
        forbidden = {
            "read the updates queue": lambda b: b.get(t.updates),
            "read its own answers": lambda b: b.get(t.helper_sums),
            "publish to the parties' model fanout": lambda b: b.publish(t.models, "", b"x"),
            "publish into the updates queue": lambda b: b.publish(t.ingress, t.updates, b"x"),
        }
        for what, action in forbidden.items():
            with connect(helper) as b:
                with pytest.raises(AccessRefused, match="ACCESS_REFUSED"):
                    action(b)
                    b.process_events(0.2)
                print(f"refused: {what}")
    finally:
        subprocess.run(["rabbitmqctl", "--quiet", "delete_user", helper_user(fed)],
                       capture_output=True, timeout=60)
        with connect(identities.amqp_url) as b:
            for q in (t.helper_requests, t.helper_sums):
                b.delete_queue(q)
