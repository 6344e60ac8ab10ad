"""The message kinds that travel between parties and the aggregator.

Each kind is a plain dataclass; ``messages.wire.codec`` turns them into msgpack maps and back and
checks every field's type on the way in. Field annotations are the schema: the codec reads
them, so adding a field here is the whole change (old peers ignore unknown keys; a new
required field needs a schema version bump).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

from messages.types import Document, Settings, Tensors


@dataclass(slots=True)
class Update:
    """A party's weight delta ``w_local - w_base`` trained from model version ``base_version``.

    ``(party, seq)`` is unique per update: ``seq`` increases by one per update a party sends,
    across restarts, so the aggregator can drop redeliveries and replays.
    """

    KIND: ClassVar[str] = "update"
    party: str
    seq: int
    base_version: int
    num_samples: int
    tensors: Tensors
    metrics: dict[str, float] = field(default_factory=dict)
    encoding: str = "float32"
    sent_at: float = field(default_factory=time.time)
    sealed_seed: bytes = b""
    """Secure aggregation only: the seed of this update's mask, sealed to the helper
    (``messages.secagg.sealing``). Non-empty exactly when ``tensors`` are masked ``uint32``
    words (``q(delta) + PRG(seed) mod 2^32``) instead of a float delta."""
    seed_signature: bytes = b""
    """The party's Ed25519 signature over ``(federation, party, seq, sealed_seed)``, which the
    helper checks against its own copy of the parties' keys."""


@dataclass(slots=True)
class Model:
    """A global model version, broadcast on the ``F.models`` fanout."""

    KIND: ClassVar[str] = "model"
    version: int
    tensors: Tensors
    created_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class Join:
    """A party asks to take part (RPC on ``F.control``; the reply is a ``Welcome``).

    ``tensors`` holds the party's freshly initialised weights: the aggregator adopts the first
    ones it sees as version 0 when it was not given a starting model, so the aggregator never
    needs TensorFlow to build a model (as Flower asks a client for initial parameters).
    """

    KIND: ClassVar[str] = "join"
    party: str
    num_samples: int
    tensors: Tensors
    software: str = ""
    sent_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class Welcome:
    """The aggregator's answer to a ``Join``.

    When ``accepted`` is false, ``reason`` says why and the party must stop. ``tensors`` is the
    current global model (empty until ``--min-parties`` have joined: the first model then comes
    on the party's model queue). ``last_seq`` is the last ``seq`` the aggregator holds for this
    party; ``next_seq`` is where the party must continue: it starts a fresh range above every
    ``seq`` the party may have sent before (even updates still queued), so a restarted party's
    new updates are never mistaken for duplicates of its old ones.
    """

    KIND: ClassVar[str] = "welcome"
    party: str
    accepted: bool
    reason: str
    version: int
    last_seq: int
    next_seq: int
    settings: Settings
    tensors: Tensors


@dataclass(slots=True)
class Leave:
    """A party says goodbye (SIGTERM, end of data); the aggregator stops waiting for it."""

    KIND: ClassVar[str] = "leave"
    party: str
    reason: str = ""


@dataclass(slots=True)
class Heartbeat:
    """A party is alive (sent while it trains); renews its membership lease."""

    KIND: ClassVar[str] = "heartbeat"
    party: str
    version: int
    sent_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class Stop:
    """The federation is over (target or limit reached); workers exit when they see it."""

    KIND: ClassVar[str] = "stop"
    version: int
    reason: str


@dataclass(slots=True)
class Query:
    """An operator's question to the aggregator (RPC on ``F.control``).

    ``what`` is ``"status"`` (answered with a ``Report``), ``"model"`` (answered with the
    current ``Model``, for exporting it from any host) or ``"start"`` (release model version
    0 now, answered with a ``Report``; with ``--keys`` it must be signed by a known key).
    """

    KIND: ClassVar[str] = "query"
    what: str


@dataclass(slots=True)
class Report:
    """The aggregator's answer to a status query: plain data (see ``dfl status --json``)."""

    KIND: ClassVar[str] = "report"
    data: Document


@dataclass(slots=True)
class MaskRequest:
    """The leader asks the helper for the weighted sum of the masks of a full buffer.

    Entry ``i`` is update ``seqs[i]`` of ``parties[i]`` with integer weight ``weights[i]``,
    its sealed seed and the party's signature over it (forwarded from the update); ``length``
    is how many ``uint32`` words each mask expands to. ``request`` numbers the leader's
    requests: a retry of the same request carries the same number and the same entries.
    """

    KIND: ClassVar[str] = "mask-request"
    request: int
    parties: list[str]
    seqs: list[int]
    weights: list[int]
    sealed: list[bytes]
    signatures: list[bytes]
    length: int


@dataclass(slots=True)
class MaskSum:
    """The helper's answer to a ``MaskRequest``: ``tensors`` holds one flat ``uint32`` tensor
    ``"sum"`` (the weighted sum of the masks modulo 2^32) when ``accepted``; otherwise it is
    empty and ``reason`` says why the helper refused."""

    KIND: ClassVar[str] = "mask-sum"
    request: int
    accepted: bool
    reason: str
    tensors: Tensors


@dataclass(slots=True)
class Partial:
    """An edge aggregator's partial FedBuff sum, sent to the root on ``F.partials``.

    Member ``i`` is update ``seqs[i]`` of ``parties[i]``, trained from ``bases[i]`` on
    ``samples[i]`` examples. ``tensors`` holds ``sum_i n_i * S(version - bases[i]) * d_i`` and
    ``weight`` the sum of those weights, with staleness measured against ``version``, the
    newest root version the edge knew when it built the sum. ``number`` counts the edge's
    partials; a partial sent again after a lost answer has the same members (see
    ``aggregator.partials``).
    """

    KIND: ClassVar[str] = "partial"
    edge: str
    number: int
    version: int
    parties: list[str]
    seqs: list[int]
    bases: list[int]
    samples: list[int]
    weight: float
    tensors: Tensors


@dataclass(slots=True)
class Taken:
    """The root's answer to a ``Partial``.

    ``parties``/``seqs``/``reasons`` name the members the root could not take now, each with
    its reason (``duplicate`` for one its state already holds, or why it is refused).
    ``accepted``: the root's state holds every member (applied now, or all named duplicates:
    an answer lost on its way, a partial sent again); the edge acks the members' updates.
    Else nothing was applied; the edge settles the named members and sends the others again
    in a new partial.
    ``version`` is the root's version now.
    """

    KIND: ClassVar[str] = "taken"
    number: int
    accepted: bool
    version: int
    parties: list[str]
    seqs: list[int]
    reasons: list[str]


Message = (Update | Model | Join | Welcome | Leave | Heartbeat | Stop | Query | Report
           | MaskRequest | MaskSum | Partial | Taken)

KINDS: dict[str, type[Message]] = {
    cls.KIND: cls for cls in (Update, Model, Join, Welcome, Leave, Heartbeat, Stop, Query, Report,
                              MaskRequest, MaskSum, Partial, Taken)
}
