"""The control protocol: join (welcome), leave, heartbeat and the operators' queries.

``ControlProtocol.handle`` is the aggregator's handler of ``F.control`` (run inside the
delivery boundary): it verifies and decodes a control message, admits joins
(``aggregator.admission``), answers with a welcome (the current model, a fresh seq range and
the training settings), renews leases, answers status/model/start queries, and asks parties
that the aggregator does not know to join again. Like every stage before the strategy, it
refuses a message by raising ``InvalidMessage`` before it changes anything. It works on the
aggregator's state (membership, weights, seq ranges) through the aggregator it serves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from aggregator.admission import Admission
from aggregator.outcomes import DeliveryEvent, Ending
from aggregator.report import status_report
from messages.errors import InvalidMessage
from messages.transport.broker import Delivery
from messages.transport.envelope import check_envelope
from messages.types import Tensors, spec_of
from messages.wire.bounds import MAX_INCARNATION, SEQ_RANGE
from messages.wire.codec import decode, encode
from messages.wire.kinds import Heartbeat, Join, Leave, Query, Report, Welcome
from messages.wire.signing import check_signer, signature_headers

if TYPE_CHECKING:
    from aggregator.service import Aggregator

log = logging.getLogger("dfl.aggregator")
UNSIGNED_START = ("start refused: this federation requires signatures (--keys), so a start "
                  "request must be signed by a key in its key directory (dfl start "
                  "--signing-key FILE)")


class ControlProtocol:
    """Handles ``F.control`` for ``agg`` (see the module docstring)."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.admission = Admission(agg.config.max_parties, agg.config.join_rate)
        self._rejoin_asked_at = 0.0
        self._rejoin_asked: dict[str, float] = {}  # party -> when it alone was asked

    def handle(self, d: Delivery) -> DeliveryEvent:
        """One control message (join, leave, heartbeat, query); raises ``InvalidMessage``
        (dead-lettered by the boundary) before it changes anything."""
        assert self.agg._broker is not None
        check_envelope(d, replies=True)
        signer = self.agg._verified(d, query_ok=True)
        msg = decode(d.body, self.agg.config.max_message_bytes)
        if self.agg._keyring is not None:
            if signer is None and not isinstance(msg, Query):
                raise InvalidMessage("unsigned", f"an unsigned {msg.KIND} message")
            if signer is not None and isinstance(msg, Join | Leave | Heartbeat):
                check_signer(signer, msg.party)
        event = DeliveryEvent(Ending.APPLIED, d.queue, msg.KIND, str(getattr(msg, "party", "")))
        if isinstance(msg, Join):
            # Joins cost a checkpoint and a full model each: new parties are admitted up to
            # --max-parties, and all joins at --join-rate (a refused one is dead-lettered; a
            # genuine party's join times out and is sent again).
            self.admission.admit(msg.party, self.agg.membership)
            # The join is on disk before the party hears of it, so an update it sends
            # next can never reach a restarted aggregator that does not know it.
            welcome = encode(self._welcome(msg))
            self.agg._handled(d)  # the boundary's own _handled(d) after this is a no-op
            self.agg._commit(force=True)
            self.agg._broker.reply(d, welcome, headers=signature_headers(self.agg._signer, welcome))
            return event
        if isinstance(msg, Heartbeat):
            # a lease lives in memory (a restart gives every party a full one): no checkpoint;
            # a state change it causes (a version) marks the state dirty on its own
            self._heard_from(msg.party)
            event = replace(event, durable=False)
        elif isinstance(msg, Query) and msg.what == "start":
            # unlike status and model queries it changes state: with --keys, only a holder
            # of a key in the key directory (a party's, or an operator's) may start training
            if signer is None and self.agg._keyring is not None:
                log.warning("an unsigned start request refused (--keys is on)")
            answer = encode(Report(self.agg._start_training() if signer is not None
                                   or self.agg._keyring is None else {"error": UNSIGNED_START}))
            self.agg._broker.reply(d, answer, headers=signature_headers(self.agg._signer, answer))
        elif (isinstance(msg, Query) and msg.what == "model" and self.agg.weights
              and self.agg.status.version >= 0):  # a model under version -1 cannot decode
            body, headers = self.agg.model_reply()  # encoded and signed once a version
            self.agg._broker.reply(d, body, headers=headers)
            event = replace(event, durable=False)  # read-only
        elif isinstance(msg, Query):
            answer = encode(self._answer(msg))
            self.agg._broker.reply(d, answer, headers=signature_headers(self.agg._signer, answer))
            event = replace(event, durable=False)  # read-only
        elif isinstance(msg, Leave):
            log.info("party %s left (%s)", msg.party, msg.reason or "no reason given")
            if self.agg.membership.leave(msg.party):
                self.agg._parties_changed()
        else:
            raise InvalidMessage("wrong-queue", f"{msg.KIND} does not belong on control")
        return event

    def _heard_from(self, party: str) -> None:
        """A heartbeat: renew the lease; an unknown party alone is asked to join again."""
        if party not in self.agg.membership.parties:
            self.ask_to_rejoin(party)
            return
        was_active = self.agg.membership.parties[party].active
        self.agg.membership.seen(party)
        if not was_active:  # back from an expired lease: sync rounds count it again
            self.agg._parties_changed()

    def ask_to_rejoin(self, party: str) -> None:
        """Ask ``party`` alone (its own model queue) to join again, at most every few seconds.

        A party the aggregator does not know (it restarted from an older checkpoint, or lost
        the party's lease) learns it this way; a made-up party id costs one small message to
        a queue that does not exist, and disturbs no live party.
        """
        now = time.monotonic()
        if self.agg._broker is None or now - self._rejoin_asked.get(party, -1e9) < 5:
            return
        if len(self._rejoin_asked) >= 4 * self.agg.config.max_parties:
            self._rejoin_asked.clear()  # bounded: forgetting only allows one more ask
        self._rejoin_asked[party] = now
        body = encode(Query("rejoin"))
        self.agg._broker.publish("", self.agg.topology.model_queue(party), body,
                             headers=signature_headers(self.agg._signer, body), persistent=False)

    def announce_rejoin(self) -> None:
        """Ask every party to join again (at most every few seconds)."""
        if self.agg._broker is None or time.monotonic() - self._rejoin_asked_at < 5:
            return
        self._rejoin_asked_at = time.monotonic()
        self.agg._to_parties(self.agg._broker, encode(Query("rejoin")))

    def _answer(self, query: Query) -> Report:
        if query.what == "status":
            secure = self.agg.secure
            return Report(status_report(self.agg.config.federation, self.agg.config.strategy,
                                        self.agg.status, self.agg.membership,
                                        time.monotonic() - self.agg._started,
                                        secure=secure.report() if secure else None))
        if query.what == "model":
            return Report({"error": "there is no model yet: no party has joined" if not
                           self.agg.weights else "no model released yet: training has not "
                           "started"})
        return Report({"error": f"unknown query {query.what!r}: ask for status, model or start"})

    def _welcome(self, join: Join) -> Welcome:
        def refuse(reason: str) -> Welcome:
            log.warning("party %s refused: %s", join.party, reason)
            return Welcome(join.party, False, reason, self.agg.status.version, -1, -1, {}, {})

        if not self.agg.weights:
            if not join.tensors:
                return refuse("no initial model: the first party must send its weights")
            self.agg._adopt_initial(join.tensors)
        elif join.tensors and spec_of(join.tensors) != self.agg.spec:
            return refuse("model mismatch: the party's model has other tensor names, dtypes "
                          "or shapes than the federation's (check --model)")
        # a fresh seq range above both the previous range and any seq already applied
        incarnation = max(self.agg.incarnation.get(join.party, 0) + 1,
                          self.agg.applied.last(join.party) // SEQ_RANGE + 1)
        if incarnation > MAX_INCARNATION:
            return refuse(f"joined {MAX_INCARNATION} times: no seq range left; "
                          "remove and add the party again (dfl admin)")
        self.agg.incarnation[join.party] = incarnation
        self.agg.membership.join(join.party, join.num_samples, join.software)
        log.info("party %s joined at version %d (%d samples); %d active", join.party,
                 self.agg.status.version, join.num_samples, len(self.agg.membership.active))
        if self.agg.status.released:
            self.agg._parties_changed()
        elif (self.agg.config.start == "min-parties"
              and len(self.agg.membership.active) >= self.agg.config.min_parties):
            self.agg._release()
        tensors: Tensors = {}
        if self.agg.status.released and self.agg.pushes_models():
            # else the party fetches the model it is welcomed at (aggregator.distribution)
            tensors = dict(zip(self.agg.names, self.agg.weights, strict=True))
        return Welcome(join.party, True, "", self.agg.status.version,
                       self.agg.applied.last(join.party), incarnation * SEQ_RANGE,
                       self.agg.config.settings(), tensors)
