"""Run the telemetry supervisor until SIGTERM or SIGINT (the classroom stack's
``supervisor`` service; ``make run`` starts it inside the web process instead)."""

from __future__ import annotations

import signal
import threading
from argparse import ArgumentParser
from types import FrameType
from typing import Any

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.core.management.base import BaseCommand, CommandError

from apps.labs.engine import get_engine
from apps.labs.supervisor import Supervisor


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
        Supervisor(engine, layer, interval=interval).run(stop)
        self.stdout.write("supervisor: stopped")
