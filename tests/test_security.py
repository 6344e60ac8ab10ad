"""Message authenticity: forged, altered, unsigned and impersonating messages never count.

Each attack is published straight to the broker, as an attacker with write access to the
federation's ingress would; the aggregator must dead-letter it with a machine-readable
reason and leave the global weights bitwise unchanged. Runs on memory:// and RabbitMQ.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator import Aggregator
from deploy.remote import start_main
from messages.errors import ConfigError, FederationError, InvalidMessage
from messages.transport.broker import Delivery
from messages.wire.codec import decode, encode
from messages.wire.kinds import Heartbeat, Join, Model, Query, Report, Update
from messages.wire.signing import (
    AGGREGATOR,
    SIGNATURE_HEADER,
    KeyDirectory,
    Signer,
    aggregator_keyring,
    load_keyring,
    load_signer,
    make_ed25519,
    make_hmac_secret,
)
from tests.test_aggregator_service import Client, Env, delta, initial
from tests.test_aggregator_service import env as env
from worker import Worker, WorkerConfig


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    make_ed25519(tmp_path, AGGREGATOR)
    make_ed25519(tmp_path, "a")
    make_ed25519(tmp_path, "b")
    make_hmac_secret(tmp_path, "c")
    make_ed25519(tmp_path / "elsewhere", "z")  # a key the aggregator never trusted
    return tmp_path


def signer(keys: Path, name: str) -> Signer:
    path = keys / f"{name}.key" if (keys / f"{name}.key").exists() else keys / f"{name}.secret"
    return load_signer(path, name)


class Party:
    """A client that signs what it sends with the key of ``name``."""

    def __init__(self, client: Client, key: Signer) -> None:
        self.c, self.key = client, key

    def join(self, party: str) -> Delivery:
        body = encode(Join(party, 100, initial()))
        return self.c.b.call(self.c.t.control, body, timeout=5, headers=self.key.headers(body),
                             exchange=self.c.t.ingress)

    def body(self, party: str, seq: int, base: int, value: float = 1.0) -> bytes:
        return encode(Update(party, seq, base, 100, delta(value)))

    def publish(self, body: bytes, headers: dict[str, Any] | None) -> None:
        self.c.b.publish(self.c.t.ingress, self.c.t.updates, body, headers=headers,
                         mandatory=True)

    def send(self, body: bytes) -> None:
        self.publish(body, self.key.headers(body))


@pytest.fixture
def signed(env: Env, keys: Path) -> Iterator[tuple[Aggregator, Client, Path]]:
    agg = env.start(mixing_alpha=0.5, staleness="constant", keys_dir=str(keys))
    client = env.client()
    client.listen("a")
    for name in ("a", "b"):
        welcome = Party(client, signer(keys, name)).join(name)
        aggregator_keyring(keys / "aggregator.pub").verify(welcome.body, welcome.headers)
    client.pump(lambda: len(client.models) == 1)
    yield agg, client, keys
    agg.stop()
    agg.wait(10)
    client.b.close()


def dead_reason(client: Client, n: int) -> str:
    client.pump(lambda: len(client.dead) >= n)
    return client.dead[n - 1].reason


def test_a_signed_update_is_applied_and_the_broadcast_is_signed(
        signed: tuple[Aggregator, Client, Path]) -> None:
    agg, client, keys = signed
    Party(client, signer(keys, "a")).send(Party(client, signer(keys, "a")).body("a", 0, 0))
    client.pump(lambda: agg.version == 1 and len(client.models) == 2)
    assert not client.dead


def test_every_forgery_is_dead_lettered_and_the_model_is_unchanged(
        signed: tuple[Aggregator, Client, Path]) -> None:
    agg, client, keys = signed
    a, b = Party(client, signer(keys, "a")), Party(client, signer(keys, "b"))
    z = Party(client, load_signer(keys / "elsewhere" / "z.key", "z"))
    before = [w.copy() for w in agg.weights]
    genuine = a.body("a", 0, 0)
    altered = bytearray(genuine)
    altered[-5] ^= 0x01  # one bit of a delta value, after signing
    other = a.body("a", 1, 0, value=2.0)
    by_b, by_z = b.body("a", 0, 0), z.body("z", 0, 0)
    attacks: list[tuple[str, bytes, dict[str, Any] | None]] = [
        ("unsigned", genuine, None),
        ("impersonation", by_b, b.key.headers(by_b)),
        ("bad-signature", bytes(altered), a.key.headers(genuine)),
        ("bad-signature", other, a.key.headers(genuine)),  # a signature moved to other bytes
        ("unknown-signer", by_z, z.key.headers(by_z)),
        ("unknown-signer", genuine, {**a.key.headers(genuine), "x-dfl-signer": "nobody"}),
        ("bad-signature", genuine, {**a.key.headers(genuine), SIGNATURE_HEADER: "!!"}),
    ]
    for n, (reason, body, headers) in enumerate(attacks, start=1):
        a.publish(body, headers)
        assert dead_reason(client, n) == reason, n
    for got, want in zip(agg.weights, before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert agg.version == 0 and agg.status.updates == 0
    assert dict(agg.status.rejected) == {"unsigned": 1, "impersonation": 1, "bad-signature": 3,
                                         "unknown-signer": 2}
    a.send(genuine)  # the genuine one still counts, once: its replay is a duplicate
    a.send(genuine)
    client.pump(lambda: agg.version == 1 and agg.status.duplicates == 1)


def test_control_messages_are_verified_too(signed: tuple[Aggregator, Client, Path]) -> None:
    agg, client, keys = signed
    a, b = Party(client, signer(keys, "a")), Party(client, signer(keys, "b"))
    beat = encode(Heartbeat("a", 0))
    client.b.publish(client.t.ingress, client.t.control, beat, headers=None)
    assert dead_reason(client, 1) == "unsigned"
    client.b.publish(client.t.ingress, client.t.control, beat, headers=b.key.headers(beat))
    assert dead_reason(client, 2) == "impersonation"
    join = encode(Join("a", 100, initial()))
    client.b.publish(client.t.ingress, client.t.control, join, headers=None)
    assert dead_reason(client, 3) == "unsigned"
    a.send(a.body("a", 0, 0))
    client.pump(lambda: agg.version == 1)  # a's membership was not disturbed
    # operators' read-only queries need no party key; the answer is signed
    answer = client.b.call(client.t.control, encode(Query("status")), timeout=5,
                           exchange=client.t.ingress)
    assert isinstance(decode(answer.body), Report)
    aggregator_keyring(keys / "aggregator.pub").verify(answer.body, answer.headers)


def test_with_keys_a_start_request_must_be_signed_by_a_known_key(
        env: Env, keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Starting changes state, so unlike status and model queries an unsigned start is
    refused (answered, and nothing released); any key in the key directory may start."""
    agg = env.start(start="manual", keys_dir=str(keys))
    client = env.client()
    client.listen("a")
    Party(client, signer(keys, "a")).join("a")
    target = ["--broker", env.url, "--federation", env.federation]
    assert start_main(target) == 1
    assert "must be signed by a key in its key directory" in capsys.readouterr().err
    start = encode(Query("start"))
    client.b.publish(client.t.ingress, client.t.control, start,
                     headers=load_signer(keys / "elsewhere" / "z.key", "z").headers(start))
    assert dead_reason(client, 1) == "unknown-signer"
    assert not agg.status.released and client.models == []
    assert start_main([*target, "--signing-key", str(keys / "b.key")]) == 0  # known, not joined
    assert capsys.readouterr().out == (f"started federation {env.federation} at version 0 "
                                       "with 1 parties\n")
    client.pump(lambda: len(client.models) == 1)
    agg.stop()
    agg.wait(10)
    client.b.close()


