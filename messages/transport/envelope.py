"""Checks of a delivery's envelope (properties and headers) before its body is read.

The body has the codec; the envelope is just as much the sender's: a header table can hold any
AMQP field type at any size, ``reply_to`` and ``correlation_id`` any bytes. Whatever a daemon
reads of it, or answers to, passes here first, so that a hostile envelope ends as one dead
letter (``bad-envelope``), never as an exception deep in a reply or a log line.
"""

from __future__ import annotations

import re

from messages.errors import InvalidMessage
from messages.transport.broker import Delivery
from messages.wire.deadletters import ENVELOPE_ERROR_HEADER, broker_may_dead_letter

_REPLY_TO = re.compile(r"^[A-Za-z0-9_.:=+/@-]{1,255}$")
_CORRELATION_ID = re.compile(r"^[\x21-\x7e]{1,255}$")


def check_envelope(d: Delivery, *, replies: bool = False) -> None:
    """Raise ``InvalidMessage("bad-envelope")`` when ``d``'s envelope cannot be trusted to be
    read; with ``replies``, also when its ``reply_to``/``correlation_id`` are not something
    an answer may be addressed to (a direct reply-to address or a plain queue name)."""
    problem = d.headers.get(ENVELOPE_ERROR_HEADER)
    if problem is not None:
        raise InvalidMessage("bad-envelope", repr(problem)[:200])
    if not broker_may_dead_letter(d.headers):
        raise InvalidMessage("bad-envelope", "x-death is the broker's header; a sender's "
                                             "copy of it is forged")
    if not replies:
        return
    if d.reply_to is not None and not (isinstance(d.reply_to, str)
                                       and _REPLY_TO.match(d.reply_to)):
        raise InvalidMessage("bad-envelope", "reply_to is not a queue name")
    if d.correlation_id is not None and not (isinstance(d.correlation_id, str)
                                             and _CORRELATION_ID.match(d.correlation_id)):
        raise InvalidMessage("bad-envelope", "correlation_id is not printable ASCII")
