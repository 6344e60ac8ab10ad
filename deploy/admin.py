"""``dfl admin``: broker identities and signing keys for the parties and the aggregator.

Each party gets its own RabbitMQ user whose permissions (configure / write / read regular
expressions, ``Topology.party_permissions``) allow exactly what a party does: declare and
bind its own model queue, publish to the federation's ingress exchange, read the model
fanout and its own queue. It cannot consume ``F.updates``, read another party's queue,
publish to the model fanout or the default exchange, or declare or delete anything shared.
The aggregator gets a user of its own for everything under ``F.``.

Two ways to reach the broker, the same result: ``rabbitmqctl`` on the broker's host
(passwords go through its standard input, never its command line, where ``ps`` would show
them), or the management plugin's HTTP API from anywhere (``--management-url``).

Passwords are random, written to ``DIR/<user>.password`` (mode 0600) and never printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from messages.daemon.cli import Formatter, Parser, fail
from messages.errors import ConfigError, FederationError
from messages.secagg.sealing import make_seal_keys
from messages.transport.broker import mask_url
from messages.transport.topology import Topology, check_name
from messages.wire.signing import AGGREGATOR, HELPER, make_ed25519, make_hmac_secret

RESERVED = (AGGREGATOR, HELPER)
"""Signer names of the servers: no party may take one."""

DESCRIPTION = """\
Create (or remove) the broker users of a federation and the keys its messages are signed
with. add-aggregator once, then add-party for each party: every command writes the user's
random password to DIR/<user>.password (mode 0600) and its signing key to DIR. Hand each
party its <id>.key, <id>.password and aggregator.pub; the aggregator reads DIR with --keys.

examples:
  dfl admin add-aggregator --federation mnist --keys keys/
  dfl admin add-party 0 --federation mnist --keys keys/
  dfl admin add-party 1 --federation mnist --keys keys/ --hmac
  dfl admin add-party 2 --federation mnist --keys keys/ \\
      --management-url http://admin@rabbit.example.org:15672   # password: DFL_ADMIN_PASSWORD
  dfl admin remove-party 2 --federation mnist
  dfl admin add-helper --federation mnist --keys helper-keys/   # secure aggregation's helper

add-helper (run by the helper's operator) writes helper.key/helper.pub (its answers are
signed with it: give helper.pub to the aggregator's --keys) and helper-seal.key/helper-seal.pem
(parties seal their seeds to helper-seal.pem: give it to every party's --helper-key). The
helper needs its own copy of every party's <id>.pub and of aggregator.pub in its --party-keys.
"""


def party_user(federation: str, party: str) -> str:
    return f"dfl-{federation}-party-{party}"


def aggregator_user(federation: str) -> str:
    return f"dfl-{federation}-aggregator"


def helper_user(federation: str) -> str:
    return f"dfl-{federation}-helper"


class Backend(Protocol):
    """How users and permissions reach the broker."""

    def add_user(self, user: str, password: str) -> None: ...
    def set_permissions(self, user: str, configure: str, write: str, read: str) -> None: ...
    def delete_user(self, user: str) -> None: ...


@dataclass
class Rabbitmqctl:
    """``rabbitmqctl`` on the broker's host (needs the Erlang cookie: run as root/rabbitmq)."""

    vhost: str = "/"
    node: str | None = None
    command: str = "rabbitmqctl"

    def _run(self, *args: str, stdin: str | None = None) -> None:
        cmd = [self.command, *(("-n", self.node) if self.node else ()), "--quiet", *args]
        try:
            done = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                                  timeout=120)
        except FileNotFoundError:
            raise ConfigError(f"{self.command} not found: run on the broker's host, or use "
                              "--management-url") from None
        if done.returncode != 0:
            reason = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise FederationError(f"rabbitmqctl {args[0]} failed: "
                                  f"{reason[-1] if reason else done.returncode}")

    def add_user(self, user: str, password: str) -> None:
        self._run("add_user", user, stdin=password + "\n")

    def set_permissions(self, user: str, configure: str, write: str, read: str) -> None:
        self._run("set_permissions", "-p", self.vhost, user, configure, write, read)

    def delete_user(self, user: str) -> None:
        self._run("delete_user", user)


@dataclass
class ManagementApi:
    """The management plugin's HTTP API (``rabbitmq-plugins enable rabbitmq_management``)."""

    url: str
    vhost: str = "/"

    def _request(self, method: str, path: str, body: object | None = None) -> None:
        parts = urllib.parse.urlsplit(self.url)
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "") or os.environ.get(
            "DFL_ADMIN_PASSWORD", "guest")
        host = (parts.hostname or "localhost") + (f":{parts.port}" if parts.port else "")
        base = parts._replace(netloc=host).geturl().rstrip("/")
        req = urllib.request.Request(
            base + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"content-type": "application/json", "authorization": "Basic "
                     + base64.b64encode(f"{user}:{password}".encode()).decode()})
        try:
            with urllib.request.urlopen(req, timeout=30):
                pass
        except urllib.error.HTTPError as exc:
            raise FederationError(f"{method} {mask_url(self.url)}{path}: HTTP {exc.code} "
                                  f"{exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise FederationError(f"management API {mask_url(self.url)} unreachable: "
                                  f"{getattr(exc, 'reason', exc)}") from None

    def add_user(self, user: str, password: str) -> None:
        self._request("PUT", f"/api/users/{urllib.parse.quote(user, safe='')}",
                      {"password": password, "tags": ""})

    def set_permissions(self, user: str, configure: str, write: str, read: str) -> None:
        vhost = urllib.parse.quote(self.vhost, safe="")
        self._request("PUT", f"/api/permissions/{vhost}/{urllib.parse.quote(user, safe='')}",
                      {"configure": configure, "write": write, "read": read})

    def delete_user(self, user: str) -> None:
        self._request("DELETE", f"/api/users/{urllib.parse.quote(user, safe='')}")


