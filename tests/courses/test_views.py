from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from apps.courses.models import Chapter, ChapterProgress, QuizAttempt
from apps.courses.services import content_sync
from tests.conftest import client_for
from tests.courses.factories import write_chapter

pytestmark = pytest.mark.django_db


def test_home_lists_the_twelve_chapters_in_order(course: list[Chapter], client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    positions = [html.index(f'data-testid="chapter-{n}"') for n in range(1, 13)]
    assert positions == sorted(positions)
    for chapter in course:
        assert chapter.summary.split()[0] in html
        assert f"{chapter.minutes} min" in html
    assert "Create an account" in html  # anonymous visitors are invited to sign up


def test_home_shows_a_learners_progress_and_best_score(chapter5: Chapter, learner) -> None:  # type: ignore[no-untyped-def]
    ChapterProgress.objects.create(user=learner, chapter=chapter5)
    QuizAttempt.objects.create(user=learner, chapter=chapter5, answers={}, score=2, max_score=6)
    QuizAttempt.objects.create(user=learner, chapter=chapter5, answers={}, score=4, max_score=6)
    html = client_for(learner).get("/").content.decode()
    assert "1 of 12" in html
    assert f"Quiz best 4/{chapter5.quiz_points}" in html


def test_home_does_not_show_another_learners_progress(
    chapter5: Chapter, learner, other_learner
) -> None:  # type: ignore[no-untyped-def]
    ChapterProgress.objects.create(user=learner, chapter=chapter5)
    QuizAttempt.objects.create(user=learner, chapter=chapter5, answers={}, score=4, max_score=6)
    html = client_for(other_learner).get("/").content.decode()
    assert "0 of 12" in html
    assert "Quiz best" not in html


def test_home_has_an_empty_state(db: None, tmp_path: Path, settings, client: Client) -> None:  # type: ignore[no-untyped-def]
    settings.CONTENT_DIR = tmp_path
    html = client.get("/").content.decode()
    assert "No chapters yet" in html


def test_chapter_page_needs_sign_in(chapter5: Chapter, client: Client) -> None:
    response = client.get(chapter5.get_absolute_url())
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("accounts:login"))


def test_chapter_page_renders_the_chapter(chapter5: Chapter, learner_client: Client) -> None:
    response = learner_client.get(chapter5.get_absolute_url())
    assert response.status_code == 200
    html = response.content.decode()
    assert f"<title>{chapter5.title} · Distlab</title>" in html
    assert 'class="toc"' in html and 'href="#' in html
    assert 'class="highlight"' in html  # highlighted code
    assert 'class="mermaid"' in html  # a diagram
    assert 'data-testid="sandbox-pattern">replicated-lb<' in html
    assert 'rel="prev"' in html and 'rel="next"' in html
    assert 'data-testid="mark-read"' in html
    assert html.count('class="question') >= 5


def test_unknown_and_retired_chapters_are_404(
    course: list[Chapter], learner_client: Client
) -> None:
    assert learner_client.get("/chapters/no-such-chapter/").status_code == 404
    chapter = course[0]
    Chapter.objects.filter(pk=chapter.pk).update(retired_at="2026-01-01T00:00Z")
    response = learner_client.get(chapter.get_absolute_url())
    assert response.status_code == 404
    assert "Page not found" in response.content.decode()


def test_mark_read_with_htmx_returns_the_fragment(
    chapter5: Chapter, learner, learner_client: Client
) -> None:  # type: ignore[no-untyped-def]
    url = reverse("courses:progress", args=[chapter5.slug])
    response = learner_client.post(url, {"read": "1"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<section class="progress-box"')
    assert "You have read this chapter" in html
    assert ChapterProgress.objects.filter(user=learner, chapter=chapter5).count() == 1

    learner_client.post(url, {"read": "1"}, HTTP_HX_REQUEST="true")  # twice: still one row
    assert ChapterProgress.objects.filter(user=learner, chapter=chapter5).count() == 1

    learner_client.post(url, {"read": "0"}, HTTP_HX_REQUEST="true")
    assert not ChapterProgress.objects.filter(user=learner, chapter=chapter5).exists()


def test_mark_read_without_javascript_redirects(
    chapter5: Chapter, learner, learner_client: Client
) -> None:  # type: ignore[no-untyped-def]
    response = learner_client.post(reverse("courses:progress", args=[chapter5.slug]))
    assert response.status_code == 302
    assert ChapterProgress.objects.filter(user=learner, chapter=chapter5).exists()


def test_progress_and_quiz_need_sign_in_and_post(
    chapter5: Chapter, client: Client, learner_client: Client
) -> None:
    for name in ("courses:progress", "courses:quiz"):
        url = reverse(name, args=[chapter5.slug])
        assert client.post(url).status_code == 302
        assert learner_client.get(url).status_code == 405
    assert not ChapterProgress.objects.exists() and not QuizAttempt.objects.exists()


def test_instructors_see_content_problems_learners_do_not(
    db: None,
    tmp_path: Path,
    settings,
    learner_client: Client,
    instructor_client: Client,  # type: ignore[no-untyped-def]
) -> None:
    settings.CONTENT_DIR = tmp_path
    write_chapter(tmp_path, "01-one.md", slug="one", number=1)
    content_sync(content_dir=tmp_path)
    (tmp_path / "01-one.md").write_text("---\nslug: one\nnumber: nope\n---\n")
    content_sync(content_dir=tmp_path)

    html = instructor_client.get("/").content.decode()
    assert 'data-testid="content-problems"' in html
    assert "01-one.md:3" in html
    chapter_html = instructor_client.get("/chapters/one/").content.decode()
    assert 'data-testid="chapter-problem"' in chapter_html

    learner_html = learner_client.get("/").content.decode()
    assert "content-problems" not in learner_html
    assert "Chapter about one" in learner_html  # the last good version still serves
    assert "chapter-problem" not in learner_client.get("/chapters/one/").content.decode()


def test_editing_a_chapter_shows_on_reload(
    db: None, tmp_path: Path, settings, learner_client: Client
) -> None:  # type: ignore[no-untyped-def]
    settings.CONTENT_DIR = tmp_path
    settings.CONTENT_AUTO_SYNC = True
    write_chapter(tmp_path, "01-one.md", slug="one", number=1, body="# One\n\nFirst words.\n")
    assert "First words." in learner_client.get("/chapters/one/").content.decode()
    path = write_chapter(
        tmp_path, "01-one.md", slug="one", number=1, body="# One\n\nEdited words.\n"
    )
    stat = path.stat()  # same second, same size? change the size too, to be sure
    assert stat.st_size > 0
    html = learner_client.get("/chapters/one/").content.decode()
    assert "Edited words." in html and "First words." not in html


def test_hostile_markup_in_a_chapter_never_reaches_the_page(
    db: None, tmp_path: Path, settings, learner_client: Client
) -> None:  # type: ignore[no-untyped-def]
    settings.CONTENT_DIR = tmp_path
    body = (
        "# One\n\n<script>alert(1)</script>\n\n"
        '<img src="x.png" onerror="alert(2)">\n\n'
        '<a href="javascript:alert(3)">click</a>\n'
    )
    write_chapter(tmp_path, "01-one.md", slug="one", number=1, body=body)
    content_sync(content_dir=tmp_path)
    html = learner_client.get("/chapters/one/").content.decode()
    assert "alert(" not in html
    assert "onerror" not in html and "javascript:" not in html
