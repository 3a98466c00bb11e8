"""``manage.py backup [PATH]``: every account, classroom, chapter, progress, quiz answer,
experiment run and sandbox record, as one gzip'd JSON file that ``manage.py restore``
reads back into an empty database (of either kind: SQLite or PostgreSQL).

Left out on purpose: sessions (everyone signs in again), sign-in throttling records, the
admin's change log, and the permission and content-type tables (``migrate`` makes them).
On PostgreSQL, ``pg_dump`` is the other way (README, "Backups")."""

from __future__ import annotations

import gzip
import io
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.utils import timezone

EXCLUDE = ["contenttypes", "auth.permission", "sessions", "admin.logentry", "axes"]


class Command(BaseCommand):
    help = "Write the platform's data to a gzip'd JSON file that `manage.py restore` reads."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "path",
            nargs="?",
            help="where to write it (default: var/backups/distlab-<UTC time>.json.gz)",
        )

    def handle(self, *args: Any, path: str | None, **opts: Any) -> None:
        if path is None:
            stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
            target = Path(settings.VAR_DIR) / "backups" / f"distlab-{stamp}.json.gz"
        else:
            target = Path(path)
        if not target.name.endswith(".json.gz"):
            target = target.with_name(target.name + ".json.gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        data = io.StringIO()
        call_command("dumpdata", natural_foreign=True, exclude=EXCLUDE, stdout=data)
        partial = target.with_name(target.name + ".partial")
        with gzip.open(partial, "wt", encoding="utf-8") as out:
            out.write(data.getvalue())
        partial.replace(target)  # never a half-written backup under the real name
        self.stdout.write(f"backup written: {target} ({target.stat().st_size // 1024} KiB)")
