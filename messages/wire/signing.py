"""Message authenticity: who sent a body, and that nobody changed it on the way.

Broker permissions stop a party from reading what is not its own, but any party may write to
the federation's ingress exchange, so a body alone could claim to come from anyone. Each
message therefore travels with a signature over its exact bytes, in three AMQP headers
(the body is not re-encoded, so checking costs one hash of it and no copy):

- ``x-dfl-signer``: the key's owner (a party id, or ``aggregator``);
- ``x-dfl-alg``: ``ed25519`` (the default: the aggregator holds only public keys, so a
  leaked aggregator disk cannot forge a party) or ``hmac-sha256`` (a per-party shared
  secret, for sites that cannot run public-key crypto; the aggregator can then forge);
- ``x-dfl-signature``: the signature, base64.

The receiver verifies **before decoding** and, after decoding, that the message's own party
field names the signer, so party B cannot pass off B-signed bytes as party A's
(impersonation). Replays of a whole signed message are dropped by the aggregator's
``(party, seq)`` check, and models carry their version, so a replayed old model is ignored.

Key files (made by ``dfl admin``): ``<name>.key`` an Ed25519 private key (PEM, PKCS#8,
mode 0600), ``<name>.pub`` its public key (PEM), ``<name>.secret`` an HMAC secret (64 hex
digits, mode 0600). Key material is never logged or put in an exception.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from messages.errors import ConfigError, InvalidMessage

SIGNER_HEADER = "x-dfl-signer"
ALG_HEADER = "x-dfl-alg"
SIGNATURE_HEADER = "x-dfl-signature"
AGGREGATOR = "aggregator"
"""The signer name of the aggregator's key (``aggregator.key`` / ``aggregator.pub``)."""
HELPER = "helper"
"""The signer name of secure aggregation's helper (``helper.key`` / ``helper.pub``)."""
ED25519 = "ed25519"
HMAC_SHA256 = "hmac-sha256"


@dataclass(frozen=True)
class Signer:
    """Signs bodies as ``name`` with an Ed25519 private key or an HMAC secret."""

    name: str
    _key: Ed25519PrivateKey | None = field(default=None, repr=False)
    _secret: bytes | None = field(default=None, repr=False)

    @property
    def algorithm(self) -> str:
        return ED25519 if self._key is not None else HMAC_SHA256

    def headers(self, body: bytes) -> dict[str, str]:
        """The signature headers to publish ``body`` with."""
        if self._key is not None:
            sig = self._key.sign(body)
        else:
            assert self._secret is not None
            sig = hmac.digest(self._secret, body, hashlib.sha256)
        return {SIGNER_HEADER: self.name, ALG_HEADER: self.algorithm,
                SIGNATURE_HEADER: base64.b64encode(sig).decode("ascii")}

    def public_key(self) -> Ed25519PublicKey | None:
        return self._key.public_key() if self._key is not None else None

    def sign_statement(self, data: bytes) -> bytes:
        """A raw Ed25519 signature of ``data`` (a statement for a third party, such as a
        sealed seed for the helper); ``ConfigError`` for an HMAC signer, whose secret the
        third party would need and could then forge with."""
        if self._key is None:
            raise ConfigError(f"signer {self.name!r} has an HMAC secret: secure aggregation "
                              "needs an Ed25519 key (dfl admin add-party without --hmac)")
        return self._key.sign(data)


@dataclass
class Keyring:
    """The keys a receiver trusts, by signer name: Ed25519 public keys and HMAC secrets."""

    public: dict[str, Ed25519PublicKey] = field(default_factory=dict, repr=False)
    secrets: dict[str, bytes] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.public) + len(self.secrets)

    def verify(self, body: bytes, headers: Mapping[str, Any]) -> str:
        """The signer of ``body``; ``InvalidMessage`` when it is unsigned or the signature
        does not match (a wrong key, or bytes changed after signing)."""
        signer, alg, sig64 = (headers.get(h) for h in (SIGNER_HEADER, ALG_HEADER,
                                                       SIGNATURE_HEADER))
        if signer is None and sig64 is None:
            raise InvalidMessage("unsigned", "the message carries no signature headers")
        if not (isinstance(signer, str) and isinstance(alg, str) and isinstance(sig64, str)):
            raise InvalidMessage("bad-signature", "signature headers missing or not strings")
        try:
            sig = base64.b64decode(sig64, validate=True)
        except ValueError:
            raise InvalidMessage("bad-signature", "signature is not base64") from None
        if alg == ED25519 and signer in self.public:
            try:
                self.public[signer].verify(sig, body)
            except InvalidSignature:
                raise InvalidMessage("bad-signature", f"ed25519 signature of {signer!r} does "
                                     "not match the body") from None
            return signer
        if alg == HMAC_SHA256 and signer in self.secrets:
            if not hmac.compare_digest(sig, hmac.digest(self.secrets[signer], body,
                                                        hashlib.sha256)):
                raise InvalidMessage("bad-signature", f"hmac of {signer!r} does not match "
                                     "the body")
            return signer
        raise InvalidMessage("unknown-signer", f"no {alg[:20]!r} key for signer "
                             f"{signer[:64]!r}")


