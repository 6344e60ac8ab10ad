"""Staleness weighting functions against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest

from aggregator.staleness import STALENESS_FUNCTIONS, make_staleness
from messages.errors import ConfigError


def test_the_names_on_offer_are_constant_polynomial_and_hinge() -> None:
    assert STALENESS_FUNCTIONS == ("constant", "polynomial", "hinge")


@pytest.mark.parametrize("s", [0, 1, 5, 1000])
def test_constant_weighs_every_staleness_as_one(s: int) -> None:
    assert make_staleness("constant")(s) == 1.0


@pytest.mark.parametrize(("s", "expected"), [(0, 1.0), (3, 0.5), (8, 1 / 3), (15, 0.25)])
def test_polynomial_defaults_to_a_half(s: int, expected: float) -> None:
    assert make_staleness("polynomial")(s) == pytest.approx(expected)


@pytest.mark.parametrize(("s", "expected"), [(0, 1.0), (1, 0.25), (3, 1 / 16)])
def test_polynomial_with_a_two_is_one_over_the_square_of_one_plus_s(
    s: int, expected: float
) -> None:
    assert make_staleness("polynomial", a=2.0)(s) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("s", "expected"), [(0, 1.0), (3, 1.0), (4, 1.0), (5, 1 / 11), (6, 1 / 21), (14, 1 / 101)]
)
def test_hinge_defaults_to_a_ten_b_four(s: int, expected: float) -> None:
    assert make_staleness("hinge")(s) == pytest.approx(expected)


@pytest.mark.parametrize(("s", "expected"), [(0, 1.0), (1, 1 / 1.5), (2, 0.5), (4, 1 / 3)])
def test_hinge_with_b_zero_decays_from_the_first_version(s: int, expected: float) -> None:
    assert make_staleness("hinge", a=0.5, b=0)(s) == pytest.approx(expected)


@pytest.mark.parametrize("name", STALENESS_FUNCTIONS)
def test_every_function_is_one_when_fresh_and_never_grows_with_staleness(name: str) -> None:
    fn = make_staleness(name)
    values = [fn(s) for s in range(50)]
    assert values[0] == 1.0
    assert all(0 < v <= 1 for v in values)
    assert all(later <= earlier for earlier, later in itertools.pairwise(values))


@pytest.mark.parametrize("name", STALENESS_FUNCTIONS)
def test_a_negative_staleness_raises_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        make_staleness(name)(-1)


def test_an_unknown_name_raises_config_error_listing_the_allowed_names() -> None:
    with pytest.raises(ConfigError, match="constant, polynomial, hinge"):
        make_staleness("exponential")


@pytest.mark.parametrize("name", ["polynomial", "hinge"])
@pytest.mark.parametrize("a", [0.0, -1.0, math.nan, math.inf])
def test_a_that_is_not_a_positive_finite_number_raises_config_error(name: str, a: float) -> None:
    with pytest.raises(ConfigError, match="a must be"):
        make_staleness(name, a=a)


def test_a_negative_hinge_b_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="b must be"):
        make_staleness("hinge", b=-1)


def test_parameters_a_function_does_not_use_are_ignored() -> None:
    assert make_staleness("constant", a=-1.0, b=-1)(3) == 1.0
    assert make_staleness("polynomial", b=-1)(3) == pytest.approx(0.5)


def test_the_repr_names_the_function_and_its_parameters() -> None:
    assert repr(make_staleness("hinge")) == "hinge(a=10, b=4)"
    assert repr(make_staleness("polynomial", a=0.5)) == "polynomial(a=0.5)"
    assert repr(make_staleness("constant")) == "constant()"
