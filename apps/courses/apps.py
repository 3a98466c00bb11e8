from __future__ import annotations

from django.apps import AppConfig


class CoursesConfig(AppConfig):
    name = "apps.courses"
    label = "courses"
    verbose_name = "Course"