def verify_statement(ring: Keyring, signer: str, data: bytes, signature: bytes) -> None:
    """``InvalidMessage`` unless ``signature`` is ``signer``'s Ed25519 signature of ``data``
    under a key in ``ring`` (reason ``unknown-signer`` or ``bad-signature``)."""
    key = ring.public.get(signer)
    if key is None:
        raise InvalidMessage("unknown-signer", f"no ed25519 key for {signer[:64]!r}")
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise InvalidMessage("bad-signature", f"the statement of {signer[:64]!r} is not "
                                              "signed by its key") from None


def check_signer(signer: str, party: str) -> None:
    """The decoded message must be from the key's owner: B may not sign as A."""
    if signer != party:
        raise InvalidMessage("impersonation", f"signed by {signer[:64]!r} but claims to be "
                             f"party {party[:64]!r}")


# -- key files -----------------------------------------------------------------------------
def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, refusing to overwrite a key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists: remove it first to make a new key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_ed25519(directory: Path, name: str) -> Path:
    """Write ``name.key`` (private, 0600) and ``name.pub``; returns the private key's path."""
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = directory / f"{name}.key"
    _write_private(private, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    (directory / f"{name}.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private


def make_hmac_secret(directory: Path, name: str) -> Path:
    """Write ``name.secret`` (32 random bytes as hex, 0600); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.secret"
    _write_private(path, (secrets.token_hex(32) + "\n").encode())
    return path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}; make keys with `dfl admin`") from None


def _secret(path: Path) -> bytes:
    text = _read(path, "HMAC secret").decode("ascii", "replace").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise ConfigError(f"HMAC secret {path}: need at least 32 hex digits (16 bytes)")
    return secret


def load_signer(path: str | Path, name: str) -> Signer:
    """A signer from a key file: ``*.secret`` is HMAC, anything else an Ed25519 PEM key."""
    p = Path(path)
    if p.suffix == ".secret":
        return Signer(name, _secret=_secret(p))
    try:
        key = serialization.load_pem_private_key(_read(p, "signing key"), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"signing key {p}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {p}: not an Ed25519 key")
    return Signer(name, _key=key)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    p = Path(path)
    try:
        key = serialization.load_pem_public_key(_read(p, "public key"))
    except ValueError:
        raise ConfigError(f"public key {p}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {p}: not an Ed25519 key")
    return key


def load_keyring(directory: str | Path, *, exclude: str = "") -> Keyring:
    """Every ``*.pub`` and ``*.secret`` in ``directory``, keyed by file stem.

    ``exclude`` leaves one name out (the aggregator does not accept messages signed with
    its own key as a party's).
    """
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"key directory {d} does not exist; make keys with `dfl admin`")
    ring = Keyring()
    for p in sorted(d.iterdir()):
        if p.stem == exclude:
            continue
        if p.suffix == ".pub":
            ring.public[p.stem] = load_public_key(p)
        elif p.suffix == ".secret":
            ring.secrets[p.stem] = _secret(p)
    return ring


class KeyDirectory:
    """The trust of a receiver that reads a key directory (``load_keyring``): a signer the
    ring does not know makes the directory read again if it changed since, so a party added
    later with ``dfl admin`` is taken without a restart. A bad file added at run time keeps
    the old ring (``on_error`` is told why)."""

    def __init__(self, directory: str | Path, *, exclude: str = "",
                 on_error: Callable[[ConfigError], None] | None = None) -> None:
        self.directory = Path(directory)
        self.exclude = exclude
        self.ring = load_keyring(self.directory, exclude=exclude)
        self._mtime = os.stat(self.directory).st_mtime_ns
        self._on_error = on_error

    def verify(self, body: bytes, headers: Mapping[str, Any]) -> str:
        """As ``Keyring.verify``, reading the directory again for an unknown signer."""
        try:
            return self.ring.verify(body, headers)
        except InvalidMessage as exc:
            try:
                mtime = os.stat(self.directory).st_mtime_ns
            except OSError:
                raise exc from None
            if exc.reason != "unknown-signer" or mtime == self._mtime:
                raise
        self._mtime = mtime
        try:
            self.ring = load_keyring(self.directory, exclude=self.exclude)
        except ConfigError as exc:
            if self._on_error is not None:
                self._on_error(exc)
        return self.ring.verify(body, headers)


def aggregator_keyring(path: str | Path) -> Keyring:
    """A worker's trust: the aggregator's public key alone."""
    return Keyring(public={AGGREGATOR: load_public_key(path)})


def signature_headers(signer: Signer | None, body: bytes) -> dict[str, str] | None:
    """The headers to publish ``body`` with: its signature, or ``None`` without a signer."""
    return signer.headers(body) if signer is not None else None
