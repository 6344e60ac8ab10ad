"""Secure aggregation's pure parts: fixed-point quantization with head room, PRG masks modulo
2^32, and seeds sealed to the helper (no I/O, no broker: the daemons do that)."""