def test_hmac_parties_sign_with_their_secret(signed: tuple[Aggregator, Client, Path]) -> None:
    agg, client, keys = signed
    c = Party(client, signer(keys, "c"))
    c.join("c")
    c.send(c.body("c", 0, 0))
    client.pump(lambda: agg.version == 1)
    wrong = Signer("c", _secret=b"0" * 32)
    body = c.body("c", 1, 1)
    c.publish(body, wrong.headers(body))
    assert dead_reason(client, 1) == "bad-signature"


def test_a_party_added_after_the_start_is_trusted_once_its_key_is_in_the_directory(
        signed: tuple[Aggregator, Client, Path]) -> None:
    agg, client, keys = signed
    make_ed25519(keys, "late")
    late = Party(client, signer(keys, "late"))
    late.join("late")
    late.send(late.body("late", 0, 0))
    client.pump(lambda: agg.version == 1)


def test_a_worker_ignores_models_the_aggregator_did_not_sign(keys: Path) -> None:
    worker = Worker(WorkerConfig(broker=f"memory://{uuid.uuid4().hex[:8]}", party_id=0,
                                 signing_key=str(keys / "a.key"),
                                 aggregator_key=str(keys / "aggregator.pub")))
    body = encode(Model(5, initial()))
    mallory = load_signer(keys / "b.key", AGGREGATOR)  # claims to be the aggregator
    for headers in ({}, mallory.headers(body)):
        worker._on_model(Delivery(body, 1, "q", dict(headers)))
        assert worker._latest is None
    genuine = load_signer(keys / "aggregator.key", AGGREGATOR)
    worker._on_model(Delivery(body, 2, "q", genuine.headers(body)))
    assert worker._latest is not None and worker._latest.version == 5


