"""Scale: many synthetic parties against one aggregator over RabbitMQ.

For each ``--parties`` count (and each ``--listeners`` mode) a fresh federation runs:

- the aggregator as its own process, as deployed: ``python -m aggregator --strategy fedbuff
  --buffer-k K --no-eval --min-parties 1 --checkpoint-dir DIR --ledger FILE`` (quorum
  ``F.updates``, checkpoints every 16 messages, default prefetch, staleness limit and lease);
- ``--processes`` party processes (default: one per 50 parties, at least 2), each running
  its share of the parties, one thread and one broker connection per party (see ``Group``).
  A synthetic party is a plain protocol client, not the ``Worker`` (no TensorFlow): the
  join RPC with the model's tensors (the built-in CNN's
  names and shapes, 1,199,882 float32 parameters, without building it), heartbeats at the
  Worker's default period, then ``Update`` messages of seeded random float32 deltas (small
  magnitude, distinct windows of one random buffer, so making them costs nothing) through
  the ingress exchange, persistent with publisher confirms, at seeded Poisson times. The
  offered load is ``--rate`` updates/s in total, split evenly, the same for every party
  count: the comparison is about the number of parties, not the load. At the end every party
  sends a leave.
- listening: with ``--listeners all`` every party binds its own model queue on the fanout
  as a Worker does (exclusive, max-length 1, drop-head) and takes what the aggregator sends
  there as a Worker does (``aggregator.distribution``): while at most
  ``--push-max-parties`` parties are active the models themselves (every version of a 4.8
  MB model to every party: 200 parties at 2 versions/s would be about 1.9 GB/s leaving the
  broker), above that only their versions, and then a party that is about to send (start a
  round) and sees a newer version announced fetches the model by RPC first. Either way it
  uses the newest version it holds as the base of its next update. ``models/round`` is the
  model bytes the listening parties took in (pushed or fetched) per update they sent, in
  models.
  With ``--listeners N`` only N parties (spread over the processes) bind a model queue; the
  others take their base version from the newest model their process has seen (the base a
  listening party would use). That takes the fanout out and leaves the aggregator's own
  per-party costs (joins, heartbeats, membership, per-party state).

What is measured, over the ``--seconds`` publishing window (joins are not in it):
offered/s (confirmed publishes per second), applied/s (the aggregator's applied-update count
through status queries), latency from publish (``sent_at``) to the first arrival, at any
listening party, of a model version that includes the update (FedBuff includes the i-th
applied update of the ledger in version ``1 + i // K``: the ledger order is the apply
order and only full buffers make versions, which the run checks against the final version),
the aggregator's RSS (sampled every 0.5 s: max and final) and CPU, the broker's and the
parties' CPU, and a ledger balance: once the publishers stop and the aggregator has
accounted for every confirmed update (or ``--drain-timeout`` passed), the aggregator is
stopped with SIGTERM (so it writes its ledger), and its ledger (applied) plus the
dead-letter queue and whatever is still in ``F.updates`` (both read back, so by
``(party, seq)``) must equal the publishers' confirmed ``(party, seq)`` set. An overloaded
aggregator that answers no status query is reported, not an error: applied/s then comes
from the newest version the listeners had at the window's end.

    python -m benchmarks.scale [--parties 50 200] [--seconds 60] [--rate 20]
                               [--listeners all 4] [--push-max-parties N] [--broker URL]
                               [--management-url URL] [--out DIR]

The broker's memory (``mem_used`` of its nodes) comes from the management API every second.
Joins are set-up, not measured: the aggregator runs with ``--join-rate`` and
``--max-parties`` at least the party count, and only each process's first party brings the
model in its join (as the federation needs one model; the Worker always sends its own).

Everything runs on one machine: the broker, the aggregator and the parties share its cores,
so what the parties cost (above all, reading every broadcast) is taken from the aggregator.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
from tabulate import tabulate

from messages.errors import FederationError, InvalidMessage, RpcTimeout
from messages.transport.broker import Broker, Delivery
from messages.transport.connect import connect
from messages.transport.topology import QUEUE_TYPES, Topology
from messages.types import Tensors, TensorSpec
from messages.wire.codec import decode, encode
from messages.wire.deadletters import read_dead
from messages.wire.kinds import Heartbeat, Join, Leave, Model, Query, Report, Update, Welcome

CNN_SPEC: TensorSpec = (
    ("mnist_cnn/conv1/kernel", "float32", (3, 3, 1, 32)),
    ("mnist_cnn/conv1/bias", "float32", (32,)),
    ("mnist_cnn/conv2/kernel", "float32", (3, 3, 32, 64)),
    ("mnist_cnn/conv2/bias", "float32", (64,)),
    ("mnist_cnn/dense1/kernel", "float32", (9216, 128)),
    ("mnist_cnn/dense1/bias", "float32", (128,)),
    ("mnist_cnn/output/kernel", "float32", (128, 10)),
    ("mnist_cnn/output/bias", "float32", (10,)),
)
"""``worker.models:mnist_cnn``'s tensors (names as the Worker sends them: ``w.path``), so the
synthetic parties need no TensorFlow. ``--model`` rebuilds such a spec from a plug-in."""

DELTA_SCALE = 1e-3
"""Synthetic deltas are N(0, 1e-3): small like a real step, far inside the range check."""
WINDOW_SLACK = 1 << 16
"""Each delta is a window of one random buffer at a random offset below this."""
NUM_SAMPLES = 600
HEARTBEAT_SECONDS = 5.0
"""The Worker's default ``--heartbeat-seconds``: each party sends one this often."""


