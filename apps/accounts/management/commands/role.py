from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from apps.accounts.models import User
from apps.accounts.services import user_set_role


class Command(BaseCommand):
    help = "Give a user a role: `manage.py role alice instructor` (or learner)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("username")
        parser.add_argument("role", choices=User.Role.values)

    def handle(self, *args: Any, username: str, role: str, **options: Any) -> None:
        try:
            user = user_set_role(username=username, role=role)
        except (LookupError, ValueError) as exc:
            raise CommandError(str(exc.args[0])) from exc
        self.stdout.write(f"{user.username} is now {user.get_role_display().lower()}.")
