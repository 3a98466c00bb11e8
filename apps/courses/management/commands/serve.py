from __future__ import annotations

import asyncio
from argparse import ArgumentParser
from typing import Any, cast

from channels.layers import InMemoryChannelLayer, get_channel_layer
from daphne.endpoints import build_endpoint_description_strings
from daphne.server import Server
from django.conf import settings
from django.core.management.base import BaseCommand
from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.asyncioreactor import AsyncioSelectorReactor

from apps.courses.services import content_sync
from apps.labs.engine import EngineError, get_engine
from apps.labs.services import sandbox_reap
from config import layer
from config.asgi import application
from config.celery import app as celery_app
from config.embedded import EmbeddedCelery, EmbeddedSupervisor

reactor = cast(AsyncioSelectorReactor, _reactor)  # the reactor daphne.server installs


class Command(BaseCommand):
    help = (
        "Serve Distlab over HTTP and WebSocket (Daphne). Without REDIS_URL it also runs "
        "the background worker and scheduler, and the telemetry supervisor, in this process."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--no-worker",
            action="store_true",
            help="Do not start the in-process worker even without REDIS_URL",
        )

    def handle(self, *args: Any, host: str, port: int, no_worker: bool, **opts: Any) -> None:
        report = content_sync()
        self.stdout.write(
            f"content: {report.created + report.updated + report.unchanged} chapters indexed, "
            f"{len(report.problems)} problem(s)"
        )
        for problem in report.problems:
            self.stderr.write(f"  {problem}")
        self._prepare_sandboxes()
        embedded = None
        if settings.CELERY_EMBEDDED_WORKER and not no_worker:
            embedded = EmbeddedCelery(celery_app)
            embedded.start()
        supervisors: list[EmbeddedSupervisor] = []  # started once Daphne's loop exists

        def ready() -> None:
            """Daphne's loop, the one every consumer runs on, exists and is current."""
            if isinstance(get_channel_layer(), InMemoryChannelLayer):
                layer.bind_loop(asyncio.get_event_loop())  # sends from any thread go there
            if settings.SANDBOX_SUPERVISOR_IN_PROCESS:
                supervisors.append(self._start_supervisor())

        if settings.SANDBOX_SUPERVISOR_IN_PROCESS:
            self.stdout.write("telemetry: the supervisor runs in this process")
        elif isinstance(get_channel_layer(), InMemoryChannelLayer):
            self.stderr.write(
                "telemetry: SANDBOX_SUPERVISOR_IN_PROCESS is off and the channel layer is "
                "in-memory, so no live telemetry reaches this server's viewers"
            )
        shown = f"[{host}]" if ":" in host else host
        self.stdout.write(f"Distlab is serving at http://{shown}:{port}/  (Ctrl+C to stop)")
        try:
            Server(
                application=application,
                endpoints=build_endpoint_description_strings(host=host, port=port),
                signal_handlers=True,
                verbosity=0,
                ready_callable=ready,
            ).run()
        finally:
            layer.bind_loop(None)
            for supervisor in supervisors:  # stopped already, unless the reactor never ran
                supervisor.stop()
            if embedded is not None:
                embedded.stop(exiting=True)

    def _start_supervisor(self) -> EmbeddedSupervisor:
        """Start the telemetry supervisor. Daphne calls this just before its reactor runs,
        after making its asyncio loop (the one every consumer runs on) the current one: the
        in-memory channel layer must be used on that loop. The supervisor is stopped before
        the reactor shuts down, so that what it is still sending goes out."""
        layer = get_channel_layer()
        loop = asyncio.get_event_loop() if isinstance(layer, InMemoryChannelLayer) else None
        supervisor = EmbeddedSupervisor(get_engine(), layer, loop=loop)
        supervisor.start()
        reactor.addSystemEventTrigger("before", "shutdown", threads.deferToThread, supervisor.stop)
        return supervisor

    def _prepare_sandboxes(self) -> None:
        """Pick the engine, make sure the sandbox image exists (built once from
        sandboxes/ when Docker is used), and clean up after a crash: housekeeping runs
        at start-up as well as periodically."""
        from apps.labs.engine.docker import DockerEngine
        from apps.labs.image import ImageError, ensure_image

        engine = get_engine()
        if isinstance(engine, DockerEngine):
            try:
                tag = ensure_image(engine.client, log=lambda line: self.stdout.write(f"  {line}"))
            except ImageError as exc:
                self.stderr.write(f"sandboxes: the sandbox image could not be built: {exc}")
                return
            self.stdout.write(f"sandboxes: Docker engine, image {tag}")
        else:
            self.stdout.write(
                "sandboxes: no Docker engine answers, so sandbox nodes run as local "
                "processes with NO isolation (fine on a laptop, not on a shared server)"
            )
        try:
            report = sandbox_reap()
        except EngineError as exc:
            self.stderr.write(f"sandboxes: housekeeping failed: {exc}")
            return
        cleaned = len(report.orphans_removed) + len(report.vanished)
        if cleaned:
            self.stdout.write(f"sandboxes: cleaned up {cleaned} left over from a previous run")