def spec_from_plugin(plugin: str) -> TensorSpec:
    """The tensors of a Keras model plug-in, built once in a throwaway subprocess so that
    TensorFlow never enters the benchmark's processes (it would take 540 MiB and seconds)."""
    code = ("import json, sys\nfrom messages.daemon.plugins import build_model\n"
            "m = build_model(sys.argv[1], 0)\n"
            "print(json.dumps([[w.path, str(w.dtype), list(w.shape)] for w in m.weights]))")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code, plugin], check=True, text=True,
                         capture_output=True, env=env).stdout.strip().splitlines()[-1]
    return tuple((str(n), str(d), tuple(int(x) for x in s)) for n, d, s in json.loads(out))


def spec_size(spec: TensorSpec) -> int:
    return sum(math.prod(shape) for _n, _d, shape in spec)


# -- the party processes ---------------------------------------------------------------------
@dataclass(frozen=True)
class GroupPlan:
    """What one party process runs (picklable: it crosses to a spawned process)."""

    index: int
    url: str
    federation: str
    queue_type: str
    parties: tuple[str, ...]
    listening: tuple[bool, ...]
    rate: float  # updates/s of each party
    seed: int
    spec: TensorSpec
    out: str


class Group:
    """A party process: one thread per party, each with its own connection, as if each
    party were its own host. A thread per party (not one loop over all connections) because
    a pika connection only reads while its own ``process_events`` runs, about 100 KB a
    call: a loop that polls many connections in turn reads a 4.8 MB model far too slowly,
    and the broker then throttles the aggregator's broadcast to match."""

    def __init__(self, plan: GroupPlan, go: threading.Event, stop_publishing: EventType,
                 stop_all: EventType) -> None:
        self.plan = plan
        self.topology = Topology(plan.federation, plan.queue_type)
        self.pool = (np.random.default_rng([plan.seed, 1_000_000 + plan.index])
                     .standard_normal(spec_size(plan.spec) + WINDOW_SLACK, dtype=np.float32))
        self.pool *= DELTA_SCALE
        self.go, self.stop_publishing, self.stop_all = go, stop_publishing, stop_all
        self.lock = threading.Lock()
        self.latest = -1  # the newest version any party of this process has seen
        self.joined = threading.Semaphore(0)
        self.model_joined = threading.Event()  # this process's first party, with the model
        self.published = threading.Semaphore(0)
        self.confirmed: list[tuple[str, int, float, float, float]] = []
        self.arrivals: list[tuple[str, int, float]] = []
        self.models_received = 0
        self.model_bytes = 0  # bytes of models taken in: pushed ones and fetched ones
        self.fetches = 0
        self.fetch_seconds: list[float] = []
        self.bad_models = 0
        self.heartbeats = 0
        self.overdue = 0
        self.errors: list[str] = []

    def tensors(self, rng: np.random.Generator) -> Tensors:
        """A fresh random delta: views of one window of the pool (no copy, no generation)."""
        offset = int(rng.integers(0, WINDOW_SLACK))
        out: Tensors = {}
        for name, _dtype, shape in self.plan.spec:
            size = math.prod(shape)
            out[name] = self.pool[offset:offset + size].reshape(shape)
            offset += size
        return out

    def party(self, index: int) -> None:
        """One party's thread; a failure is recorded, and still releases the semaphores
        the process waits on, so that it reports instead of hanging."""
        done = {"joined": False, "published": False}
        try:
            self._party(index, done)
        except BaseException as exc:
            with self.lock:
                self.errors.append(f"{self.plan.parties[index]}: {type(exc).__name__}: {exc}")
        finally:
            self.model_joined.set()  # a failed first party must not leave the others waiting
            if not done["joined"]:
                self.joined.release()
            if not done["published"]:
                self.published.release()

    def _connect(self) -> Broker:
        """A connection, retried as the Worker's supervisor does: a broker taking a thousand
        connections at once resets some of them during the handshake."""
        for attempt in range(20):
            try:
                return connect(self.plan.url)
            except FederationError:
                if attempt == 19:
                    raise
                time.sleep(min(5.0, 0.5 * 2 ** attempt))
        raise AssertionError("unreachable")

    def _party(self, index: int, done: dict[str, bool]) -> None:
        name, listening = self.plan.parties[index], self.plan.listening[index]
        topo = self.topology
        rng = np.random.default_rng([self.plan.seed, self.plan.index, index])
        version = announced = -1  # the model this party holds; the newest version announced

        def on_model(d: Delivery) -> None:
            nonlocal version, announced
            arrived = time.time()
            try:
                msg = decode(d.body)
            except InvalidMessage:
                with self.lock:
                    self.bad_models += 1
                return
            with self.lock:
                if not isinstance(msg, Model):
                    return
                if msg.version > max(version, announced):  # the broadcast of a new version
                    self.latest = max(self.latest, msg.version)
                    self.arrivals.append((name, msg.version, arrived))
                if not msg.tensors:  # announced: fetched when this party starts a round
                    announced = max(announced, msg.version)
                    return
                self.models_received += 1
                self.model_bytes += len(d.body)
                version = max(version, msg.version)

        def fetch(b: Broker) -> None:
            """As the Worker does when it starts a round and a newer version was announced:
            ask the aggregator for the model, and train (here: base the update) on it."""
            nonlocal version
            began = time.monotonic()
            reply = b.call(topo.control, encode(Query("model")), timeout=120,
                           exchange=topo.ingress)
            msg = decode(reply.body)
            if not isinstance(msg, Model) or not msg.tensors:
                raise RuntimeError(f"asked for the model, got {msg}")
            with self.lock:
                self.fetches += 1
                self.fetch_seconds.append(time.monotonic() - began)
                self.models_received += 1
                self.model_bytes += len(reply.body)
                version = max(version, msg.version)

        def base() -> int:
            return version if listening else self.latest

        if index > 0:  # after the party that brings the model (a federation needs one first)
            self.model_joined.wait()
        with self._connect() as b:
            # the join, as the Worker does it: model queue first, then the RPC
            if listening:
                b.consume(topo.declare_model_queue(b, name), on_model, auto_ack=True)
            # the first party of each process brings the model, as every Worker does; the
            # others send none (allowed once the federation has one), which spares the
            # aggregator decoding hundreds of identical 4.8 MB joins that measure nothing
            body = encode(Join(name, NUM_SAMPLES, self.tensors(rng) if index == 0 else {},
                               software="benchmarks.scale"))
            reply = decode(b.call(topo.control, body, timeout=300, exchange=topo.ingress).body)
            if not (isinstance(reply, Welcome) and reply.accepted):
                raise RuntimeError(f"not welcomed: {reply}")
            self.model_joined.set()
            seq = reply.next_seq
            with self.lock:
                if reply.tensors:
                    self.models_received += 1
                    version = max(version, reply.version)
                else:  # welcomed without the model (announcing): fetched before the first send
                    announced = max(announced, reply.version)
                self.latest = max(self.latest, reply.version)
            self.joined.release()
            done["joined"] = True
            beat = time.monotonic() + HEARTBEAT_SECONDS * (index + 0.5) / len(self.plan.parties)
            while not self.go.is_set():  # the other parties still join: keep the lease
                if time.monotonic() >= beat:
                    b.publish(topo.ingress, topo.control, encode(Heartbeat(name, base())),
                              persistent=False)
                    beat += HEARTBEAT_SECONDS
                b.process_events(0.1)
            started = time.monotonic()
            due = started + rng.exponential(1 / self.plan.rate)
            while not self.stop_publishing.is_set():
                now = time.monotonic()
                if due <= now:
                    if listening and announced > version:
                        fetch(b)
                    tensors = self.tensors(rng)
                    sent = time.time()
                    update = encode(Update(name, seq, max(base(), 0), NUM_SAMPLES, tensors,
                                           sent_at=sent))
                    # persistent, confirmed, mandatory: the Worker's publish of an update
                    b.publish(topo.ingress, topo.updates, update, mandatory=True)
                    with self.lock:
                        self.confirmed.append((name, seq, sent, time.time(), now - due))
                    seq += 1
                    due += rng.exponential(1 / self.plan.rate)  # open loop: from the due time
                elif beat <= now:
                    b.publish(topo.ingress, topo.control, encode(Heartbeat(name, base())),
                              persistent=False)
                    with self.lock:
                        self.heartbeats += 1
                    beat += HEARTBEAT_SECONDS
                else:
                    b.process_events(min(due, beat, now + 0.2) - now)
            stopped = time.monotonic()
            with self.lock:
                if due < stopped - 1.0:  # behind schedule by more than a second
                    self.overdue += 1
            self.published.release()
            done["published"] = True
            while not self.stop_all.is_set():  # the last versions are still to come
                b.process_events(0.1)
            b.publish(topo.ingress, topo.control, encode(Leave(name, "benchmark over")),
                      persistent=False)


