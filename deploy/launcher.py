"""The one-machine federation: an aggregator and N parties in one process.

Each role runs on its own thread with its own broker connection, exactly as the daemons do
over RabbitMQ; with ``memory://`` the broker is in-process too, so nothing needs installing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from aggregator import Aggregator, AggregatorConfig
from messages.errors import FederationError
from worker import Worker, WorkerConfig

log = logging.getLogger("dfl.run")


def run_federation(aggregator_config: AggregatorConfig, worker_configs: Sequence[WorkerConfig],
                   *, progress: bool = True,
                   make_worker: Callable[[WorkerConfig], Worker] = Worker) -> Aggregator:
    """Start the aggregator and the parties, show progress, wait for the end.

    Returns the finished aggregator (``history``, ``status``, ``global_model()``); every
    party has stopped by then. Ctrl-C finishes early but still evaluates and saves the
    final model. A party that fails stops the run with its error. ``make_worker`` builds
    each party (benchmarks pass subclasses that measure or misbehave).
    """
    aggregator = Aggregator(aggregator_config).start()
    workers = [make_worker(c).start() for c in worker_configs]
    bar = tqdm(total=aggregator_config.max_versions, unit="version", desc="federation",
               disable=not progress, dynamic_ncols=True)
    try:
        while not aggregator.wait(0.5):
            status = aggregator.status
            bar.update(max(status.version, 0) - bar.n)
            accuracy = "-" if status.accuracy is None else f"{status.accuracy:.4f}"
            bar.set_postfix(version=status.version, acc=accuracy,
                            upd_s=f"{status.updates_per_second:.1f}",
                            parties=status.active_parties)
            failed = [w for w in workers if w.error is not None]
            if failed:
                aggregator.stop()
                aggregator.wait()
                raise FederationError(f"party {failed[0].config.party} failed: "
                                      f"{failed[0].error}") from failed[0].error
    except KeyboardInterrupt:
        aggregator.stop()
        aggregator.wait()
    finally:
        bar.close()
        for w in workers:
            w.stop()
        deadline = time.monotonic() + 60
        for w in workers:
            try:
                w.wait(max(deadline - time.monotonic(), 0.1))
            except Exception as exc:  # already reported above or logged by the party
                log.warning("party %s ended with an error: %s", w.config.party, exc)
    return aggregator
