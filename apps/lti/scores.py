"""Scores back to the LMS (Assignment and Grade Services).

A chapter's score is the CSV export's (README, "Classrooms"): ``read`` (1) + ``quiz best``
(of its questions) + ``experiments passed`` (of the chapter's experiments); the maximum is
1 + questions + experiments. It is "Completed" once every point is earned.

Whenever a learner's progress on a chapter changes (read, a quiz attempt, an experiment
checked) and some LMS assignment links to that chapter for them (a ``ScoreLink``, made at
launch), a task sends the score once the transaction commits. The task asks the
platform's token endpoint for an access token (a client assertion signed with the tool's
key) and posts the score to the line item; a refusal is kept on the link and retried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.db.models.signals import post_save
from django.utils import timezone
from pylti1p3.assignments_grades import AssignmentsGradesService
from pylti1p3.exception import LtiException, LtiServiceException
from pylti1p3.grade import Grade
from pylti1p3.service_connector import ServiceConnector
from requests import RequestException

from apps.courses.models import Chapter, ChapterProgress, QuizAttempt
from apps.courses.selectors import course_progress_for_users
from apps.labs.models import ExperimentRun
from apps.labs.selectors import experiment_results_for_users
from apps.lti.conf import registration
from apps.lti.models import ScoreLink
from config.tasks import queue_task

log = logging.getLogger(__name__)
TIMEOUT_S = 10


@dataclass(frozen=True)
class Score:
    given: int
    maximum: int

    @property
    def completed(self) -> bool:
        return self.given >= self.maximum


def chapter_score(*, user_id: int, chapter: Chapter) -> Score:
    progress = course_progress_for_users(user_ids=[user_id])
    results = experiment_results_for_users(user_ids=[user_id], patterns=[chapter.sandbox])
    experiments = results[user_id][chapter.sandbox]
    given = (
        (1 if (user_id, chapter.pk) in progress.read_at else 0)
        + (progress.best_score.get((user_id, chapter.pk)) or 0)
        + len(experiments.checked)
    )
    return Score(given=given, maximum=1 + chapter.quiz_points + experiments.available)


def score_changed(*, user_id: int, chapter_id: int) -> None:
    """After the current transaction commits, send the chapter's score wherever an LMS
    assignment links it for this user (nothing when none does: one query)."""
    if not ScoreLink.objects.filter(user_id=user_id, chapter_id=chapter_id).exists():
        return
    from apps.lti.tasks import send_scores_task

    transaction.on_commit(lambda: queue_task(send_scores_task, user_id, chapter_id))


class SendFailed(Exception):
    """The LMS refused or did not answer; the task retries."""


def _post(link: ScoreLink, score: Score) -> None:
    import requests

    session = requests.Session()
    session.request = _with_timeout(session.request)  # type: ignore[method-assign]
    connector = ServiceConnector(registration(link.platform), requests_session=session)
    service = AssignmentsGradesService(
        connector,
        {"lineitem": link.lineitem, "scope": link.scopes},
    )
    grade = (
        Grade()
        .set_score_given(score.given)
        .set_score_maximum(score.maximum)
        .set_timestamp(timezone.now().isoformat(timespec="milliseconds"))
        .set_activity_progress("Completed" if score.completed else "InProgress")
        .set_grading_progress("FullyGraded")
        .set_user_id(link.sub)
    )
    service.put_grade(grade)


def _with_timeout(request: Any) -> Any:
    def call(method: str, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", TIMEOUT_S)
        return request(method, url, **kwargs)

    return call


def scores_send(*, user_id: int, chapter_id: int) -> list[ScoreLink]:
    """Send the user's chapter score to every assignment linking it. Raises
    ``SendFailed`` (after recording why on each link) if any platform refused."""
    chapter = Chapter.objects.get(pk=chapter_id)
    score = chapter_score(user_id=user_id, chapter=chapter)
    links = list(
        ScoreLink.objects.select_related("platform").filter(
            user_id=user_id, chapter_id=chapter_id, platform__active=True
        )
    )
    failed = []
    for link in links:
        try:
            _post(link, score)
        except (LtiServiceException, LtiException, RequestException, ValueError) as exc:
            link.error = _why(exc)[:500]
            link.save(update_fields=["error"])
            log.warning("LTI score for %s to %s refused: %s", link.user_id, link.lineitem, exc)
            failed.append(link)
            continue
        link.sent_given, link.sent_maximum = score.given, score.maximum
        link.sent_at, link.error = timezone.now(), ""
        link.save(update_fields=["sent_given", "sent_maximum", "sent_at", "error"])
    if failed:
        raise SendFailed(f"{len(failed)} of {len(links)} platforms refused the score")
    return links


def _why(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if response is not None and hasattr(response, "status_code"):
        return f"HTTP {response.status_code} from {response.url}"
    return str(exc) or exc.__class__.__name__


# --- what changes a score ----------------------------------------------------------------


def _progress_saved(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    if created:
        score_changed(user_id=instance.user_id, chapter_id=instance.chapter_id)


def _run_saved(sender: Any, instance: ExperimentRun, created: bool, **kwargs: Any) -> None:
    fields = kwargs.get("update_fields")
    if instance.state != ExperimentRun.State.CHECKED or (fields and "state" not in fields):
        return
    for chapter_id in Chapter.objects.filter(sandbox=instance.pattern).values_list("pk", flat=True):
        score_changed(user_id=instance.user_id, chapter_id=chapter_id)


def connect_signals() -> None:
    """Called once by the app's ``ready``."""
    post_save.connect(_progress_saved, sender=ChapterProgress, dispatch_uid="lti-progress")
    post_save.connect(_progress_saved, sender=QuizAttempt, dispatch_uid="lti-quiz")
    post_save.connect(_run_saved, sender=ExperimentRun, dispatch_uid="lti-run")