def _group_main(plan: GroupPlan, events: Any, go: EventType, stop_publishing: EventType,
                stop_all: EventType) -> None:
    """A party process: every failure ends up in its result file, never as a hang."""
    result: dict[str, Any]
    try:
        result = _run_group(plan, events, go, stop_publishing, stop_all)
    except BaseException as exc:  # report, do not hang the orchestrator
        result = {"error": f"{type(exc).__name__}: {exc}"}
        events.put(("error", plan.index, result["error"]))
    Path(plan.out).write_text(json.dumps(result))


def _run_group(plan: GroupPlan, events: Any, go: EventType, stop_publishing: EventType,
               stop_all: EventType) -> dict[str, Any]:
    started = threading.Event()
    group = Group(plan, started, stop_publishing, stop_all)
    threads = [threading.Thread(target=group.party, args=(i,), name=name, daemon=True)
               for i, name in enumerate(plan.parties)]
    for t in threads:
        t.start()
    for _ in threads:
        group.joined.acquire()
    if group.errors:
        raise RuntimeError(group.errors[0])
    events.put(("joined", plan.index, len(threads)))
    go.wait()
    cpu0 = time.process_time()
    started.set()
    for _ in threads:
        group.published.acquire()
    cpu = time.process_time() - cpu0
    if group.errors:
        raise RuntimeError(group.errors[0])
    events.put(("published", plan.index, len(group.confirmed)))
    stop_all.wait()
    for t in threads:
        t.join(30)
    listening = {name for name, on in zip(plan.parties, plan.listening, strict=True) if on}
    if group.errors:
        raise RuntimeError(group.errors[0])
    return {"confirmed": group.confirmed, "arrivals": group.arrivals,
            "overdue": group.overdue, "cpu_seconds": cpu,
            "models_received": group.models_received, "bad_models": group.bad_models,
            "model_bytes": group.model_bytes, "fetches": group.fetches,
            "listening_updates": sum(1 for c in group.confirmed if c[0] in listening),
            "fetch_seconds": group.fetch_seconds,
            "heartbeats": group.heartbeats}


