"""The aggregator's checks of an update against the federation (pure, no broker)."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.dedupe import AppliedSeqs
from aggregator.validation import check_update
from messages.errors import InvalidMessage
from messages.wire.kinds import Update

SPEC = [("w", "float32", (1000,))]


def check(values: np.ndarray, max_abs: float) -> Update | None:
    return check_update(Update("p", 0, 0, 10, {"w": values}), parties={"p"}, spec=SPEC,
                        version=0, max_staleness=5, applied=AppliedSeqs(), max_abs=max_abs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_at_the_bound_pass_however_large_their_sum_of_squares(dtype: type) -> None:
    """Every element exactly at |bound|: the one-pass norm test cannot settle it, the exact
    min/max check must, and accept."""
    values = np.full(1000, 3.0, dtype)
    values[::2] = -3.0
    SPEC[0] = ("w", np.dtype(dtype).name, (1000,))
    try:
        assert check(values, 3.0) is not None
        values[7] = np.nextafter(dtype(3.0), dtype(4.0))
        with pytest.raises(InvalidMessage) as info:
            check(values, 3.0)
        assert info.value.reason == "out-of-range"
        values[7] = -4.0
        with pytest.raises(InvalidMessage):
            check(values, 3.0)
    finally:
        SPEC[0] = ("w", "float32", (1000,))


def test_one_large_value_among_small_ones_is_refused() -> None:
    values = np.full(1000, 1e-3, np.float32)
    values[500] = 10.0
    with pytest.raises(InvalidMessage) as info:
        check(values, 5.0)
    assert info.value.reason == "out-of-range"
    assert check(values, 10.0) is not None


def test_no_bound_accepts_huge_finite_values() -> None:
    values = np.full(1000, 1e30, np.float32)  # the float32 sum of squares overflows
    assert check(values, float("inf")) is not None
