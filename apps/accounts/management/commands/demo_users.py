from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from apps.accounts.services import demo_users_ensure
from apps.classrooms.demo import demo_classroom_ensure


class Command(BaseCommand):
    help = "Create the demo instructor and learner (once) and print their passwords."

    def handle(self, *args: Any, **options: Any) -> None:
        created = demo_users_ensure()
        classroom = demo_classroom_ensure()  # the demo instructor's, with the demo learner
        if classroom is not None:
            self.stdout.write(
                f"Demo classroom {classroom.name!r}: /classrooms/{classroom.pk}/ for the "
                "instructor (fill it with learners: `.venv/bin/python manage.py demo_class`)."
            )
        if not created:
            self.stdout.write(
                "Demo users exist already (instructor, learner); their passwords were "
                "printed when they were created. Reset one with "
                "`.venv/bin/python manage.py changepassword learner`."
            )
            return
        self.stdout.write("Demo users created. These passwords are shown only once:")
        for cred in created:
            self.stdout.write(
                f"  {cred.role:<10}  user: {cred.username:<10}  password: {cred.password}"
            )
