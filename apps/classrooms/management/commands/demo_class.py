from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from apps.classrooms.demo import DEMO_CLASSROOM, demo_class_seed


class Command(BaseCommand):
    help = (
        f"Seed the demo classroom ({DEMO_CLASSROOM!r}) with a few learners who have read, "
        "answered quizzes and run experiments, so the instructor dashboard is filled."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            classroom, made = demo_class_seed()
        except LookupError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"{classroom.name}: {len(made)} learner(s) seeded now "
            f"({classroom.memberships.filter(left_at__isnull=True).count()} in the class). "
            f"Sign in as the demo instructor and open /classrooms/{classroom.pk}/."
        )
