from __future__ import annotations

from celery import shared_task

from apps.courses.services import content_sync


@shared_task(name="apps.courses.tasks.content_sync_task")
def content_sync_task() -> int:
    """Periodic re-index of content/ (so a deployment can update chapters without a
    restart). Returns the number of chapters created or updated."""
    report = content_sync()
    return report.created + report.updated
