"""The Job dfl-keys: the federation's broker identities and signing keys, kept in Secrets.

Run by ``keys-job.yaml`` in the dfl image (mounted from the ConfigMap dfl-keys-script that
kustomization.yaml generates from this file). It restores what the two Secrets already
hold, runs ``dfl admin add-aggregator`` and ``dfl admin add-party ID`` (through the
management API, as the operator's default user) for every identity of 0..DFL_NUM_PARTIES-1
that has no key yet, and writes both Secrets back:

- ``$AGGREGATOR_SECRET`` (mounted by the aggregator as its --keys directory):
  aggregator.key, aggregator.pub, every party's <id>.pub, and the aggregator's broker
  ``username`` and ``password``;
- ``$PARTY_SECRET`` (read by each worker pod's init container, which copies out its own
  party's files only): every party's <id>.key and dfl-<federation>-party-<id>.password,
  and aggregator.pub.

With secure aggregation (``DFL_SECURE_AGGREGATION`` true, from dfl-config: the overlay
``secure/``) it also runs ``dfl admin add-helper`` in a folder of its own (helper.key must not
count as a party's key) and writes ``$HELPER_SECRET`` (mounted by the helper as its
--party-keys directory): helper.key, helper-seal.key and helper-seal.pem, the helper's broker
``username`` and ``password``, and the helper's own copies of aggregator.pub and every party's
<id>.pub. A copy it holds is never replaced by the aggregator's (a party's key cannot be
swapped through the leader); a differing one is reported. helper.pub goes to
``$AGGREGATOR_SECRET`` (the aggregator checks the helper's answers), helper-seal.pem to
``$PARTY_SECRET`` (the parties seal their seeds to it).

It only adds: running it again (a re-created Job, a larger DFL_NUM_PARTIES) keeps every key
and password that exists. Passwords and keys are never printed.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
API = "https://kubernetes.default.svc"


def secrets_api(method: str, name: str = "", body: dict[str, Any] | None = None
                ) -> dict[str, Any] | None:
    """One call to this namespace's Secrets; ``None`` for a Secret that does not exist."""
    namespace = (ACCOUNT / "namespace").read_text().strip()
    url = f"{API}/api/v1/namespaces/{namespace}/secrets" + (f"/{name}" if name else "")
    request = urllib.request.Request(
        url, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": "Bearer " + (ACCOUNT / "token").read_text().strip(),
                 "content-type": "application/json", "accept": "application/json"})
    context = ssl.create_default_context(cafile=str(ACCOUNT / "ca.crt"))
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and method == "GET":
            return None
        sys.exit(f"dfl-keys: {method} secret {name or '(new)'}: HTTP {exc.code} {exc.reason}")


def restore(name: str) -> dict[str, bytes]:
    secret = secrets_api("GET", name) or {}
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def save(name: str, files: dict[str, bytes]) -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "dfl"}},
            "data": {k: base64.b64encode(v).decode() for k, v in sorted(files.items())}}
    if secrets_api("GET", name) is None:
        secrets_api("POST", body=body)
    else:
        secrets_api("PUT", name, body)
    print(f"dfl-keys: secret {name}: {', '.join(sorted(files))}")


