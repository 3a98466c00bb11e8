from __future__ import annotations

from django.apps import AppConfig


class LtiConfig(AppConfig):
    name = "apps.lti"
    label = "lti"
    verbose_name = "LTI 1.3 (launches from a school's LMS)"

    def ready(self) -> None:
        from apps.lti import scores

        scores.connect_signals()
