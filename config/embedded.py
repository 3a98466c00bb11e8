"""Background work without Redis: a Celery worker and beat inside the current process.

Celery's in-memory transport only connects producers and consumers in one process, so
``manage.py serve`` starts this next to the web server. The tasks, countdowns, retries
and the beat schedule are the same ones the classroom stack runs on Redis.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, beat

log = logging.getLogger(__name__)


class EmbeddedCelery:
    """A threaded Celery worker plus an embedded beat, for the in-memory broker."""

    def __init__(self, app: Celery, *, concurrency: int = 2, with_beat: bool = True) -> None:
        if not str(app.conf.broker_url).startswith("memory://"):
            raise RuntimeError("the embedded worker is only for the in-memory broker")
        self.app = app
        # Poll the in-memory queues often: task latency is bounded by this interval.
        app.conf.broker_transport_options = {"polling_interval": 0.05}
        self.worker: Any = app.WorkController(
            pool_cls="threads",
            concurrency=concurrency,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            hostname="embedded@distlab",
        )
        self.beat: Any = (
            beat.EmbeddedService(app, thread=True, scheduler_cls="celery.beat:Scheduler")
            if with_beat
            else None
        )
        self._thread = threading.Thread(target=self.worker.start, name="celery", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if self.beat is not None:
            self.beat.start()
        log.info("embedded Celery worker started (in-memory broker)")

    def stop(self) -> None:
        if self.beat is not None:
            self.beat.stop()
        self.worker.stop(in_sighandler=False)
        self._thread.join(timeout=10)
