"""What every strategy shares: ``Contribution``, ``Outcome``, the ``Strategy`` interface, and
buffer helpers. To add a strategy: subclass ``Strategy`` in a module of its own, implement
``offer`` (change ``weights`` in place only when returning ``APPLIED``), ``state`` and
``load_state`` (everything held between applies, for checkpoints), and ``parties_changed`` if
it depends on membership; register its name in ``STRATEGIES`` and ``make_strategy``."""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy.linalg.blas import get_blas_funcs

from messages.secagg.sealing import SealedSeed
from messages.types import NDArray, NDArrays


@dataclass(frozen=True, slots=True)
class Contribution:
    """One party's update, as a strategy sees it.

    ``delta`` is read-only to strategies, but :class:`FedAvg` keeps a reference to it until
    its round closes, so the arrays must not be changed afterwards (arrays decoded from a
    message body are immutable, which is what the aggregator passes). ``num_samples`` is the
    size of the party's training set for this update (>= 1) and ``staleness`` is
    ``current_version - base_version`` (>= 0); ``ValueError`` otherwise.
    """

    party: str
    delta: NDArrays
    num_samples: int
    staleness: int
    scale: float = 1.0
    """The factor the delta counts with: a stage before the strategy (``Clipped``) sets it,
    instead of writing a scaled copy of the delta; strategies fold it into their own
    multiply."""
    sealed: SealedSeed | None = None
    """Secure aggregation: ``delta`` is masked ``uint32`` words and this is the update's seq
    and sealed seed (only :class:`SecureFedBuff` takes such a contribution)."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")


class Outcome(enum.Enum):
    """What :meth:`Strategy.offer` did with a contribution."""

    APPLIED = "applied"
    """The global weights changed: bump the version and broadcast them."""
    BUFFERED = "buffered"
    """The contribution was kept for a later apply; the weights are unchanged."""
    DISCARDED = "discarded"
    """The contribution was not used (late for a sync round, a duplicate, an unknown party)."""


def axpy(a: float, x: NDArray, y: NDArray) -> None:
    """``y += a * x`` in place in one pass over memory and no temporary: BLAS axpy (through
    scipy) for contiguous float32/float64 arrays of one dtype, numpy otherwise. ``x`` is only
    read."""
    yf, xf = y.reshape(-1), x.reshape(-1)
    if (y.dtype == x.dtype and y.dtype in _AXPY and yf.flags.c_contiguous
            and np.shares_memory(yf, y)):
        out = _AXPY[y.dtype](xf, yf, a=a)
        if out is yf or np.shares_memory(out, yf):
            return
        yf[...] = out  # BLAS made a copy (cannot happen for contiguous arrays; kept safe)
        return
    y += np.multiply(x, a, dtype=y.dtype)


_AXPY = {np.dtype(np.float32): get_blas_funcs("axpy", dtype=np.float32),
         np.dtype(np.float64): get_blas_funcs("axpy", dtype=np.float64)}


def _check_shapes(weights: Sequence[NDArray], delta: Sequence[NDArray], what: str) -> None:
    """``ValueError`` unless ``delta`` has one array per weight tensor, of the same shape.

    Checked explicitly because numpy broadcasting would otherwise silently accept some
    mismatches (a ``(1,)`` delta added to a ``(10,)`` weight).
    """
    if len(delta) != len(weights):
        raise ValueError(f"{what} has {len(delta)} tensors, the model has {len(weights)}")
    for i, (w, d) in enumerate(zip(weights, delta, strict=True)):
        if w.shape != d.shape:
            raise ValueError(f"{what} tensor {i} has shape {d.shape}, the model has {w.shape}")


def _buffers_like(buffers: list[NDArray] | None, weights: NDArrays) -> list[NDArray]:
    """``buffers`` if they match ``weights`` in shape and dtype, else fresh zeroed ones."""
    if buffers is not None and len(buffers) == len(weights) and all(
        b.shape == w.shape and b.dtype == w.dtype for b, w in zip(buffers, weights, strict=True)
    ):
        return buffers
    return [np.zeros(w.shape, dtype=w.dtype) for w in weights]


def _load_optimizer(optimizer: Any, state: dict[str, Any]) -> None:
    """Restore a strategy's server optimizer from its snapshot (none saved before server
    optimizers existed: the optimizer starts fresh, as plain FedBuff never had state)."""
    saved = state.get("optimizer")
    if saved:
        optimizer.load_state(saved)


def _check_name(state: dict[str, Any], name: str) -> None:
    """``ValueError`` when ``state`` was saved by a different strategy."""
    saved = state.get("strategy")
    if saved != name:
        raise ValueError(f"state was saved by strategy {saved!r}, cannot load it into {name!r}")


class Strategy(abc.ABC):
    """Base class of the aggregation strategies."""

    name: ClassVar[str]
    """The strategy's name in :data:`STRATEGIES` (and in configuration and logs)."""

    @abc.abstractmethod
    def offer(self, weights: NDArrays, c: Contribution) -> Outcome:
        """Give the strategy one contribution; it may change ``weights`` in place.

        Returns :attr:`Outcome.APPLIED` exactly when ``weights`` changed. Raises ``ValueError``
        when the delta's shapes do not match ``weights``.
        """

    def parties_changed(self, weights: NDArrays, active: frozenset[str]) -> bool:
        """Tell the strategy the set of active parties is now ``active`` (the whole set).

        Returns True when this changed ``weights`` in place (the caller then bumps the
        version and broadcasts). Asynchronous strategies do not depend on membership, so the
        default does nothing and returns False.
        """
        del weights, active
        return False

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """A snapshot of everything held between applies, for a checkpoint.

        Values are ``str``, ``int``, ``float``, lists of those, lists of numpy arrays or
        lists of such lists; key ``"strategy"`` is the strategy's name. The snapshot does not
        change when the strategy goes on (buffers are copied).
        """

    @abc.abstractmethod
    def load_state(self, state: dict[str, Any]) -> None:
        """Replace what the strategy holds with a snapshot from :meth:`state`.

        Raises ``ValueError`` when the snapshot is from another strategy. The strategy's own
        options (alpha, k, eta, staleness function) are not part of the snapshot.
        """
