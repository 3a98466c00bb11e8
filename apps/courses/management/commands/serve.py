from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from daphne.endpoints import build_endpoint_description_strings
from daphne.server import Server
from django.conf import settings
from django.core.management.base import BaseCommand

from apps.courses.services import content_sync
from apps.labs.engine import EngineError, get_engine
from apps.labs.services import sandbox_reap
from config.asgi import application
from config.celery import app as celery_app
from config.embedded import EmbeddedCelery


class Command(BaseCommand):
    help = (
        "Serve Distlab over HTTP and WebSocket (Daphne). Without REDIS_URL it also runs "
        "the background worker and scheduler in this process."
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
        shown = f"[{host}]" if ":" in host else host
        self.stdout.write(f"Distlab is serving at http://{shown}:{port}/  (Ctrl+C to stop)")
        try:
            Server(
                application=application,
                endpoints=build_endpoint_description_strings(host=host, port=port),
                signal_handlers=True,
                verbosity=0,
            ).run()
        finally:
            if embedded is not None:
                embedded.stop()

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
