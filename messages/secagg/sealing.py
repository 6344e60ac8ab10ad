"""Seeds sealed to the helper, and the statement a party signs about them.

A party seals each update's seed to the helper's X25519 public key with HPKE (RFC 9180,
``cryptography``'s implementation: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
ChaCha20-Poly1305, base mode; 80 bytes for a 32-byte seed). The HPKE ``info`` binds the
ciphertext to its federation, party and seq, so the leader cannot pass one party's sealed seed
off as another's or as another update's: the helper opens it only under the context the
request names. Only the helper's private key opens it; the leader and the broker see 80 random
bytes.

The party also signs ``statement(federation, party, seq, sealed)`` with its own Ed25519 key:
the helper checks that signature against its own copy of the parties' public keys, so a
leader cannot invent parties (whose masks it would know) to difference out a real one.

Key files (made by ``dfl admin add-helper``): ``helper-seal.key`` (X25519 private key, PEM,
0600) and ``helper-seal.pem`` (its public key, PEM; not ``.pub``, which key directories read
as Ed25519 signing keys).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from messages.errors import ConfigError, InvalidMessage


@dataclass(frozen=True, slots=True)
class SealedSeed:
    """What travels beside a masked update for the helper: its seq, the sealed seed and the
    party's signature over ``statement(federation, party, seq, sealed)``."""

    seq: int
    sealed: bytes
    signature: bytes


SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)
SEALED_BYTES = 80
"""A sealed 32-byte seed: the 32-byte encapsulated key, 32 bytes of ciphertext, a 16-byte tag."""
SEAL_KEY = "helper-seal.key"
SEAL_PUBLIC = "helper-seal.pem"


def context(federation: str, party: str, seq: int) -> bytes:
    """HPKE ``info``: what a sealed seed belongs to (unambiguous: ids hold no NUL byte)."""
    return b"\0".join((b"dfl-secagg-seed/v1", federation.encode(), party.encode(),
                       seq.to_bytes(8, "big")))


def statement(federation: str, party: str, seq: int, sealed: bytes) -> bytes:
    """The bytes a party signs about its sealed seed (the helper verifies them)."""
    return context(federation, party, seq) + b"\0" + sealed


def seal(seed: bytes, helper: X25519PublicKey, federation: str, party: str, seq: int) -> bytes:
    """``seed`` sealed to ``helper`` for this (federation, party, seq); fresh each call."""
    return SUITE.encrypt(seed, helper, info=context(federation, party, seq))


def open_sealed(sealed: bytes, key: X25519PrivateKey, federation: str, party: str,
                seq: int) -> bytes:
    """The seed in ``sealed``; ``InvalidMessage("unknown-seed")`` when it was not sealed to
    ``key`` for exactly this (federation, party, seq), or was changed."""
    if len(sealed) != SEALED_BYTES:
        raise InvalidMessage("unknown-seed", f"a sealed seed is {SEALED_BYTES} bytes, got "
                                             f"{len(sealed)}")
    try:
        return SUITE.decrypt(sealed, key, info=context(federation, party, seq))
    except (InvalidTag, ValueError):
        raise InvalidMessage("unknown-seed", f"the sealed seed of {party}#{seq} does not open "
                                             "with this helper's key") from None


def make_seal_keys(directory: Path) -> Path:
    """Write ``helper-seal.key`` (0600, refusing to overwrite) and ``helper-seal.pem``;
    returns the public key's path."""
    directory.mkdir(parents=True, exist_ok=True)
    key = X25519PrivateKey.generate()
    private = directory / SEAL_KEY
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{private} exists: remove it first to make a new key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public = directory / SEAL_PUBLIC
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def load_seal_public(path: str | Path) -> X25519PublicKey:
    """The helper's X25519 public key (``helper-seal.pem``); ``ConfigError`` otherwise."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"helper key {path}: {exc.strerror}; make it with `dfl admin "
                          "add-helper`") from None
    except ValueError:
        raise ConfigError(f"helper key {path}: not a PEM public key") from None
    if not isinstance(key, X25519PublicKey):
        raise ConfigError(f"helper key {path}: not an X25519 key (pass helper-seal.pem)")
    return key


def load_seal_private(path: str | Path) -> X25519PrivateKey:
    """The helper's X25519 private key (``helper-seal.key``); ``ConfigError`` otherwise."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"helper key {path}: {exc.strerror}; make it with `dfl admin "
                          "add-helper`") from None
    except (ValueError, TypeError):
        raise ConfigError(f"helper key {path}: not an unencrypted PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(f"helper key {path}: not an X25519 key (pass helper-seal.key)")
    return key
