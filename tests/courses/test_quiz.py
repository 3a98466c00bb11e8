from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from apps.courses.models import Chapter, QuizAttempt
from apps.courses.services import QUIZ_EMPTY, QUIZ_UNKNOWN_OPTION, content_sync
from tests.conftest import client_for
from tests.courses.factories import write_chapter

pytestmark = pytest.mark.django_db


@pytest.fixture
def chapter(db: None, tmp_path: Path, settings) -> Chapter:  # type: ignore[no-untyped-def]
    settings.CONTENT_DIR = tmp_path
    write_chapter(tmp_path, "01-one.md", slug="one", number=1)
    content_sync(content_dir=tmp_path)
    return Chapter.objects.get(slug="one")


def submit(client: Client, chapter: Chapter, data: dict[str, object], htmx: bool = True):  # type: ignore[no-untyped-def]
    extra = {"HTTP_HX_REQUEST": "true"} if htmx else {}
    return client.post(reverse("courses:quiz", args=[chapter.slug]), data, **extra)


def test_it_scores_and_stores_an_attempt(chapter: Chapter, learner, learner_client: Client) -> None:  # type: ignore[no-untyped-def]
    response = submit(learner_client, chapter, {"q-q1": "b", "q-q2": ["a", "c"]})
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<section class="quiz"')
    assert "You scored <strong>2 of 2</strong>" in html
    attempt = QuizAttempt.objects.get(user=learner, chapter=chapter)
    assert (attempt.score, attempt.max_score) == (2, 2)
    assert attempt.answers == {"q1": ["b"], "q2": ["a", "c"]}


def test_it_shows_feedback_with_explanations(chapter: Chapter, learner_client: Client) -> None:
    html = submit(learner_client, chapter, {"q-q1": "a", "q-q2": ["a"]}).content.decode()
    assert "You scored <strong>0 of 2</strong>" in html
    assert "Not this one." in html and "Yes, this one." in html  # explanations shown
    assert "✗ Your choice" in html and "✓ Right answer" in html
    assert html.count("is-incorrect") == 2


def test_a_partial_multiple_choice_answer_scores_nothing(chapter: Chapter, learner) -> None:  # type: ignore[no-untyped-def]
    submit(client_for(learner), chapter, {"q-q1": "b", "q-q2": ["a", "b", "c"]})
    assert QuizAttempt.objects.get(user=learner).score == 1


def test_unanswered_questions_are_refused_and_nothing_is_stored(
    chapter: Chapter, learner_client: Client
) -> None:
    response = submit(learner_client, chapter, {"q-q1": "b"})
    assert response.status_code == 200  # htmx swaps only 2xx: the error shows in place
    html = response.content.decode()
    assert QUIZ_EMPTY in html
    assert 'value="b" checked' in html  # the learner's choice is kept
    assert not QuizAttempt.objects.exists()


def test_bad_form_data_gets_a_clear_error(chapter: Chapter, learner_client: Client) -> None:
    response = submit(learner_client, chapter, {"q-q1": "zzz", "q-q2": "a"}, htmx=False)
    assert response.status_code == 422
    assert QUIZ_UNKNOWN_OPTION in response.content.decode()
    response = submit(learner_client, chapter, {"q-q1": "b", "q-q2": "a", "q-nope": "a"})
    assert "question this quiz does not have" in response.content.decode()
    assert not QuizAttempt.objects.exists()


def test_best_score_is_kept_across_attempts(
    chapter: Chapter, learner, learner_client: Client
) -> None:  # type: ignore[no-untyped-def]
    submit(learner_client, chapter, {"q-q1": "b", "q-q2": ["a", "c"]})
    html = submit(learner_client, chapter, {"q-q1": "a", "q-q2": ["a"]}).content.decode()
    assert "Your best score: <strong>2/2</strong>" in html
    assert QuizAttempt.objects.filter(user=learner).count() == 2
    assert "Quiz best 2/2" in learner_client.get("/").content.decode()


def test_attempts_are_private(chapter: Chapter, learner, other_learner) -> None:  # type: ignore[no-untyped-def]
    submit(client_for(learner), chapter, {"q-q1": "b", "q-q2": ["a", "c"]})
    html = client_for(other_learner).get(chapter.get_absolute_url()).content.decode()
    assert "Your best score" not in html


def test_anonymous_submission_is_sent_to_sign_in(chapter: Chapter, client: Client) -> None:
    response = submit(client, chapter, {"q-q1": "b", "q-q2": ["a", "c"]}, htmx=False)
    assert response.status_code == 302
    assert not QuizAttempt.objects.exists()
