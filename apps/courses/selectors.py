"""Reads for the course: chapter lists, rendered chapters, a learner's progress."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.cache import cache
from django.db.models import Count, Max
from django.http import Http404

from apps.accounts.models import User
from apps.courses.content import Rendered, TocEntry, render_inline, render_markdown
from apps.courses.models import Chapter, ChapterProgress, ContentProblem, QuizAttempt
from apps.labs.selectors import experiment_progress_for_user

# Bump when the renderer's output changes so cached HTML from older code is not served.
RENDER_VERSION = "1"
RENDER_CACHE_SECONDS = 60 * 60 * 24


@dataclass(frozen=True)
class ChapterRow:
    chapter: Chapter
    read: bool
    best_score: int | None
    experiments_done: int = 0  # the chapter's sandbox experiments with a checked result
    experiments_total: int = 0


@dataclass(frozen=True)
class RenderedChapter:
    html: str
    toc: tuple[TocEntry, ...]
    quiz: list[dict[str, Any]]  # the chapter's quiz with *_html fields added

    @property
    def heading_html(self) -> str:
        """The body's leading ``<h1>``, shown above the chapter's objectives."""
        return self._split()[0]

    @property
    def rest_html(self) -> str:
        return self._split()[1]

    def _split(self) -> tuple[str, str]:
        text = self.html.lstrip()
        end = text.find("</h1>")
        if not text.startswith("<h1") or end < 0:
            return "", self.html
        end += len("</h1>")
        return text[:end], text[end:]


def chapter_list_live() -> list[Chapter]:
    return list(Chapter.objects.filter(retired_at__isnull=True).order_by("number", "slug"))


def chapter_list_for_user(*, user: User | None) -> list[ChapterRow]:
    """The live chapters in order, with the user's read mark, best quiz score, and how
    many of the experiments of the chapter's sandbox they have done."""
    chapters = chapter_list_live()
    read: set[int] = set()
    best: dict[int, int] = {}
    experiments: dict[str, tuple[int, int]] = {}
    if user is not None and user.is_authenticated:
        read = set(ChapterProgress.objects.filter(user=user).values_list("chapter_id", flat=True))
        best = dict(
            QuizAttempt.objects.filter(user=user)
            .values("chapter_id")
            .annotate(best=Max("score"))
            .values_list("chapter_id", "best")
        )
        experiments = experiment_progress_for_user(
            user=user, patterns={c.sandbox for c in chapters}
        )
    return [
        ChapterRow(c, c.pk in read, best.get(c.pk), *experiments.get(c.sandbox, (0, 0)))
        for c in chapters
    ]


@dataclass(frozen=True)
class CourseProgress:
    """Many users' course progress at once (a classroom), keyed by (user id, chapter id)."""

    read_at: dict[tuple[int, int], datetime]
    best_score: dict[tuple[int, int], int]
    attempts: dict[tuple[int, int], int]
    last_activity: dict[int, datetime]  # user id → their latest read mark or quiz attempt


def course_progress_for_users(*, user_ids: Iterable[int]) -> CourseProgress:
    users = list(user_ids)
    read_at: dict[tuple[int, int], datetime] = {}
    last: dict[int, datetime] = {}
    for user_id, chapter_id, when in ChapterProgress.objects.filter(user_id__in=users).values_list(
        "user_id", "chapter_id", "read_at"
    ):
        read_at[(user_id, chapter_id)] = when
        last[user_id] = max(when, last.get(user_id, when))
    best: dict[tuple[int, int], int] = {}
    attempts: dict[tuple[int, int], int] = {}
    for row in (
        QuizAttempt.objects.filter(user_id__in=users)
        .values("user_id", "chapter_id")
        .annotate(best=Max("score"), count=Count("pk"), last=Max("created_at"))
    ):
        key = (row["user_id"], row["chapter_id"])
        best[key] = row["best"]
        attempts[key] = row["count"]
        last[row["user_id"]] = max(row["last"], last.get(row["user_id"], row["last"]))
    return CourseProgress(read_at, best, attempts, last)


def chapter_get(*, slug: str) -> Chapter:
    """A live chapter by slug, or 404 (retired chapters are not served)."""
    try:
        return Chapter.objects.get(slug=slug, retired_at__isnull=True)
    except Chapter.DoesNotExist:
        raise Http404("No such chapter") from None


def chapter_neighbours(*, chapter: Chapter) -> tuple[Chapter | None, Chapter | None]:
    live = Chapter.objects.filter(retired_at__isnull=True)
    previous = live.filter(number__lt=chapter.number).order_by("-number").first()
    following = live.filter(number__gt=chapter.number).order_by("number").first()
    return previous, following


def _chapter_urls() -> dict[str, str]:
    return {c.source_path: c.get_absolute_url() for c in chapter_list_live()}


def chapter_render(*, chapter: Chapter) -> RenderedChapter:
    """The chapter's HTML, cached by a hash of its source and of the links it may use, so
    an edit (new hash) can never be answered with stale HTML."""
    urls = _chapter_urls()
    key_material = json.dumps([RENDER_VERSION, chapter.source_hash, sorted(urls.items())])
    key = "chapter-html:" + hashlib.sha256(key_material.encode()).hexdigest()
    cached = cache.get(key)
    if cached is not None:
        return RenderedChapter(**cached)

    rendered: Rendered = render_markdown(chapter.body, chapter_urls=urls)
    quiz = []
    for question in chapter.quiz:
        quiz.append(
            {
                **question,
                "question_html": render_inline(question["question"], chapter_urls=urls),
                "options": [
                    {
                        **option,
                        "text_html": render_inline(option["text"], chapter_urls=urls),
                        "explain_html": render_inline(option["explain"], chapter_urls=urls),
                    }
                    for option in question["options"]
                ],
            }
        )
    result = RenderedChapter(html=rendered.html, toc=rendered.toc, quiz=quiz)
    cache.set(key, {"html": result.html, "toc": result.toc, "quiz": quiz}, RENDER_CACHE_SECONDS)
    return result


def chapter_progress_for_user(*, user: User, chapter: Chapter) -> ChapterRow:
    read = ChapterProgress.objects.filter(user=user, chapter=chapter).exists()
    best = QuizAttempt.objects.filter(user=user, chapter=chapter).aggregate(best=Max("score"))
    return ChapterRow(chapter, read, best["best"])


def content_problem_list() -> list[ContentProblem]:
    return list(ContentProblem.objects.all())


def quiz_view(
    *, rendered: RenderedChapter, chosen: dict[str, list[str]] | None, feedback: bool
) -> list[dict[str, Any]]:
    """The quiz as the template shows it: each option with whether it was chosen and, when
    ``feedback`` is on (just after a submission), whether it is right, plus each question's
    verdict. Explanations are shown for every option once the learner has answered."""
    chosen = chosen or {}
    questions = []
    for q in rendered.quiz:
        picked = set(chosen.get(q["id"], []))
        right = set(q["answers"])
        questions.append(
            {
                "id": q["id"],
                "question_html": q["question_html"],
                "multiple": q["multiple"],
                "feedback": feedback,
                "correct": picked == right,
                "options": [
                    {**o, "checked": o["id"] in picked, "right": o["id"] in right}
                    for o in q["options"]
                ],
            }
        )
    return questions
