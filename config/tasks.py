"""Queueing background work so that a broker that is away (Redis restarting) never turns
a learner's click into an error page: the work is recorded in the database first, and
housekeeping picks up what was never queued (a launch still requested, a stop or a
fault revert overdue, an experiment past its watchdog). ``queue_task`` logs the refusal and
returns False."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from kombu.exceptions import OperationalError

log = logging.getLogger(__name__)


def queue_task(task: Task[Any, Any], *args: Any, countdown: float = 0) -> bool:
    try:
        task.apply_async(args, countdown=countdown or None)  # type: ignore[arg-type]
    except OperationalError as exc:
        log.warning("could not queue %s%r: %s (housekeeping will pick it up)", task.name, args, exc)
        return False
    return True
