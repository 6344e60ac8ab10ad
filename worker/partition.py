"""Seeded, reproducible split of one labelled training set among federated parties.

Every party runs :func:`partition_indices` itself, over the *whole* label array and with the
same seed, and keeps only its own entry. Because all parties' shares are drawn together from
one ``np.random.default_rng(seed)`` stream, the shares are disjoint and agree across processes
without any coordination message. Changing the scheme, its options, the seed, the number of
parties or the label array (including its order) gives a different split, so every party must
be started with identical values.

Schemes:

``"iid"``
    Shuffle, then cut into ``num_parties`` parts whose sizes differ by at most one.
``"dirichlet"``
    Label skew as in NIID-Bench (Li et al. 2022) and FedLab: for each class, draw the parties'
    shares from ``Dirichlet(alpha)``; small ``alpha`` gives each party few classes, large
    ``alpha`` approaches iid. Draws repeat until every party holds at least ``min_size``
    samples.
``"shards"``
    McMahan et al. 2017 pathological non-iid: sort by label, cut into
    ``num_parties * shards_per_party`` equal shards and deal ``shards_per_party`` random shards
    to each party.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np

from messages.errors import ConfigError, DataError
from messages.types import NDArray

Scheme = Literal["iid", "dirichlet", "shards"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
MAX_DIRICHLET_ATTEMPTS = 1000
"""Redraws before giving up; each is one pass over the labels, so this bounds the cost."""


def partition_indices(
    labels: NDArray,
    num_parties: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    shards_per_party: int = 2,
    min_size: int = 10,
    seed: int = 0,
) -> list[NDArray]:
    """Indices into ``labels`` for every party: entry ``i`` is party ``i``'s sorted int64 share.

    ``labels`` must be the 1-D label array of the full training set, in the same order in every
    process. The shares are disjoint and together cover every sample. ``alpha`` only matters
    for ``"dirichlet"``, ``shards_per_party`` only for ``"shards"``; all options are validated
    regardless, so a typo fails at start-up rather than when the scheme is switched.

    For ``"dirichlet"``, ``min_size`` is capped at ``len(labels) // num_parties`` so that
    small data sets stay feasible. Raises ``ConfigError`` for option values that cannot work
    and ``DataError`` when the labels are unusable or no Dirichlet draw met ``min_size``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {labels.shape}; pass labels.ravel()")
    _check_options(len(labels), num_parties, scheme, alpha, shards_per_party, min_size)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_parties)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_parties, alpha, min(min_size, len(labels) // num_parties),
                           rng)
    else:
        parts = _shards(labels, num_parties, shards_per_party, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _check_options(num_samples: int, num_parties: int, scheme: str, alpha: float,
                   shards_per_party: int, min_size: int) -> None:
    """Reject option values that cannot produce a valid split, with a one-line fix."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if num_parties < 1:
        raise ConfigError(f"num_parties must be at least 1, got {num_parties}")
    if num_parties > num_samples:
        raise ConfigError(f"cannot split {num_samples} samples among {num_parties} parties; "
                          "use fewer parties or more data")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"dirichlet alpha must be a positive finite number, got {alpha}; "
                          "try 0.1 (strong skew) to 100 (near iid)")
    if shards_per_party < 1:
        raise ConfigError(f"shards_per_party must be at least 1, got {shards_per_party}")
    if num_parties * shards_per_party > num_samples:
        raise ConfigError(f"{num_parties} parties x {shards_per_party} shards exceeds the "
                          f"{num_samples} samples; lower shards_per_party or num_parties")
    if min_size < 0:
        raise ConfigError(f"min_size must be non-negative, got {min_size}")


def _dirichlet(labels: NDArray, num_parties: int, alpha: float, min_size: int,
               rng: np.random.Generator) -> list[NDArray]:
    """NIID-Bench's label-skew draw, repeated until every party holds ``min_size`` samples.

    As in NIID-Bench, a party that already holds its fair share (``N / num_parties``) gets no
    more samples of later classes; without that cap a small ``alpha`` routinely hands one
    party most of the data set.
    """
    n = len(labels)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        shares: list[list[NDArray]] = [[] for _ in range(num_parties)]
        sizes = np.zeros(num_parties, dtype=np.int64)
        for members in by_class:
            idx = rng.permutation(members)
            p = rng.dirichlet(np.full(num_parties, alpha))
            capped = p * (sizes < n / num_parties)
            # A tiny alpha can underflow every uncapped share to zero; keep the raw draw then.
            p = capped / capped.sum() if capped.sum() > 0 else p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for party, chunk in enumerate(np.split(idx, cuts)):
                shares[party].append(chunk)
                sizes[party] += len(chunk)
        if sizes.min() >= min_size:
            return [np.concatenate(s) for s in shares]
    raise DataError(f"no dirichlet split gave every one of {num_parties} parties {min_size} "
                    f"samples in {MAX_DIRICHLET_ATTEMPTS} draws; raise alpha or use fewer parties")


def _shards(labels: NDArray, num_parties: int, shards_per_party: int,
            rng: np.random.Generator) -> list[NDArray]:
    """McMahan et al.'s shards; shard sizes differ by at most one when N does not divide evenly.

    Samples are shuffled before the stable sort so that which samples of a class share a
    shard depends on the seed, not on the data set's file order.
    """
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_parties * shards_per_party)
    deal = rng.permutation(len(shards)).reshape(num_parties, shards_per_party)
    return [np.concatenate([shards[s] for s in row]) for row in deal]
