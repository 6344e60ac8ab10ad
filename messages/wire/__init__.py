"""The wire: message kinds, the codec and its bounds, compression, chunks, signatures and
dead-letter records. Pure: no I/O, and nothing above it (transport, daemon plumbing)."""
