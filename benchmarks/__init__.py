"""Reproducible performance runs; each module is a command that prints figures and ratios."""
