from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST, require_safe

from apps.accounts.http import AuthedHttpRequest, HttpRequest
from apps.courses import selectors, services
from apps.courses.models import Chapter
from apps.labs.views import panel_context


def _auto_sync() -> None:
    if settings.CONTENT_AUTO_SYNC:
        services.content_sync_if_changed()


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    _auto_sync()
    user = request.user if request.user.is_authenticated else None
    rows = selectors.chapter_list_for_user(user=user)
    context: dict[str, Any] = {
        "rows": rows,
        "read_count": sum(1 for r in rows if r.read),
        "problems": [],
        "stale_chapters": [],
    }
    if user is not None and user.is_instructor:
        context["problems"] = selectors.content_problem_list()
        context["stale_chapters"] = [r.chapter for r in rows if r.chapter.problem]
    return render(request, "courses/home.html", context)


def _chapter_context(
    request: AuthedHttpRequest,
    slug: str,
    *,
    chosen: dict[str, list[str]] | None = None,
    feedback: bool = False,
    **extra: Any,
) -> tuple[Chapter, dict[str, Any]]:
    chapter = selectors.chapter_get(slug=slug)
    rendered = selectors.chapter_render(chapter=chapter)
    progress = selectors.chapter_progress_for_user(user=request.user, chapter=chapter)
    context: dict[str, Any] = {
        "chapter": chapter,
        "rendered": rendered,
        "quiz": selectors.quiz_view(rendered=rendered, chosen=chosen, feedback=feedback),
        "progress": progress,
        "show_problem": bool(chapter.problem) and request.user.is_instructor,
        **extra,
    }
    return chapter, context


@require_safe
@login_required
def chapter_detail(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    _auto_sync()
    chapter, context = _chapter_context(request, slug)
    previous, following = selectors.chapter_neighbours(chapter=chapter)
    context.update(previous=previous, following=following)
    context.update(panel_context(user=request.user, pattern=chapter.sandbox))
    return render(request, "courses/chapter.html", context)


@require_POST
@login_required
def chapter_progress(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    chapter = selectors.chapter_get(slug=slug)
    if request.POST.get("read") == "0":
        services.chapter_mark_unread(user=request.user, chapter=chapter)
    else:
        services.chapter_mark_read(user=request.user, chapter=chapter)
    if not request.htmx:
        return redirect(chapter)
    _, context = _chapter_context(request, slug)
    return render(request, "courses/chapter.html#progress", context)


@require_POST
@login_required
def quiz_submit(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    chapter = selectors.chapter_get(slug=slug)
    error = ""
    attempt = None
    try:
        answers = services.quiz_answers_from_form(chapter=chapter, data=dict(request.POST.lists()))
    except services.QuizError as exc:
        error = str(exc)
        answers = {k[2:]: v for k, v in request.POST.lists() if k.startswith("q-")}
    else:
        attempt = services.quiz_submit(user=request.user, chapter=chapter, answers=answers)
    _, context = _chapter_context(
        request,
        slug,
        chosen=answers,
        feedback=attempt is not None,
        attempt=attempt,
        quiz_error=error,
        just_submitted=True,
    )
    # htmx only swaps 2xx responses; a page submitted without JavaScript gets 422.
    status = 422 if error and not request.htmx else 200
    if not request.htmx:
        template = "courses/chapter.html"
        previous, following = selectors.chapter_neighbours(chapter=chapter)
        context.update(previous=previous, following=following)
        context.update(panel_context(user=request.user, pattern=chapter.sandbox))
    else:
        template = "courses/chapter.html#quiz"
    return render(request, template, context, status=status)
