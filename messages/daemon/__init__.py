"""Daemon plumbing: layered settings, command-line helpers, plug-in loading (the one place
that imports Keras here), Prometheus metrics and the allocator tweak."""
