"""The bound of every integer, string and collection a message may carry.

``messages.wire.codec`` refuses, on the way in, any value outside these bounds, so that nothing
decoded from the network can later make the aggregator fail or blow up when it encodes what
it learnt: welcomes (msgpack), checkpoints (msgpack), the status report (JSON), Prometheus
metric labels and log lines. Each bound says why it has the value it has; they are defined
here once, for the codec, the topology and the aggregator alike.

This module is pure: it imports nothing of the project.
"""

from __future__ import annotations

import re

PARTY_ID = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
"""A party id (and a federation id): 1-64 ASCII letters, digits, ``-`` or ``_``.

The pattern is anchored at the very end of the string: ``$`` would also match before a
final newline, so a party id ending in a newline would pass ``match``.

Party ids become RabbitMQ queue names (``F.models.<party>``, 255 bytes at most) and user
names, Prometheus label values, keys of the checkpoint and of the status report, and words
of log lines: no dots (queue-name separators), no spaces, newlines or other control
characters (log injection), nothing a permission regex would read as syntax."""

MAX_INT = 2**53 - 1
"""The largest integer any field may hold (and the smallest is ``-MAX_INT``).

Every integer from -2**53 to 2**53 is exact in an IEEE double, so JSON readers that parse
numbers as floats (JavaScript, jq, Grafana), Prometheus (float64 samples) and msgpack (int64)
all see the value that was sent; it also leaves room for ``+ 1`` and for the aggregator's
seq arithmetic without ever reaching 2**63."""

SEQ_RANGE = 1 << 32
"""Each join of a party opens a fresh range of ``seq`` numbers this wide (``next_seq`` in
the welcome is ``incarnation * SEQ_RANGE``): 4 billion updates per incarnation, more than a
party sends in any run."""

MAX_INCARNATION = MAX_INT // SEQ_RANGE - 1
"""The largest incarnation (join count) of a party, 2**21 - 2, chosen so that the whole seq
range of the last incarnation fits: ``MAX_INCARNATION * SEQ_RANGE + SEQ_RANGE <= MAX_INT``.
A join that would need a larger one must be refused."""

MAX_SEQ = (MAX_INCARNATION + 1) * SEQ_RANGE - 1
"""The largest ``seq`` of an update and ``last_seq`` of a welcome: the last seq of the last
incarnation's range (2**53 - 2**32 - 1). Larger ones could only come from a party that
skipped ranges; the aggregator derives the next incarnation from them."""

MAX_NEXT_SEQ = MAX_INCARNATION * SEQ_RANGE
"""The largest ``next_seq`` of a welcome: the start of the last incarnation's range."""

MAX_VERSION = MAX_INT
"""The largest model version (one per applied update or round: never reached in practice);
versions are subtracted from each other (staleness) and sent back in models and reports."""

MAX_SAMPLES = 10**9
"""The largest declared sample count of a party: bigger ones are absurd and would let one
party outweigh everyone in sample-weighted averaging."""

MAX_REASON = 512
"""Characters of a free-text reason (a refusal in a welcome, a leave, a stop). Reasons are
logged and shown by ``dfl status``; the longest the project writes is about 120."""

MAX_SOFTWARE = 128
"""Characters of the software string a party announces in its join (``dfl/<version>
schema/<n>``, about 20); it is shown per party in the status report."""

MAX_WORD = 64
"""Characters of a one-word field: a query's ``what`` (``status``, ``model``, ``rejoin``)."""

MAX_KEY = 64
"""Characters of a key of an update's metrics or of a welcome's settings (``loss``,
``train_seconds``, ``learning_rate``, ...): they appear in logs and the status report."""

MAX_SETTING_TEXT = 256
"""Characters of a string value among a welcome's settings (``strategy``: ``fedasync``)."""

MAX_TENSOR_NAME = 256
"""Characters of a tensor name: Keras weight paths such as ``sequential/conv2d/kernel``;
names are stored in checkpoints and printed in validation errors."""

MAX_METRICS = 64
"""Entries of an update's metrics map (a party sends about five: loss, accuracy,
train_seconds, epsilon). The aggregator keeps the last map of every party in memory and in
its status report, so the number of entries must not grow with what a party chooses."""

MAX_SETTINGS = 64
"""Entries of a welcome's settings map (the aggregator sends five)."""

MAX_TENSORS = 4096
"""Tensors per message: a model's weight arrays (the built-in CNN has 8; ResNet-152 about
900). Each costs a few hundred bytes of bookkeeping per party, per checkpoint."""

MAX_NDIM = 32
"""Dimensions of one tensor (numpy 1.x's limit; a weight has at most 5)."""

MAX_DIM = 2**31 - 1
"""The largest single dimension of a tensor (int32, as TensorFlow shapes are)."""

MAX_TENSOR_ELEMENTS = 2**40
"""The most elements a tensor's shape may describe, counting a zero dimension as one: data
must fill the shape, so a non-empty tensor is also bounded by the body's size, but an empty
one (a zero dimension) could otherwise claim absurd other dimensions, which numpy refuses or
which overflow whatever multiplies them out later. 2**40 float32s is 4 TiB: no model."""

MAX_DOCUMENT_ITEMS = 1 << 20
"""Values (scalars, lists and maps, counted together) in a report's document: a status
report holds about 15 per party, so this allows some 70,000 parties."""

MAX_DOCUMENT_DEPTH = 16
"""Nesting of lists and maps in a report's document (a status report nests 3 deep)."""

MAX_DOCUMENT_TEXT = 4096
"""Characters of a string or key in a report's document (party ids, reasons, software)."""

SEQ_AHEAD = 1 << 16
"""How far past the last seq applied (or its range's start) an update's seq may run: more
updates than a party can have dead-lettered or in flight in a row, and the most an update with
a forged seq can skip the real party ahead by (see ``aggregator.validation.seq_window``)."""

MAX_SECRET_BYTES = 256
"""Longest sealed seed or seed signature (80 and 64 bytes today: room for other suites)."""

MAX_MASK_SET = 4096
"""Most updates one secure-aggregation request may name (a FedBuff buffer)."""

MAX_MASK_WEIGHT = 1 << 16
"""Largest integer weight of one update in a masked sum (the helper's own cap is lower)."""

MAX_MASK_WORDS = 1 << 31
"""Most words a mask may expand to (8 GiB of uint32: far past any model a queue carries)."""
