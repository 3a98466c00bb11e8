from __future__ import annotations

from django.apps import AppConfig


class ClassroomsConfig(AppConfig):
    name = "apps.classrooms"
    label = "classrooms"
    verbose_name = "Classrooms"

    def ready(self) -> None:
        from apps.classrooms import live

        live.connect_signals()