def _write_password(keys: Path, user: str) -> Path:
    keys.mkdir(parents=True, exist_ok=True)
    path = keys / f"{user}.password"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists: remove-party/remove it first") from None
    password = secrets.token_urlsafe(24)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return path


def add_identity(backend: Backend, user: str, permissions: tuple[str, str, str],
                 keys: Path) -> Path:
    """Create ``user`` with a fresh random password (written under ``keys``) and
    ``permissions``; returns the password file."""
    path = _write_password(keys, user)
    try:
        backend.add_user(user, path.read_text().strip())
        backend.set_permissions(user, *permissions)
    except FederationError:
        path.unlink()
        raise
    return path


def _backend(ns: argparse.Namespace) -> Backend:
    if ns.management_url:
        return ManagementApi(ns.management_url, ns.vhost)
    return Rabbitmqctl(ns.vhost, ns.node)


def build_parser(prog: str = "dfl admin") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=DESCRIPTION, formatter_class=Formatter)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (("add-party", "create party ID's user, permissions and key"),
                            ("add-aggregator", "create the aggregator's user and key"),
                            ("add-helper", "create the secure-aggregation helper's user and "
                                           "keys"),
                            ("remove-party", "delete party ID's broker user")):
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=Formatter)
        if name in ("add-party", "remove-party"):
            p.add_argument("party", metavar="ID", help="the party id (its --party-id)")
        p.add_argument("--federation", default="mnist", help="federation id (default: mnist)")
        if name != "remove-party":
            p.add_argument("--keys", required=True, type=Path, metavar="DIR",
                           help="write the key and the password file here")
        if name == "add-party":
            p.add_argument("--hmac", action="store_true",
                           help="an HMAC-SHA256 secret instead of an Ed25519 key pair (the "
                                "aggregator then holds a secret that can sign as the party)")
        p.add_argument("--vhost", default="/", help="RabbitMQ virtual host (default: /)")
        p.add_argument("--management-url", metavar="URL",
                       help="use the management HTTP API at URL (http://user@host:15672; the "
                            "password from the URL or DFL_ADMIN_PASSWORD) instead of "
                            "rabbitmqctl")
        p.add_argument("--node", help="rabbitmqctl's -n NODE (default: the local node)")
    return parser


def main(argv: list[str] | None = None, prog: str = "dfl admin") -> int:
    ns = build_parser(prog).parse_args(argv)
    try:
        topology = Topology(check_name("--federation", ns.federation))
        backend = _backend(ns)
        if ns.action == "add-aggregator":
            user = aggregator_user(ns.federation)
            password = add_identity(backend, user, topology.aggregator_permissions(), ns.keys)
            key = make_ed25519(ns.keys, AGGREGATOR)
            print(f"aggregator of {ns.federation}: broker user {user}, password in {password}; "
                  f"models signed with {key} (parties verify with {key.with_suffix('.pub')})")
        elif ns.action == "add-helper":
            user = helper_user(ns.federation)
            password = add_identity(backend, user, topology.helper_permissions(), ns.keys)
            key = make_ed25519(ns.keys, HELPER)
            seal = make_seal_keys(ns.keys)
            print(f"helper of {ns.federation}: broker user {user}, password in {password}; "
                  f"answers signed with {key} (give {key.with_suffix('.pub')} to the "
                  f"aggregator's --keys); parties seal seeds to {seal} (--helper-key)")
        elif ns.action == "add-party":
            party = check_name("party id", ns.party)
            if party in RESERVED:
                raise ConfigError(f"party id {party!r} is the name of a server's key; "
                                  "choose another")
            user = party_user(ns.federation, party)
            password = add_identity(backend, user, topology.party_permissions(party), ns.keys)
            key = (make_hmac_secret if ns.hmac else make_ed25519)(ns.keys, party)
            print(f"party {party} of {ns.federation}: broker user {user}, password in "
                  f"{password}; signs with {key} (--signing-key)")
        else:
            user = party_user(ns.federation, check_name("party id", ns.party))
            backend.delete_user(user)
            print(f"removed broker user {user}; its open connections keep working until "
                  "they close (rabbitmqctl close_connection to cut them now)")
    except FederationError as exc:
        fail(prog, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
