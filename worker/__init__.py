"""The party daemon: model and data plug-ins, partitions, local training, the service loop.

Python API (for notebooks)::

    from worker import Worker, WorkerConfig
    party = Worker(WorkerConfig(party_id=0, num_parties=2, broker="memory://")).start()
"""

from worker.config import WorkerConfig
from worker.service import Worker

__all__ = ["Worker", "WorkerConfig"]
