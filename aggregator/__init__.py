"""The aggregator: merges party updates into the global model and publishes new versions."""