# -- the aggregator process ------------------------------------------------------------------
class ProcessProbe:
    """RSS and CPU seconds of another process: psutil when installed, else ``/proc``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            import psutil  # type: ignore[import-untyped]

            self._ps: Any = psutil.Process(pid)
        except ImportError:
            self._ps = None

    def rss(self) -> int:
        if self._ps is not None:
            return int(self._ps.memory_info().rss)
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def cpu_seconds(self) -> float:
        if self._ps is not None:
            t = self._ps.cpu_times()
            return float(t.user + t.system)
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int | None:
    """The local RabbitMQ server (Erlang's ``beam.smp``), for its CPU time; None if the
    broker runs elsewhere."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "beam.smp":
                return int(entry.name)
        except OSError:
            continue
    return None


class RssSampler(threading.Thread):
    """Samples the aggregator's RSS every ``interval`` s until stopped."""

    def __init__(self, probe: ProcessProbe, interval: float = 0.5) -> None:
        super().__init__(daemon=True, name="rss")
        self.probe, self.interval = probe, interval
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.samples.append((time.monotonic(), self.probe.rss()))
            except Exception:  # the process is gone
                return
            self.halt.wait(self.interval)


class BrokerMemory(threading.Thread):
    """Samples the broker's memory (``mem_used`` of every node, from the management API's
    ``/api/nodes``) every ``interval`` s until stopped; no samples without the API."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="broker-memory")
        parts = urlsplit(url)
        self.url = urlunsplit((parts.scheme, f"{parts.hostname}:{parts.port or 15672}",
                               "/api/nodes", "", ""))
        token = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}"
        self.auth = "Basic " + base64.b64encode(token.encode()).decode()
        self.interval = interval
        self.samples: list[int] = []
        self.halt = threading.Event()

    def nodes(self) -> list[dict[str, Any]] | None:
        request = urllib.request.Request(self.url, headers={"authorization": self.auth})
        try:
            with urllib.request.urlopen(request, timeout=5) as page:
                return list(json.load(page))
        except (OSError, ValueError):
            return None

    def sample(self) -> int | None:
        nodes = self.nodes()
        return None if nodes is None else sum(int(n.get("mem_used", 0)) for n in nodes)

    def check_file_descriptors(self, parties: int) -> None:
        """Each party is a connection, a file descriptor of the broker: refuse, in one line,
        a run the broker cannot hold (out of descriptors RabbitMQ 3.10 lost its memory
        monitor here, and could not declare queues, until restarted)."""
        nodes = self.nodes()
        have = min((int(n.get("fd_total") or 0) for n in nodes), default=0) if nodes else 0
        if nodes and have < parties + 200:
            raise SystemExit(f"the broker may open {have} files, too few for {parties} "
                             f"parties' connections: restart it with `ulimit -n "
                             f"{max(4096, 2 * parties)}` in force (benchmarks/README.md)")

    def run(self) -> None:
        while not self.halt.is_set():
            if (used := self.sample()) is not None:
                self.samples.append(used)
            self.halt.wait(self.interval)


def status_of(broker: Broker, topology: Topology, timeout: float) -> dict[str, Any] | None:
    """The aggregator's status report (the ``dfl status`` RPC); None when it does not answer
    in time (an overloaded aggregator is a result here, not an error)."""
    try:
        answer = broker.call(topology.control, encode(Query("status")), timeout=timeout,
                             exchange=topology.ingress)
    except RpcTimeout:
        return None
    reply = decode(answer.body)
    if not isinstance(reply, Report):
        raise RuntimeError(f"status query answered with {reply.KIND}")
    return reply.data


def accounted(status: dict[str, Any]) -> int:
    return int(status["updates"] + status["duplicates"] + status["discarded"]
               + sum(status["dead_lettered"].values()))


def split(items: list[Any], n: int) -> list[list[Any]]:
    """``items`` in ``n`` contiguous, nearly equal parts."""
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


def run_scale(args: argparse.Namespace, parties: int, listeners: int | None,
              spec: TensorSpec, workdir: Path) -> dict[str, Any]:
    """One federation: ``parties`` synthetic parties, ``listeners`` of them (None: all)
    binding model queues; returns the figures of one table row."""
    federation = f"scale{uuid.uuid4().hex[:8]}"
    topology = Topology(federation, args.queue_type)
    processes = args.processes or max(2, math.ceil(parties / 50))
    if listeners is not None and not processes <= listeners <= parties:
        raise SystemExit(f"--listeners {listeners}: give at least one per party process "
                         f"({processes}) and at most --parties")
    run_dir = workdir / f"{parties}p-{'all' if listeners is None else listeners}"
    run_dir.mkdir(parents=True)
    ledger_path = run_dir / "aggregator-ledger.json"
    agg_log = (run_dir / "aggregator.log").open("w")
    agg = subprocess.Popen(
        [sys.executable, "-m", "aggregator", "--broker", args.broker,
         "--federation", federation, "--strategy", "fedbuff", "--buffer-k", str(args.buffer_k),
         "--no-eval", "--min-parties", "1", "--queue-type", args.queue_type,
         "--checkpoint-dir", str(run_dir / "checkpoints"), "--ledger", str(ledger_path),
         # joins are this benchmark's set-up, not what it measures: no admission limit
         "--join-rate", str(max(20, parties)), "--max-parties", str(max(1000, parties)),
         *(["--push-max-parties", str(args.push_max_parties)]
           if args.push_max_parties is not None else [])],
        stdout=agg_log, stderr=subprocess.STDOUT)
    probe = ProcessProbe(agg.pid)
    sampler = RssSampler(probe)
    sampler.start()
    broker_memory = BrokerMemory(args.management_url)
    broker_memory.check_file_descriptors(parties)
    broker_memory.start()
    ctx = mp.get_context("spawn")
    events: Any = ctx.Queue()
    go, stop_publishing, stop_all = ctx.Event(), ctx.Event(), ctx.Event()
    procs: list[Any] = []
    names = [f"s{i:03d}" for i in range(parties)]
    listening = [listeners is None] * parties
    groups = split(list(range(parties)), processes)
    if listeners is not None:  # spread: the first few parties of every process listen
        for g, want in zip(groups, [len(x) for x in split(list(range(listeners)), processes)],
                           strict=True):
            for i in g[:want]:
                listening[i] = True
    depth_max = 0
    try:
        with connect(args.broker) as broker:
            deadline = time.monotonic() + 60
            while not topology.ready(broker):
                if agg.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the aggregator did not come up; see {agg_log.name}")
                time.sleep(0.2)
            for gi, g in enumerate(groups):
                plan = GroupPlan(gi, args.broker, federation, args.queue_type,
                                 tuple(names[i] for i in g), tuple(listening[i] for i in g),
                                 args.rate / parties, args.seed, spec,
                                 str(run_dir / f"group{gi}.json"))
                p = ctx.Process(target=_group_main, name=f"parties-{gi}",
                                args=(plan, events, go, stop_publishing, stop_all))
                p.start()
                procs.append(p)
            join_began = time.monotonic()
            _await(events, "joined", processes, 60 + parties, broker)
            join_seconds = time.monotonic() - join_began
            rss_joined = probe.rss()
            cpu0 = probe.cpu_seconds()
            beam = broker_pid()
            beam_probe = ProcessProbe(beam) if beam is not None else None
            beam0 = beam_probe.cpu_seconds() if beam_probe is not None else 0.0
            start = time.monotonic()
            go.set()
            last: tuple[float, int] = (start, 0)  # (when, applied): a fresh federation
            while (left := start + args.seconds - time.monotonic()) > 0:
                time.sleep(min(1.0, left))
                left = start + args.seconds - time.monotonic()
                if left > 0.5:
                    status = status_of(broker, topology, min(5.0, left))
                    if status is not None:
                        last = (time.monotonic(), int(status["updates"]))
                    depth_max = max(depth_max, broker.queue_depth(topology.updates))
            stop_publishing.set()
            end, end_wall = time.monotonic(), time.time()
            cpu_window = probe.cpu_seconds() - cpu0
            broker_cpu = (beam_probe.cpu_seconds() - beam0 if beam_probe is not None
                          else math.nan)
            rss_window_end = probe.rss()
            status = status_of(broker, topology, 10.0)
            if status is not None:
                last = (time.monotonic(), int(status["updates"]))
            confirmed_total = sum(n for _kind, _i, n in
                                  _await(events, "published", processes, 120, broker))
            drained = False
            drain_deadline = time.monotonic() + args.drain_timeout
            while not drained and time.monotonic() < drain_deadline:
                status = status_of(broker, topology, 5.0)
                depth_max = max(depth_max, broker.queue_depth(topology.updates))
                drained = status is not None and accounted(status) >= confirmed_total
                if not drained:
                    time.sleep(0.5)
            drain_seconds = time.monotonic() - end
            time.sleep(2.0)  # the last version's broadcast reaches the listeners
            stop_all.set()
            for p in procs:
                p.join(120)
            rss_final = probe.rss()
            agg.terminate()  # SIGTERM: it finishes, checkpoints and writes its ledger
            try:
                agg.wait(120)
            except subprocess.TimeoutExpired:
                agg.kill()
            sampler.halt.set()
            sampler.join()
            broker_memory.halt.set()
            broker_memory.join()
            # what the aggregator did not get to (after the drain timeout) is still queued
            queued = _read_queue(broker, topology.updates)
            dead = _read_queue(broker, topology.dead)
    finally:
        stop_all.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        if agg.poll() is None:
            agg.kill()
        agg_log.close()
        try:  # durable queues outlive the run, even a failed one: remove them
            with connect(args.broker) as broker:
                for q in (topology.updates, topology.control, topology.dead):
                    broker.delete_queue(q)
        except FederationError as exc:
            print(f"could not delete federation {federation}'s queues: {exc}", file=sys.stderr)
    results = [json.loads((run_dir / f"group{gi}.json").read_text())
               for gi in range(processes)]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"party process failed: {errors[0]}")
    ledger: dict[str, Any] = {"applied": [], "duplicates": 0, "discarded": 0, "version": 0,
                              "lost": True}  # killed before it wrote one
    if ledger_path.exists():
        ledger = json.loads(ledger_path.read_text())
    return summarize(args, parties, listeners, processes, results, ledger, dead, queued,
                     last, start, end, end_wall, confirmed_total, drained, drain_seconds,
                     join_seconds, depth_max, cpu_window, broker_cpu, rss_joined,
                     rss_window_end, rss_final, sampler.samples, broker_memory.samples,
                     spec_size(spec) * 4)


def _await(events: Any, kind: str, count: int, timeout: float,
           broker: Broker | None = None) -> list[tuple[Any, ...]]:
    """Wait for ``count`` ``kind`` events from the party processes; an error event raises.
    ``broker``'s connection is kept alive meanwhile (its AMQP heartbeats)."""
    got: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"only {len(got)} of {count} party processes reported {kind!r}")
        if broker is not None:
            broker.process_events(0.0)
        try:
            event = events.get(timeout=min(remaining, 1.0))
        except Exception:
            continue
        if event[0] == "error":
            raise RuntimeError(f"party process {event[1]} failed: {event[2]}")
        if event[0] == kind:
            got.append(event)
    return got


