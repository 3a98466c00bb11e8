"""The Celery application.

With ``REDIS_URL`` set, tasks go through Redis to ``celery -A config worker`` and ``beat``.
Without it, the broker is Celery's in-memory transport and ``manage.py serve`` runs a
worker with embedded beat inside the web process (see ``apps/courses/embedded.py``).
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("distlab")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
