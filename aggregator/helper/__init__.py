"""The helper of secure aggregation (``dfl helper``): the second, non-colluding server that
turns a leader's request for a full buffer into the weighted sum of those updates' masks.

``rules`` decides what the helper may answer (pure), ``store`` keeps that on disk, and
``service`` is the daemon on the broker."""
