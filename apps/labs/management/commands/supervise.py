"""Run the telemetry supervisor until SIGTERM or SIGINT (the classroom stack's
``supervisor`` service; ``make run`` starts it inside the web process instead).

One supervisor is active per installation (``apps.labs.lease``): a second one started
by mistake, or kept as a standby, waits and takes over when the active one ends."""

from __future__ import annotations

import signal
import threading
from argparse import ArgumentParser
from types import FrameType
from typing import Any

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.core.management.base import BaseCommand, CommandError

from apps.labs.engine import get_engine
from apps.labs.lease import Lease
from apps.labs.supervisor import Supervisor

STANDBY_POLL_S = 1.0  # how often a standby asks for the lease
LEASE_CHECK_S = 2.0  # how often the active one checks it still holds it


class Command(BaseCommand):
    help = "Follow every running sandbox's telemetry and stream frames and events to viewers."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--interval",
            type=float,
            default=0.125,
            help="Seconds between frames (default 0.125: 8 frames a second)",
        )

    def handle(self, *args: Any, interval: float, **opts: Any) -> None:
        if not 0.05 <= interval <= 1.0:
            raise CommandError("--interval must be from 0.05 to 1.0 seconds")
        layer = get_channel_layer()
        if layer is None:
            raise CommandError("No channel layer is configured (CHANNEL_LAYERS).")
        if isinstance(layer, InMemoryChannelLayer):
            self.stderr.write(
                "supervisor: the channel layer is in-memory, so frames reach only viewers of "
                "this process: set REDIS_URL, or let `manage.py serve` run the supervisor"
            )
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        engine = get_engine()
        self.stdout.write(f"supervisor: {engine.name} engine, a frame every {interval} s")
        lease = Lease("supervisor")
        try:
            while not stop.is_set():
                if not lease.acquire():
                    self._say("standby: another supervisor is active; taking over when it ends")
                    stop.wait(STANDBY_POLL_S)
                    continue
                self._say("active")
                lost = threading.Event()
                watchdog = threading.Thread(
                    target=self._watch_lease, args=(lease, stop, lost), daemon=True
                )
                watchdog.start()
                Supervisor(engine, layer, interval=interval).run(lost)
                watchdog.join()
                if not stop.is_set():
                    self._say("lease lost (the database went away?): supervising stopped")
                    lease.release()
        finally:
            lease.release()
        self.stdout.write("supervisor: stopped")

    _said = ""

    def _say(self, state: str) -> None:
        """A state change, once (a standby does not repeat itself every second)."""
        if state != self._said:
            self._said = state
            self.stdout.write(f"supervisor: {state}")
            self.stdout.flush()

    @staticmethod
    def _watch_lease(lease: Lease, stop: threading.Event, lost: threading.Event) -> None:
        """Sets ``lost`` when told to stop or when the lease is no longer ours."""
        while not stop.wait(LEASE_CHECK_S):
            if not lease.held():
                break
        lost.set()
