"""The live dashboard's news: which learner changed, told to each of their classrooms.

A learner's row changes when they mark a chapter read, submit a quiz, launch or stop a
sandbox (every state it passes through) or finish an experiment; the roster changes when
someone joins or leaves. Each such save, once its transaction commits, sends one small
message to the channel group of every classroom the learner is in
(``classroom.learner`` or ``classroom.roster``, with ids only). The dashboards open on
that classroom (``consumers.ClassroomConsumer``) gather the ids for a moment and render
the rows themselves, so a burst of changes costs each open dashboard one render, and a
learner in no classroom costs one query.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_save

from apps.classrooms.models import Membership
from apps.courses.models import ChapterProgress, QuizAttempt
from apps.labs.models import ExperimentRun, Sandbox
from config import layer

LEARNER = "classroom.learner"
ROSTER = "classroom.roster"


def group_name(classroom_id: int) -> str:
    return f"classroom.{classroom_id}"


def _send(classroom_ids: list[int], message: dict[str, Any]) -> None:
    for classroom_id in classroom_ids:
        layer.group_send(group_name(classroom_id), message)


def learner_changed(learner_id: int) -> None:
    """After the current transaction commits: the learner's row may have changed."""

    def tell() -> None:
        classrooms = list(
            Membership.objects.filter(user_id=learner_id, left_at__isnull=True).values_list(
                "classroom_id", flat=True
            )
        )
        _send(classrooms, {"type": LEARNER, "learner_id": learner_id})

    transaction.on_commit(tell)


def roster_changed(classroom_id: int) -> None:
    """After the current transaction commits: someone joined or left the classroom."""
    transaction.on_commit(lambda: _send([classroom_id], {"type": ROSTER}))


# --- what changes a row ----------------------------------------------------------------


def _progress_saved(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    if created:
        learner_changed(instance.user_id)


def _sandbox_saved(sender: Any, instance: Sandbox, **kwargs: Any) -> None:
    learner_changed(instance.owner_id)


def _run_saved(sender: Any, instance: ExperimentRun, created: bool, **kwargs: Any) -> None:
    fields = kwargs.get("update_fields")
    if created or fields is None or "state" in fields:
        learner_changed(instance.user_id)


def _membership_saved(sender: Any, instance: Membership, **kwargs: Any) -> None:
    roster_changed(instance.classroom_id)


def connect_signals() -> None:
    """Called once by the app's ``ready``."""
    post_save.connect(_progress_saved, sender=ChapterProgress, dispatch_uid="live-progress")
    post_save.connect(_progress_saved, sender=QuizAttempt, dispatch_uid="live-quiz")
    post_save.connect(_sandbox_saved, sender=Sandbox, dispatch_uid="live-sandbox")
    post_save.connect(_run_saved, sender=ExperimentRun, dispatch_uid="live-run")
    post_save.connect(_membership_saved, sender=Membership, dispatch_uid="live-roster")