def main() -> None:
    federation = os.environ["DFL_FEDERATION"]
    parties = int(os.environ["DFL_NUM_PARTIES"])
    aggregator_secret, party_secret = os.environ["AGGREGATOR_SECRET"], os.environ["PARTY_SECRET"]
    admin_user = urllib.parse.quote(os.environ["RABBITMQ_ADMIN_USER"], safe="")
    management = os.environ["RABBITMQ_MANAGEMENT_URL"].replace("://", f"://{admin_user}@", 1)
    keys = Path(os.environ.get("KEYS_DIR", "/tmp/keys"))
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    aggregator_user = f"dfl-{federation}-aggregator"
    helper_secret = os.environ.get("HELPER_SECRET", "")
    secure = os.environ.get("DFL_SECURE_AGGREGATION", "").strip().lower() in (
        "1", "true", "yes", "on")

    # what earlier runs made
    held = restore(party_secret)
    for name, data in restore(aggregator_secret).items():
        if name == "password":
            held[f"{aggregator_user}.password"] = data
        elif name != "username":
            held[name] = data
    for name, data in held.items():
        path = keys / name
        if not path.exists():
            path.write_bytes(data)
            path.chmod(0o600)

    # what is missing
    def admin(*args: str, password: str, directory: Path = keys) -> None:
        (directory / password).unlink(missing_ok=True)  # a password without a key: start over
        subprocess.run(["dfl", "admin", *args, "--federation", federation,
                        "--keys", str(directory), "--management-url", management], check=True)

    if not (keys / "aggregator.key").exists():
        admin("add-aggregator", password=f"{aggregator_user}.password")
    for party in range(parties):
        if not (keys / f"{party}.key").exists():
            admin("add-party", str(party), password=f"dfl-{federation}-party-{party}.password")

    def read(name: str) -> bytes:
        return (keys / name).read_bytes()

    ids = sorted(p.stem for p in keys.glob("*.key") if p.stem != "aggregator")
    to_aggregator: dict[str, bytes] = {}
    to_parties: dict[str, bytes] = {}
    if secure and helper_secret:
        helper = provision_helper(keys / "helper", federation, helper_secret, ids, admin)
        to_aggregator["helper.pub"] = (helper / "helper.pub").read_bytes()
        to_parties["helper-seal.pem"] = (helper / "helper-seal.pem").read_bytes()
    save(aggregator_secret, {
        "aggregator.key": read("aggregator.key"), "aggregator.pub": read("aggregator.pub"),
        **{f"{i}.pub": read(f"{i}.pub") for i in ids},
        **to_aggregator,
        "username": aggregator_user.encode(),
        "password": read(f"{aggregator_user}.password").strip()})
    save(party_secret, {
        "aggregator.pub": read("aggregator.pub"),
        **{f"{i}.key": read(f"{i}.key") for i in ids},
        **{f"dfl-{federation}-party-{i}.password": read(f"dfl-{federation}-party-{i}.password")
           for i in ids},
        **to_parties})


def provision_helper(helper: Path, federation: str, secret: str, ids: list[str],
                     admin: Any) -> Path:
    """The helper's identity and its own copies of the public keys, saved to ``secret``;
    returns the folder that holds them (apart from the others: helper.key is no party's)."""
    keys = helper.parent
    helper.mkdir(mode=0o700, exist_ok=True)
    user = f"dfl-{federation}-helper"
    for name, data in restore(secret).items():
        if name == "password":
            name = f"{user}.password"
        elif name == "username":
            continue
        path = helper / name
        if not path.exists():
            path.write_bytes(data)
            path.chmod(0o600)
    if not (helper / "helper.key").exists():
        for stale in ("helper.pub", "helper-seal.key", "helper-seal.pem"):
            (helper / stale).unlink(missing_ok=True)
        admin("add-helper", password=f"{user}.password", directory=helper)
    for name in ("aggregator.pub", *(f"{i}.pub" for i in ids)):
        theirs, mine = keys / name, helper / name
        if not mine.exists():
            mine.write_bytes(theirs.read_bytes())
        elif mine.read_bytes() != theirs.read_bytes():
            print(f"dfl-keys: {name} differs from the helper's copy in {secret}; kept the "
                  f"helper's (delete it from {secret} to accept the new key)")
    pubs = sorted(p.name for p in helper.glob("*.pub") if p.name != "helper.pub")
    save(secret, {
        "helper.key": (helper / "helper.key").read_bytes(),
        "helper.pub": (helper / "helper.pub").read_bytes(),
        "helper-seal.key": (helper / "helper-seal.key").read_bytes(),
        "helper-seal.pem": (helper / "helper-seal.pem").read_bytes(),
        **{name: (helper / name).read_bytes() for name in pubs},
        "username": user.encode(),
        "password": (helper / f"{user}.password").read_bytes().strip()})
    return helper


if __name__ == "__main__":
    main()
