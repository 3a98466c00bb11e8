"""Celery tasks for classrooms' drills: each takes an id and calls ``drills``."""

from __future__ import annotations

from celery import shared_task

from apps.classrooms import drills


@shared_task(name="apps.classrooms.tasks.drill_inject_task")
def drill_inject_task(drill_id: int) -> None:
    drills.drill_inject(drill_id=drill_id)


@shared_task(
    name="apps.classrooms.tasks.drill_measure_task",
    autoretry_for=(drills.NotReady,),
    retry_backoff=False,
    default_retry_delay=2,
    max_retries=40,
)
def drill_measure_task(drill_id: int) -> None:
    drills.drill_measure(drill_id=drill_id)