def test_key_files_are_private_and_never_overwritten(keys: Path) -> None:
    assert (keys / "a.key").stat().st_mode & 0o077 == 0
    assert (keys / "c.secret").stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError, match="exists"):
        make_ed25519(keys, "a")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_signer(keys / "a.pub", "a")
    assert set(load_keyring(keys, exclude=AGGREGATOR).public) == {"a", "b"}
    assert "PRIVATE" not in repr(signer(keys, "a")) and "_key" not in repr(signer(keys, "a"))


def test_a_bad_key_option_stops_the_daemon_at_start(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match="make keys with `dfl admin`"):
        Worker(WorkerConfig(broker="memory://x", party_id=0,
                            signing_key=str(tmp_path / "missing.key")))
    with pytest.raises(InvalidMessage):
        aggregator_keyring(make_ed25519(tmp_path, AGGREGATOR).with_suffix(".pub")).verify(
            b"x", {})


def test_a_key_directory_is_read_again_for_a_signer_added_after_it_was_loaded(
        tmp_path: Path) -> None:
    """Aggregators and edges take a party that ``dfl admin`` added while they run; an
    unknown signer with the directory unchanged stays unknown, and so does the aggregator's
    own key."""
    keys = tmp_path / "keys"
    make_ed25519(keys, "a")
    make_ed25519(keys, AGGREGATOR)
    trust = KeyDirectory(keys, exclude=AGGREGATOR)
    outsider = load_signer(make_ed25519(tmp_path / "elsewhere", "b"), "b")
    body = b"an update"
    with pytest.raises(InvalidMessage, match="no 'ed25519' key for signer 'b'"):
        trust.verify(body, outsider.headers(body))
    time.sleep(0.01)  # a new mtime even on coarse clocks
    b_key = make_ed25519(keys, "b")
    assert trust.verify(body, load_signer(b_key, "b").headers(body)) == "b"
    own = load_signer(keys / f"{AGGREGATOR}.key", AGGREGATOR)
    with pytest.raises(InvalidMessage) as exc:
        trust.verify(body, own.headers(body))
    assert exc.value.reason == "unknown-signer"
