"""How a new global model reaches the parties: pushed on the fanout, or announced and fetched.

- **push**: the model itself goes on ``F.models``; the broker copies it to every party's
  queue (max-length 1, drop-head). A party receives every version that arrives while it
  listens, so with P parties each version costs P model transfers out of the broker, most
  of them to parties that will never train on that version (a party trains on one version a
  round). Cheapest in latency for a handful of parties: no round trip before a round.
- **announce**: only the version goes on ``F.models`` (a ``Model`` without tensors, a few
  bytes); a party that is about to train and finds a newer version announced asks for the
  model (``Query("model")`` on ``F.control``, answered in chunks when big) and gets the
  newest one, so it never trains on an older model than it could have had, and it receives
  at most one model per round whatever the number of parties or versions. The aggregator
  encodes and signs each version once for all its fetches (``ModelReplies``).

The aggregator announces when the model would not fit one chunk (a party's queue holds one
message, so chunks would drop each other) or when more than ``--push-max-parties`` parties
are active; otherwise it pushes. Pure, but for the cached reply's encoding.
"""

from __future__ import annotations

from collections.abc import Callable


def push_model(model_bytes: int, active_parties: int, *, max_chunk_bytes: int,
               push_max_parties: int) -> bool:
    """Whether the next broadcast carries the model (True) or only announces its version."""
    return model_bytes <= max_chunk_bytes and active_parties <= push_max_parties


class ModelReplies:
    """The answer to ``Query("model")``, encoded and signed once per model version.

    ``body(key, make)`` returns the cached ``(body, headers)`` while ``key`` (the version and
    a generation that changes whenever the weights may have) is unchanged, else ``make()``'s.
    """

    def __init__(self) -> None:
        self._key: object = None
        self._reply: tuple[bytes, dict[str, str] | None] | None = None

    def body(self, key: object, make: Callable[[], tuple[bytes, dict[str, str] | None]]
             ) -> tuple[bytes, dict[str, str] | None]:
        if self._reply is None or key != self._key:
            self._reply, self._key = make(), key
        return self._reply