def _read_queue(broker: Broker, queue: str) -> list[tuple[str, int, str]]:
    """Take every message of ``queue``: updates as ``(party, seq, dead-letter reason)``
    (dead letters paired with their reason records; ``""`` for a queue that is not F.dead)."""
    items = []
    while (d := broker.get(queue)) is not None:
        items.append((d.body, d.headers))
    pairs = ([(dl.body, dl.reason) for dl in read_dead(items)] if queue.endswith(".dead")
             else [(body, "") for body, _ in items])
    out: list[tuple[str, int, str]] = []
    for body, reason in pairs:
        try:
            msg = decode(body)
        except InvalidMessage:
            out.append(("?", -1, reason))
            continue
        if isinstance(msg, Update):
            out.append((msg.party, msg.seq, reason))
        else:
            out.append((f"<{msg.KIND}>", -1, reason))
    return out


def summarize(args: argparse.Namespace, parties: int, listeners: int | None, processes: int,
              results: list[dict[str, Any]], ledger: dict[str, Any],
              dead: list[tuple[str, int, str]], queued: list[tuple[str, int, str]],
              last: tuple[float, int], start: float, end: float, end_wall: float,
              confirmed_total: int,
              drained: bool, drain_seconds: float, join_seconds: float,
              depth_max: int, cpu_window: float, broker_cpu: float, rss_joined: int,
              rss_window_end: int, rss_final: int, rss_samples: list[tuple[float, int]],
              broker_memory: list[int], model_bytes: int) -> dict[str, Any]:
    """The row of figures and the ledger balance of one run."""
    window = end - start
    k = args.buffer_k
    sent: dict[tuple[str, int], float] = {}
    confirm_ms, lag_ms = [], []
    for r in results:
        for party, seq, t_pub, t_conf, late in r["confirmed"]:
            sent[(party, seq)] = t_pub
            confirm_ms.append(1000 * (t_conf - t_pub))
            lag_ms.append(1000 * late)
    applied = [(str(p), int(s)) for p, s in ledger["applied"]]
    version = int(ledger["version"])
    mapping_ok = version == len(applied) // k
    # the earliest arrival, at any listener, of a version >= v (drop-head may skip some)
    first: dict[int, float] = {}
    for r in results:
        for _party, v, t in r["arrivals"]:
            first[v] = min(t, first.get(v, math.inf))
    earliest = [math.inf] * (version + 2)
    for v in range(version, 0, -1):
        earliest[v] = min(first.get(v, math.inf), earliest[v + 1])
    latencies = []
    unseen = 0
    if mapping_ok:
        for i, key in enumerate(applied):
            v = 1 + i // k
            if v > version or key not in sent:
                continue
            if math.isinf(earliest[v]):
                unseen += 1
            else:
                latencies.append(earliest[v] - sent[key])
    lat = np.array(latencies) if latencies else np.array([math.nan])
    dead_updates = {(p, s) for p, s, _r in dead if s >= 0}
    reasons: dict[str, int] = {}
    for _p, _s, why in dead:
        reasons[why] = reasons.get(why, 0) + 1
    confirmed = set(sent)
    applied_set = set(applied)
    queued_updates = {(p, s) for p, s, _r in queued if s >= 0}
    missing = confirmed - applied_set - dead_updates - queued_updates
    unexpected = (applied_set | dead_updates | queued_updates) - confirmed
    rss_max = max(r for _t, r in rss_samples) if rss_samples else rss_final
    return {
        "parties": parties, "listeners": "all" if listeners is None else listeners,
        "processes": processes, "window": window, "join_seconds": join_seconds,
        "offered": len(confirmed) / window,
        "scheduled_overdue": sum(r["overdue"] for r in results),
        # status queries unanswered all window long (a stalled aggregator): count the
        # updates in the newest version a listener had by the window's end instead
        "applied_rate": (last[1] / (last[0] - start) if last[0] > start else
                         k * max([v for r in results for _p, v, t in r["arrivals"]
                                  if t <= end_wall], default=0) / window),
        "applied_from_broadcasts": last[0] <= start,
        "versions": version,
        "p50": float(np.percentile(lat, 50)) * 1000, "p95": float(np.percentile(lat, 95)) * 1000,
        "max": float(np.max(lat)) * 1000, "latency_n": len(latencies), "unseen": unseen,
        "mapping_ok": mapping_ok,
        "rss_joined": rss_joined / 2**20, "rss_window_end": rss_window_end / 2**20,
        "rss_max": rss_max / 2**20, "rss_final": rss_final / 2**20,
        "agg_cpu": cpu_window / window, "broker_cpu": broker_cpu / window,
        "depth_max": depth_max,
        "party_cpu": sum(r["cpu_seconds"] for r in results) / window,
        "drain_seconds": drain_seconds, "drained": drained, "queued": len(queued),
        "ledger_lost": bool(ledger.get("lost")),
        "confirm_p50": float(np.percentile(confirm_ms or [math.nan], 50)),
        "confirm_p95": float(np.percentile(confirm_ms or [math.nan], 95)),
        "lag_p95": float(np.percentile(lag_ms or [math.nan], 95)),
        "confirmed": len(confirmed), "confirmed_reported": confirmed_total,
        "applied": len(applied), "in_buffer": len(applied) - version * k,
        "duplicates": int(ledger["duplicates"]), "discarded": int(ledger["discarded"]),
        "dead": len(dead), "dead_reasons": reasons,
        "missing": len(missing), "unexpected": len(unexpected),
        "balanced": not missing and not unexpected and len(confirmed) == confirmed_total,
        "heartbeats": sum(r["heartbeats"] for r in results),
        "models_received": sum(r["models_received"] for r in results),
        "fetches": sum(r["fetches"] for r in results),
        "fetch_p50": float(np.percentile([s for r in results for s in r["fetch_seconds"]]
                                         or [math.nan], 50)) * 1000,
        # models taken in by the listening parties (pushed or fetched) per update they sent:
        # a party trains on one model a round, so 1.0 means nothing was sent for nothing
        "models_per_round": (sum(r["model_bytes"] for r in results) / model_bytes
                             / max(1, sum(r["listening_updates"] for r in results))),
        "broker_mem_max": max(broker_memory) / 2**20 if broker_memory else math.nan,
        "broker_mem_final": broker_memory[-1] / 2**20 if broker_memory else math.nan,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="amqp://guest:guest@localhost:5672/%2F")
    parser.add_argument("--parties", type=int, nargs="+", default=[50, 200],
                        help="party counts, one federation each (default: 50 200)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="publishing window per federation (default: 60)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="offered updates/s, all parties together, the same for every "
                             "count (default: 20, a fifth of the aggregator's drain rate "
                             "of a pre-filled queue on 2 cores)")
    parser.add_argument("--listeners", nargs="+", default=["all", "4"],
                        help="'all' (every party binds a model queue, as the Worker does) "
                             "or a number of listening parties (at least one per party "
                             "process); one federation each (default: all 4)")
    parser.add_argument("--buffer-k", type=int, default=10, help="FedBuff's K (default: 10)")
    parser.add_argument("--processes", type=int, default=0,
                        help="party processes (default: parties/50, at least 2)")
    parser.add_argument("--queue-type", default="quorum", choices=QUEUE_TYPES)
    parser.add_argument("--model", metavar="MODULE:FUNC",
                        help="take the tensors from this Keras plug-in (built once in a "
                             "subprocess); default: the built-in CNN's, without TensorFlow")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait for the aggregator to account for every "
                             "confirmed update after the window; what is left is read back "
                             "from the queue for the balance (default: 120)")
    parser.add_argument("--push-max-parties", type=int, metavar="N",
                        help="the aggregator's --push-max-parties (default: its own, 16): "
                             "above N active parties it announces versions and parties fetch")
    parser.add_argument("--management-url", default="http://guest:guest@127.0.0.1:15672",
                        help="RabbitMQ's management API, for the broker's memory "
                             "(default: http://guest:guest@127.0.0.1:15672)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="DIR",
                        help="keep ledgers, logs and per-process records here "
                             "(default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    modes: list[int | None] = [None if m == "all" else int(m) for m in args.listeners]
    spec = spec_from_plugin(args.model) if args.model else CNN_SPEC
    size = spec_size(spec)
    load = os.getloadavg()
    print(f"FedBuff K={args.buffer_k}, {size:,} float32 parameters "
          f"({size * 4 / 1e6:.1f} MB per update), offered {args.rate:g} updates/s in total, "
          f"{args.seconds:g} s window, {args.queue_type} queue, broker "
          f"{args.broker.split('@')[-1]}; {os.cpu_count()} CPUs, {platform.machine()}, "
          f"Python {platform.python_version()}; load average {load[0]:.1f}", flush=True)
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.out) if args.out else Path(tmp)
        for parties in args.parties:
            for mode in modes:
                began = time.monotonic()
                try:
                    r = run_scale(args, parties, mode, spec, workdir)
                except RuntimeError as exc:  # a run this machine could not carry: say why
                    failed.append(f"{parties} parties, listeners {mode or 'all'}: FAILED "
                                  f"after {time.monotonic() - began:.0f} s: {exc}")
                    print(f"  {failed[-1]}", flush=True)
                    continue
                rows.append(r)
                print(f"  {parties} parties, listeners {r['listeners']}: joined in "
                      f"{r['join_seconds']:.0f} s, {r['confirmed']} confirmed, "
                      f"{r['applied']} applied, version {r['versions']}, drained in "
                      f"{r['drain_seconds']:.1f} s ({time.monotonic() - began:.0f} s in all)",
                      flush=True)
    print()
    print(tabulate([[r["parties"], r["listeners"], f"{r['offered']:.1f}",
                     ("~" if r["applied_from_broadcasts"] else "") + f"{r['applied_rate']:.1f}",
                     r["versions"], f"{r['p50']:.0f}",
                     f"{r['p95']:.0f}", f"{r['max']:.0f}", f"{r['rss_max']:.0f}",
                     f"{r['rss_final']:.0f}", f"{100 * r['agg_cpu']:.0f}",
                     f"{100 * r['party_cpu']:.0f}", f"{100 * r['broker_cpu']:.0f}",
                     f"{r['broker_mem_max']:.0f}", f"{r['models_per_round']:.2f}",
                     r["depth_max"]] for r in rows],
                   headers=["parties", "listening", "offered/s", "applied/s", "versions",
                            "p50 ms", "p95 ms", "max ms", "RSS max MiB", "RSS final MiB",
                            "agg CPU %", "parties CPU %", "broker CPU %", "broker MiB max",
                            "models/round", "max backlog"],
                   tablefmt="github"))
    print()
    print(tabulate([[r["parties"], r["listeners"], r["confirmed"], r["applied"],
                     r["in_buffer"], r["duplicates"], r["discarded"],
                     ", ".join(f"{k} {v}" for k, v in sorted(r["dead_reasons"].items()))
                     or "0", r["queued"], r["missing"], "yes" if r["balanced"] else "NO"]
                    for r in rows],
                   headers=["parties", "listening", "confirmed", "applied (ledger)",
                            "of which in no version yet", "duplicates", "discarded",
                            "dead-lettered", "still queued", "missing", "balanced"],
                   tablefmt="github"))
    for r in rows:
        notes = []
        if r["ledger_lost"]:
            notes.append("the aggregator had to be killed: no ledger")
        if not r["drained"]:
            notes.append(f"NOT drained within --drain-timeout: {r['queued']} updates were "
                         "still queued when the aggregator was stopped (read back, so "
                         "they are in the balance)")
        if r["applied_from_broadcasts"]:
            notes.append("no status query was answered during the window: applied/s (~) is "
                         "K x the newest version a listener had at its end")
        if not r["mapping_ok"]:
            notes.append("versions did not come from full buffers only: latency not computed")
        if r["unseen"]:
            notes.append(f"{r['unseen']} applied updates' versions reached no listener")
        if r["scheduled_overdue"]:
            notes.append(f"{r['scheduled_overdue']} parties were over 1 s behind their "
                         "Poisson schedule at the end of the window")
        notes.append(f"publish to confirm p50 {r['confirm_p50']:.0f} ms, p95 "
                     f"{r['confirm_p95']:.0f} ms; start behind schedule p95 "
                     f"{r['lag_p95']:.0f} ms")
        notes.append(f"{r['fetches']} models fetched (p50 {r['fetch_p50']:.0f} ms); "
                     f"broker memory {r['broker_mem_final']:.0f} MiB at the end")
        notes.append(f"{r['models_received']} models decoded by the listening parties; "
                     f"{r['heartbeats']} heartbeats; RSS {r['rss_joined']:.0f} MiB "
                     f"after the joins, {r['rss_window_end']:.0f} at the window's end")
        print(f"{r['parties']} parties, listening {r['listeners']}: " + "; ".join(notes))
    for line in failed:
        print(line)
    return 0 if all(r["balanced"] for r in rows) and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
