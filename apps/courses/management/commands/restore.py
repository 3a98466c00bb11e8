"""``manage.py restore PATH``: read a ``manage.py backup`` file into this installation's
database, which must be empty of accounts (a fresh install: it is migrated first).

Sandboxes that were running when the backup was made are not running here: the next
housekeeping (at start-up with ``make run``, or within a minute on a classroom server)
marks them ended."""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

NOT_EMPTY = (
    "This database already has {n} account(s): restore only into an empty one (a fresh "
    "install, or a new DATABASE_URL), so that nothing is overwritten or mixed."
)


class Command(BaseCommand):
    help = "Read a `manage.py backup` file into an empty database."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("path", help="a file written by `manage.py backup` (.json.gz)")

    def handle(self, *args: Any, path: str, **opts: Any) -> None:
        source = Path(path)
        if not source.is_file():
            raise CommandError(f"No such file: {source}")
        if not source.name.endswith(".json.gz"):
            raise CommandError(f"{source} is not a `manage.py backup` file (.json.gz).")
        call_command("migrate", verbosity=0, interactive=False)
        from apps.accounts.models import User

        users = User.objects.count()
        if users:
            raise CommandError(NOT_EMPTY.format(n=users))
        # Chapters are indexed from the content at start-up; the backup's rows replace them,
        # ids and all, since its progress and answers point at those ids. With no account
        # here, nothing points at the ones this install indexed.
        from apps.courses.models import Chapter

        with transaction.atomic():
            Chapter.objects.all().delete()
            call_command("loaddata", str(source), verbosity=0)
        self.stdout.write(f"restored from {source}: {User.objects.count()} account(s)")
