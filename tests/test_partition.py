"""Partitions are disjoint, complete, reproducible, and skewed the way each scheme promises."""

from __future__ import annotations

import numpy as np
import pytest

from messages.errors import ConfigError, DataError
from messages.types import NDArray
from worker.partition import SCHEMES, partition_indices

NUM_CLASSES = 10


def balanced_labels(per_class: int = 100) -> NDArray:
    """Labels 0-9, ``per_class`` of each, in a shuffled order like a real data set."""
    rng = np.random.default_rng(123)
    return rng.permutation(np.repeat(np.arange(NUM_CLASSES), per_class))


def dominant_share(labels: NDArray, parts: list[NDArray]) -> float:
    """Mean over parties of the fraction of a party's samples that are its commonest label."""
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_splits_all_samples_into_disjoint_sorted_int64_shares(scheme: str) -> None:
    labels = balanced_labels()
    parts = partition_indices(labels, 7, scheme, seed=1)
    assert len(parts) == 7
    assert sum(len(p) for p in parts) == len(labels)
    merged = np.concatenate(parts)
    assert np.array_equal(np.sort(merged), np.arange(len(labels)))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)


def test_iid_share_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in partition_indices(balanced_labels(), 7, "iid")]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_with_small_alpha_skews_labels_far_more_than_iid() -> None:
    labels = balanced_labels()
    iid = dominant_share(labels, partition_indices(labels, 10, "iid"))
    skewed = dominant_share(labels, partition_indices(labels, 10, "dirichlet", alpha=0.1))
    assert skewed > iid + 0.3


def test_dirichlet_with_large_alpha_approaches_iid() -> None:
    labels = balanced_labels()
    iid = dominant_share(labels, partition_indices(labels, 10, "iid"))
    parts = partition_indices(labels, 10, "dirichlet", alpha=1000.0)
    # Near-exact proportions are at least as balanced as a random shuffle, never worse.
    assert dominant_share(labels, parts) <= iid + 0.02
    assert all(abs(len(p) - 100) <= 10 for p in parts)


def test_dirichlet_gives_every_party_at_least_min_size_samples() -> None:
    parts = partition_indices(balanced_labels(), 10, "dirichlet", alpha=0.1, min_size=30)
    assert min(len(p) for p in parts) >= 30


def test_dirichlet_that_cannot_meet_min_size_raises_data_error() -> None:
    labels = balanced_labels()
    with pytest.raises(DataError, match="raise alpha"):
        partition_indices(labels, 10, "dirichlet", alpha=0.01, min_size=len(labels) // 10)


def test_shards_give_each_party_at_most_shards_per_party_labels() -> None:
    # 10 classes x 100 samples cut into 20 shards of 50: every shard holds a single label.
    labels = balanced_labels()
    parts = partition_indices(labels, 10, "shards", shards_per_party=2, seed=3)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert all(len(p) == 100 for p in parts)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_gives_identical_split_and_other_seed_differs(scheme: str) -> None:
    labels = balanced_labels()
    first = partition_indices(labels, 5, scheme, seed=7)
    again = partition_indices(labels, 5, scheme, seed=7)
    other = partition_indices(labels, 5, scheme, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_one_party_gets_everything() -> None:
    labels = balanced_labels(3)
    (only,) = partition_indices(labels, 1, "dirichlet")
    assert np.array_equal(only, np.arange(len(labels)))


@pytest.mark.parametrize(("args", "options", "fragment"), [
    ((10, "random"), {}, "unknown partition scheme"),
    ((0,), {}, "at least 1"),
    ((31,), {}, "cannot split 30 samples"),
    ((3, "dirichlet"), {"alpha": 0.0}, "alpha"),
    ((3, "dirichlet"), {"alpha": float("nan")}, "alpha"),
    ((3, "shards"), {"shards_per_party": 0}, "shards_per_party"),
    ((10, "shards"), {"shards_per_party": 4}, "exceeds"),
    ((3, "dirichlet"), {"min_size": -1}, "min_size"),
])
def test_bad_arguments_raise_config_error(args: tuple[object, ...], options: dict[str, float],
                                          fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        partition_indices(balanced_labels(3), *args, **options)  # type: ignore[arg-type]


def test_labels_that_are_not_one_dimensional_raise_data_error() -> None:
    with pytest.raises(DataError, match="ravel"):
        partition_indices(np.zeros((10, 1), dtype=np.int64), 2)
