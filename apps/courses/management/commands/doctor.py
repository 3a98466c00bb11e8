"""`manage.py doctor`: what stands between this Distlab and a working class, in words a
teacher can act on. Exit status 1 when something must be fixed."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from config import health

MARKS = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}


class Command(BaseCommand):
    help = "Check the database, Redis, the sandbox engine and image, and the course."

    def handle(self, *args: Any, **options: Any) -> None:
        checks = health.run_checks(health.DOCTOR)
        width = max(len(check.name) for check in checks)
        for check in checks:
            style = {"ok": self.style.SUCCESS, "warn": self.style.WARNING}.get(
                check.level, self.style.ERROR
            )
            self.stdout.write(f"{style(MARKS[check.level])} {check.name:<{width}}  {check.detail}")
            if check.advice and check.level != "ok":
                self.stdout.write(f"      {'':<{width}}  → {check.advice}")
        failing = [check.name for check in checks if not check.ok]
        if failing:
            raise CommandError(f"{len(failing)} to fix: {', '.join(failing)}")
        self.stdout.write(
            "Distlab is ready for a class."
            if all(check.level == "ok" for check in checks)
            else "Distlab works; see the warnings above before a class uses it."
        )
