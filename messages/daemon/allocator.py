"""Keep freed message buffers in the heap, so the next message of the same size reuses them.

glibc serves every allocation above its mmap threshold (at most 32 MiB however it adapts)
from fresh ``mmap`` pages and unmaps them on free. A daemon that encodes and decodes a
40 MB update (10M parameters) per message therefore faults in 10,000 new pages for every
buffer: measured here, encoding such an update took 23 ms against 2.9 ms with the buffers
reused, and a plain copy of the same bytes 2.6 ms (``python -m benchmarks.codec``).
Raising the mmap and trim thresholds to 1 GiB makes freed buffers stay in the heap for the
next message; the price is that the process keeps its peak heap instead of handing it back
to the OS, which for a daemon that handles same-sized messages all day is what it needs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("dfl")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


@functools.cache
def keep_large_buffers(limit: int = 1 << 30) -> bool:
    """Tune glibc's malloc once per process; False where there is no glibc ``mallopt``."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to do
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))
    log.debug("malloc keeps freed buffers up to %d bytes: %s", limit, done)
    return done
