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
    def admin(*args: str, password: str) -> None:
        (keys / password).unlink(missing_ok=True)  # a password without a key: start over
        subprocess.run(["dfl", "admin", *args, "--federation", federation, "--keys", str(keys),
                        "--management-url", management], check=True)

    if not (keys / "aggregator.key").exists():
        admin("add-aggregator", password=f"{aggregator_user}.password")
    for party in range(parties):
        if not (keys / f"{party}.key").exists():
            admin("add-party", str(party), password=f"dfl-{federation}-party-{party}.password")

    def read(name: str) -> bytes:
        return (keys / name).read_bytes()

    ids = sorted(p.stem for p in keys.glob("*.key") if p.stem != "aggregator")
    save(aggregator_secret, {
        "aggregator.key": read("aggregator.key"), "aggregator.pub": read("aggregator.pub"),
        **{f"{i}.pub": read(f"{i}.pub") for i in ids},
        "username": aggregator_user.encode(),
        "password": read(f"{aggregator_user}.password").strip()})
    save(party_secret, {
        "aggregator.pub": read("aggregator.pub"),
        **{f"{i}.key": read(f"{i}.key") for i in ids},
        **{f"dfl-{federation}-party-{i}.password": read(f"dfl-{federation}-party-{i}.password")
           for i in ids}})


if __name__ == "__main__":
    main()
