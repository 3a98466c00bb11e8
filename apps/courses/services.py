"""Writes for the course: indexing content, progress, quiz attempts."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.accounts.models import User
from apps.courses.content import ChapterSource, Problem, chapter_files, load_content
from apps.courses.models import Chapter, ChapterProgress, ContentProblem, QuizAttempt

QUIZ_EMPTY = "Choose at least one answer for each question before submitting."
QUIZ_UNKNOWN_QUESTION = "That answer names a question this quiz does not have."
QUIZ_UNKNOWN_OPTION = "That answer names an option this question does not have."


class QuizError(ValueError):
    pass


@dataclass(frozen=True)
class SyncReport:
    created: int
    updated: int
    retired: int
    unchanged: int
    problems: tuple[Problem, ...]


_FIELDS = ("number", "title", "summary", "sandbox", "minutes", "objectives", "quiz", "body")


def _row_values(source: ChapterSource) -> dict[str, object]:
    return {
        "number": source.number,
        "title": source.title,
        "summary": source.summary,
        "sandbox": source.sandbox,
        "minutes": source.minutes,
        "objectives": list(source.objectives),
        "quiz": list(source.quiz),
        "body": source.body,
        "source_path": source.path.name,
        "source_hash": source.source_hash,
    }


@transaction.atomic
def content_sync(*, content_dir: Path | None = None) -> SyncReport:
    """Index the content folder into the database. Idempotent.

    New chapters are created, changed ones updated, chapters whose file is gone are
    retired (progress kept). A file with a fatal problem leaves its chapter's last good
    version in place and records the problem on it for instructors.
    """
    content_dir = content_dir or settings.CONTENT_DIR
    sources, problems = load_content(content_dir)
    present_files = {p.name for p in chapter_files(content_dir)}
    fatal_by_file: dict[str, list[Problem]] = {}
    for problem in problems:
        if problem.fatal:
            fatal_by_file.setdefault(problem.path.name, []).append(problem)

    created = updated = unchanged = retired = 0
    seen_ids: set[int] = set()
    existing = {c.slug: c for c in Chapter.objects.select_for_update()}
    by_file = {c.source_path: c for c in existing.values()}
    now = timezone.now()

    # Numbers are not unique in the table (a renumbering edit moves several at once), so
    # rows can be written in any order.
    for source in sources:
        chapter = existing.get(source.slug)
        values = _row_values(source)
        if chapter is None:
            chapter = Chapter.objects.create(slug=source.slug, **values)
            created += 1
        elif (
            chapter.source_hash == source.source_hash
            and chapter.source_path == source.path.name
            and chapter.retired_at is None
            and not chapter.problem
        ):
            unchanged += 1
        else:
            for name, value in values.items():
                setattr(chapter, name, value)
            chapter.retired_at = None
            chapter.problem = ""
            chapter.save()
            updated += 1
        seen_ids.add(chapter.pk)

    for name, file_problems in fatal_by_file.items():
        chapter = by_file.get(name)
        if chapter is None or chapter.pk in seen_ids:
            continue
        # Keep serving the last good version; tell instructors why it is stale.
        chapter.problem = "\n".join(str(p) for p in file_problems)
        chapter.save(update_fields=["problem", "updated_at"])
        seen_ids.add(chapter.pk)

    for chapter in existing.values():
        if chapter.pk in seen_ids or chapter.retired_at is not None:
            continue
        if chapter.source_path in present_files and chapter.source_path in fatal_by_file:
            continue
        chapter.retired_at = now
        chapter.save(update_fields=["retired_at", "updated_at"])
        retired += 1

    ContentProblem.objects.all().delete()
    ContentProblem.objects.bulk_create(
        ContentProblem(path=p.path.name, line=p.line, message=p.message, fatal=p.fatal)
        for p in problems
    )
    _remember_fingerprint(content_dir)
    return SyncReport(created, updated, retired, unchanged, tuple(problems))


# --- Auto-sync on change (make run): one stat per file per course page ---------------

_fingerprint_lock = threading.Lock()
_last_fingerprint: dict[str, tuple[tuple[str, int, int], ...]] = {}


def _fingerprint(content_dir: Path) -> tuple[tuple[str, int, int], ...]:
    entries = []
    for path in chapter_files(content_dir):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        entries.append((path.name, stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


def _remember_fingerprint(content_dir: Path) -> None:
    with _fingerprint_lock:
        _last_fingerprint[str(content_dir)] = _fingerprint(content_dir)


def content_sync_if_changed(*, content_dir: Path | None = None) -> bool:
    """Re-index when a content file was added, edited or removed since the last sync in
    this process. Returns whether a sync ran."""
    content_dir = content_dir or settings.CONTENT_DIR
    current = _fingerprint(content_dir)
    with _fingerprint_lock:
        if _last_fingerprint.get(str(content_dir)) == current:
            return False
    content_sync(content_dir=content_dir)
    return True


# --- Progress and quizzes ---------------------------------------------------------------


def chapter_mark_read(*, user: User, chapter: Chapter) -> ChapterProgress:
    progress, _ = ChapterProgress.objects.get_or_create(user=user, chapter=chapter)
    return progress


def chapter_mark_unread(*, user: User, chapter: Chapter) -> None:
    ChapterProgress.objects.filter(user=user, chapter=chapter).delete()


def quiz_answers_from_form(
    *, chapter: Chapter, data: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Read ``q-<question id>`` fields into question id → option ids, validating each."""
    questions = {q["id"]: q for q in chapter.quiz}
    answers: dict[str, list[str]] = {}
    for key, values in data.items():
        if not key.startswith("q-"):
            continue
        question = questions.get(key[2:])
        if question is None:
            raise QuizError(QUIZ_UNKNOWN_QUESTION)
        option_ids = {o["id"] for o in question["options"]}
        chosen = sorted(set(values))
        if any(v not in option_ids for v in chosen):
            raise QuizError(QUIZ_UNKNOWN_OPTION)
        if chosen:
            answers[question["id"]] = chosen
    if set(answers) != set(questions):
        raise QuizError(QUIZ_EMPTY)
    return answers


def quiz_submit(*, user: User, chapter: Chapter, answers: dict[str, list[str]]) -> QuizAttempt:
    """Score and store one attempt: a question scores when exactly its right options are
    chosen."""
    score = sum(1 for q in chapter.quiz if sorted(answers.get(q["id"], [])) == sorted(q["answers"]))
    return QuizAttempt.objects.create(
        user=user, chapter=chapter, answers=answers, score=score, max_score=len(chapter.quiz)
    )
