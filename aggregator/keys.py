"""The key directory of an aggregator and of its edges (``--keys``, made by ``dfl admin``)."""

from __future__ import annotations

import logging

from messages.wire.signing import AGGREGATOR, KeyDirectory

log = logging.getLogger("dfl.aggregator")


def party_keys(keys_dir: str) -> KeyDirectory:
    """The parties' keys in ``keys_dir``, the aggregator's own left out (no message signed
    with the aggregator's key is taken as a party's); read again when an unknown signer
    appears after ``dfl admin`` added a party (``KeyDirectory``)."""
    return KeyDirectory(keys_dir, exclude=AGGREGATOR, on_error=lambda exc: log.error(
        "key directory not re-read: %s", exc))
