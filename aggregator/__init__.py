"""The aggregator: strategies, staleness, membership, evaluation and the service loop.

Python API (for notebooks)::

    from aggregator import Aggregator, AggregatorConfig
    agg = Aggregator(AggregatorConfig(broker="memory://", target_accuracy=0.98)).start()
"""

from aggregator.config import AggregatorConfig
from aggregator.service import Aggregator

__all__ = ["Aggregator", "AggregatorConfig"]
