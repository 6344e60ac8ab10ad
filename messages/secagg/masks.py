"""Masks from seeds: a cryptographic PRG (ChaCha20) expanded to ``n`` words modulo 2^32.

Each seed is 32 fresh random bytes drawn by a party for one update and used for nothing else,
so ChaCha20's nonce can stay fixed (all zero): the key never repeats. The keystream is read
as little-endian ``uint32`` words; a longer expansion starts with the shorter one.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from messages.types import NDArray

SEED_BYTES = 32
_NONCE = bytes(16)  # ChaCha20 in cryptography: 4-byte counter + 12-byte nonce, all zero


def new_seed() -> bytes:
    """A fresh seed from the operating system's CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def expand(seed: bytes, n: int) -> NDArray:
    """``n`` pseudo-random ``uint32`` words from ``seed`` (deterministic)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed is {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * n))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def weighted_sum(vectors: Sequence[NDArray], weights: Sequence[int]) -> NDArray:
    """``sum w_i * v_i`` modulo 2^32 (``uint32`` arithmetic wraps exactly so)."""
    if len(vectors) != len(weights) or not vectors:
        raise ValueError("one weight per vector, and at least one vector")
    out = np.zeros(vectors[0].shape, dtype=np.uint32)
    tmp = np.empty_like(out)
    for v, w in zip(vectors, weights, strict=True):
        np.multiply(v, np.uint32(w), out=tmp)
        out += tmp
    return out


def mask_sum(seeds: Sequence[bytes], weights: Sequence[int], n: int) -> NDArray:
    """``sum w_i * expand(seed_i, n)`` modulo 2^32, one mask in memory at a time."""
    if len(seeds) != len(weights) or not seeds:
        raise ValueError("one weight per seed, and at least one seed")
    out = np.zeros(n, dtype=np.uint32)
    for seed, w in zip(seeds, weights, strict=True):
        mask = expand(seed, n).copy()  # the keystream's buffer is read-only
        mask *= np.uint32(w)
        out += mask
    return out
