from __future__ import annotations

from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A Distlab user: a learner unless an admin or `manage.py role` makes them an instructor."""

    class Role(models.TextChoices):
        LEARNER = "learner", "Learner"
        INSTRUCTOR = "instructor", "Instructor"

    role = models.CharField(max_length=16, choices=Role.choices, default=Role.LEARNER)

    def __str__(self) -> str:
        return self.username

    @property
    def is_instructor(self) -> bool:
        return self.role == self.Role.INSTRUCTOR or self.is_superuser
