"""Celery tasks for LTI: each takes ids and calls ``scores``."""

from __future__ import annotations

from celery import shared_task

from apps.lti import scores


@shared_task(
    name="apps.lti.tasks.send_scores_task",
    autoretry_for=(scores.SendFailed,),
    retry_backoff=30,
    retry_backoff_max=3600,
    max_retries=8,
)
def send_scores_task(user_id: int, chapter_id: int) -> None:
    scores.scores_send(user_id=user_id, chapter_id=chapter_id)
