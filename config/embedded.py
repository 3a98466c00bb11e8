"""Background work without Redis: a Celery worker and beat, and the telemetry supervisor,
inside the current process.

Celery's in-memory transport and the in-memory channel layer only connect producers and
consumers in one process, so ``manage.py serve`` starts these next to the web server. The
tasks, countdowns, retries and the beat schedule are the same ones the classroom stack
runs on Redis, and the supervisor is the one ``manage.py supervise`` runs there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from celery import Celery, beat

if TYPE_CHECKING:
    from apps.labs.engine.base import Engine

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

    def stop(self, *, exiting: bool = False) -> None:
        """Stop beat and the worker side by side; the worker finishes the tasks it runs
        (within 10 s). An idle worker notices only at its next broker poll (Celery waits up
        to 2 s): a process about to exit (``exiting``) does not wait for that, since
        nothing is left to do and its threads end with it."""
        from celery.worker import state

        stoppers = [threading.Thread(target=self.worker.stop, kwargs={"in_sighandler": False})]
        if self.beat is not None:
            stoppers.append(threading.Thread(target=self.beat.stop))
        for stopper in stoppers:
            stopper.daemon = True
            stopper.start()
        deadline = time.monotonic() + 10
        while state.active_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        if exiting and not state.active_requests:
            deadline = min(deadline, time.monotonic() + 0.2)
        for thread in (*stoppers, self._thread):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


class EmbeddedSupervisor:
    """The telemetry supervisor (``apps.labs.supervisor``) in a thread of the web process.

    The in-memory channel layer is tied to one event loop: its messages must be sent on
    the loop its consumers run on, so ``loop`` must then be the web server's own loop.
    With Redis the supervisor runs a loop of its own (``loop=None``). ``stop`` sets the
    supervisor's stop event and waits for it to let go of every node."""

    def __init__(
        self, engine: Engine, layer: Any, *, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        from apps.labs.supervisor import Supervisor

        self.supervisor = Supervisor(engine, layer, loop=loop)
        self.stopping = threading.Event()
        self._thread = threading.Thread(
            target=self.supervisor.run, args=(self.stopping,), name="supervisor", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("telemetry supervisor started in-process")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop and wait (idempotent: a second call returns at once)."""
        if self._thread.ident is None or (self.stopping.is_set() and not self._thread.is_alive()):
            return
        self.stopping.set()
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            log.warning("the telemetry supervisor did not stop within %s s", timeout)
        else:
            log.info("telemetry supervisor stopped")
