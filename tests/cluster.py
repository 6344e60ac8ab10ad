"""A throw-away three-node RabbitMQ cluster on this machine, from the local RabbitMQ install.

Each node has its own name, AMQP and distribution ports, data and log folders under a
temporary directory; the three share one private ``HOME`` and so one Erlang cookie (the
shared node's is not ours). Node 1 boots first; nodes 2 and 3 boot, then ``rabbitmqctl
join_cluster`` node 1 (``stop_app``, ``join_cluster``, ``start_app``), as an operator would.
Quorum queues declared on it get a member on each node. Nothing here touches the shared
node: ``rabbitmqctl`` only ever addresses our nodes by name.

``kill(i)`` is a SIGKILL of node ``i``'s Erlang VM (no shutdown, as a machine that dies);
``restart(i)`` boots it again from its data folder, and it rejoins on its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.tls_node import NodeError, _accepts, _script, free_port


@dataclass
class Node:
    """One node of the cluster."""

    root: Path
    name: str
    port: int
    dist_port: int
    prometheus_port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <this node> ARGS``."""
        return subprocess.run([_script("rabbitmqctl"), "-n", self.name, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def checked(self, *args: str, timeout: float = 60) -> str:
        result = self.ctl(*args, timeout=timeout)
        if result.returncode != 0:
            raise NodeError(f"rabbitmqctl -n {self.name} {' '.join(args)}: "
                            f"{(result.stderr or result.stdout).strip()[-500:]}")
        return result.stdout

    def boot(self) -> None:
        """Start the VM (returns at once; ``wait_up`` waits)."""
        out = (self.root / "log" / "server-stdout.log").open("ab")
        self.proc = subprocess.Popen([_script("rabbitmq-server")], env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.root, start_new_session=True)
        out.close()

    def wait_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not _accepts(self.port):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise NodeError(f"RabbitMQ node {self.name} did not start:\n{self.log_tail()}")
            time.sleep(0.2)
        self.checked("await_startup", "--timeout", "60", timeout=90)

    def os_pid(self) -> int:
        """The Erlang VM's process id (from the pid file the node writes)."""
        return int((self.root / "rabbitmq.pid").read_text().strip())

    def kill(self) -> None:
        """SIGKILL the VM: no shutdown, no goodbye to the other nodes."""
        os.kill(self.os_pid(), signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)  # the start script exits with its VM

    def stop(self) -> None:
        """An orderly stop (``rabbitmqctl stop``), else by signal."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if self.ctl("stop", timeout=60).returncode == 0:
                self.proc.wait(60)
                return
        except subprocess.TimeoutExpired:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 15) -> str:
        text = [line for path in sorted((self.root / "log").glob("*.log"))
                for line in path.read_text(errors="replace").splitlines()]
        return "\n".join(text[-lines:])


@dataclass
class Cluster:
    """Three nodes joined in one cluster (see the module docstring)."""

    nodes: list[Node]
    started_in: float = 0.0
    events: list[str] = field(default_factory=list)

    @property
    def urls(self) -> str:
        """Every node's URL, as ``--broker`` takes them."""
        return ",".join(n.url for n in self.nodes)

    def node_named(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def leader(self, queue: str) -> Node:
        """The node that leads quorum queue ``queue`` now."""
        deadline = time.monotonic() + 60
        while True:
            ask = self.running()[0]
            result = ask.ctl("list_queues", "name", "leader", "--formatter", "json")
            if result.returncode == 0:
                for row in json.loads(result.stdout or "[]"):
                    if row.get("name") == queue and row.get("leader"):
                        return self.node_named(str(row["leader"]))
            if time.monotonic() > deadline:
                raise NodeError(f"no leader for {queue}: {result.stderr or result.stdout}")
            time.sleep(0.5)

    def reporting(self, queue: str) -> list[Node]:
        """The running nodes whose Prometheus endpoint reports ``rabbitmq_queue_messages`` of
        ``queue`` (per-object metrics): the series the dashboard labels with the leader."""
        series = f'rabbitmq_queue_messages{{vhost="/",queue="{queue}"}}'
        found = []
        for node in self.running():
            url = f"http://127.0.0.1:{node.prometheus_port}/metrics/per-object"
            with urllib.request.urlopen(url, timeout=10) as page:
                text = page.read().decode()
            if any(line.startswith(series) for line in text.splitlines()):
                found.append(node)
        return found

    def members_online(self, queue: str) -> int:
        """How many of ``queue``'s members are online (3 when every replica is back)."""
        ask = self.running()[0]
        result = ask.ctl("list_queues", "name", "online", "--formatter", "json")
        if result.returncode != 0:
            return 0
        for row in json.loads(result.stdout or "[]"):
            if row.get("name") == queue:
                return len(row.get("online") or [])
        return 0

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


def _prepare(root: Path, index: int, tag: str, home: Path) -> Node:
    folder = root / f"node{index}"
    for sub in (folder / "mnesia", folder / "log"):
        sub.mkdir(parents=True, exist_ok=True)
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    port, dist_port, prometheus_port = sorted(ports)
    (folder / "rabbitmq.conf").write_text("\n".join([
        f"listeners.tcp.1 = 127.0.0.1:{port}",
        # the metrics the Grafana dashboard's "queue leaders per node" panel reads
        "prometheus.tcp.ip = 127.0.0.1",
        f"prometheus.tcp.port = {prometheus_port}",
        "log.console = false",
        "log.file.level = info",
        # a node that lost its peers pauses (stops serving) instead of diverging
        "cluster_partition_handling = pause_minority",
        "",
    ]))
    (folder / "enabled_plugins").write_text("[rabbitmq_prometheus].\n")
    (folder / "rabbitmq-env.conf").write_text("")
    name = f"dflc{tag}n{index}@localhost"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
        "HOME": str(home),  # one cookie for the three nodes
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
        "RABBITMQ_LOG_BASE": str(folder / "log"),
        "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid"),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    return Node(folder, name, port, dist_port, prometheus_port, env)


def start(root: Path) -> Cluster:
    """Boot three nodes under ``root`` and join them; ``NodeError`` if that fails (the nodes
    that did start are stopped again)."""
    started = time.monotonic()
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    _script("rabbitmq-server")
    tag = uuid.uuid4().hex[:6]
    cluster = Cluster([_prepare(root, i, tag, home) for i in (1, 2, 3)])
    first, *others = cluster.nodes
    try:
        first.boot()  # first alone: it writes the cookie the other two then read
        first.wait_up()
        for node in others:
            node.boot()
        for node in others:
            node.wait_up()
            node.checked("stop_app")
            node.checked("join_cluster", first.name)
            node.checked("start_app")
        status = json.loads(first.checked("cluster_status", "--formatter", "json"))
        if len(status.get("running_nodes", [])) != 3:
            raise NodeError(f"the cluster did not form: {status.get('running_nodes')}")
    except BaseException:
        cluster.stop()
        raise
    cluster.started_in = time.monotonic() - started
    return cluster
