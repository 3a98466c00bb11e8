from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from daphne.endpoints import build_endpoint_description_strings
from daphne.server import Server
from django.conf import settings
from django.core.management.base import BaseCommand

from apps.courses.services import content_sync
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
