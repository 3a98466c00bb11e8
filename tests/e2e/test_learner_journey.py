"""A newcomer signs up, reads chapter 5, takes part of its quiz, marks it read and sees
their progress on the course home — in a real headless Chromium."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from apps.accounts.models import User
from apps.courses.models import Chapter, ChapterProgress, QuizAttempt
from tests.e2e.conftest import shot

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_learner_reads_a_chapter_takes_the_quiz_and_sees_progress(page, course) -> None:  # type: ignore[no-untyped-def]
    page.goto("/")
    expect(page.get_by_role("heading", level=1)).to_contain_text("breaking them")
    expect(page.locator(".chapter-card")).to_have_count(12)
    shot(page, "01-home-anonymous")

    page.get_by_role("link", name="Create an account").click()
    page.get_by_label("Username").fill("newcomer")
    page.get_by_label("Email").fill("newcomer@example.invalid")
    page.get_by_label("Password", exact=True).fill("a-long-enough-passphrase-1")
    page.get_by_label("Password confirmation").fill("a-long-enough-passphrase-1")
    shot(page, "02-signup")
    page.get_by_role("button", name="Create account").click()
    expect(page.locator(".nav-user")).to_contain_text("newcomer")
    expect(page.get_by_test_id("progress-summary")).to_contain_text("0 of 12")

    chapter = Chapter.objects.get(number=5)
    page.get_by_role("link", name=chapter.title).click()
    expect(page).to_have_url(re.compile(rf"/chapters/{chapter.slug}/$"))
    expect(page.locator(".prose h1")).to_have_text(chapter.title)
    expect(page.locator(".objectives")).to_be_visible()
    expect(page.locator(".toc a").first).to_be_visible()
    # The diagram is drawn by Mermaid from our own static files.
    expect(page.locator("pre.mermaid svg").first).to_be_visible()
    expect(page.get_by_test_id("sandbox-pattern")).to_have_text(chapter.sandbox)
    shot(page, "03-chapter-top")
    page.locator("pre.mermaid").first.scroll_into_view_if_needed()
    shot(page, "03b-chapter-diagram")

    # Answer the first question correctly and every other one with its first option.
    first = chapter.quiz[0]
    for question in chapter.quiz:
        option = question["answers"][0] if question is first else question["options"][0]["id"]
        page.locator(f'input[name="q-{question["id"]}"][value="{option}"]').check()
    page.get_by_role("button", name="Check answers").click()
    result = page.get_by_test_id("quiz-result")
    expect(result).to_contain_text("You scored")
    first_box = page.get_by_test_id(f"question-{first['id']}")
    expect(first_box).to_contain_text("✓ Correct")
    right = next(o for o in first["options"] if o["id"] in first["answers"])
    expect(first_box.locator(".explain").first).to_be_visible()
    expect(first_box).to_contain_text(re.sub(r"[`*_]", "", right["explain"]).split(".")[0][:30])
    page.locator("#quiz").scroll_into_view_if_needed()
    shot(page, "04-quiz-feedback")

    page.get_by_test_id("mark-read").click()
    expect(page.get_by_test_id("read-status")).to_contain_text("You have read this chapter")
    shot(page, "05-marked-read")

    user = User.objects.get(username="newcomer")
    assert ChapterProgress.objects.filter(user=user, chapter=chapter).exists()
    attempt = QuizAttempt.objects.get(user=user, chapter=chapter)
    assert attempt.score >= 1

    page.get_by_role("link", name="Course").first.click()
    expect(page.get_by_test_id("progress-summary")).to_contain_text("1 of 12")
    card = page.get_by_test_id("chapter-5")
    expect(card).to_contain_text("✓ Read")
    expect(card.get_by_test_id("best-score")).to_contain_text(
        f"Quiz best {attempt.score}/{len(chapter.quiz)}"
    )
    shot(page, "06-home-progress", full_page=True)


def test_the_chapter_reads_well_on_a_phone_and_in_the_dark(browser, live_server, course) -> None:  # type: ignore[no-untyped-def]
    User.objects.create_user(username="phone", password="a-long-enough-passphrase-1")
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, base_url=live_server.url, color_scheme="dark"
    )
    page = context.new_page()
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill("phone")
    page.get_by_label("Password").fill("a-long-enough-passphrase-1")
    page.get_by_role("button", name="Sign in").click()
    page.goto(Chapter.objects.get(number=5).get_absolute_url())
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    # Nothing is wider than the screen: no sideways scrolling of the page itself.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    expect(page.locator("pre.mermaid svg").first).to_be_visible()
    shot(page, "07-phone-dark")
    page.locator(".highlight").first.scroll_into_view_if_needed()
    shot(page, "08-phone-dark-code")
    # The theme toggle switches to light and remembers it.
    page.locator("[data-theme-toggle]").click()
    page.reload()
    assert page.evaluate("document.documentElement.dataset.theme") == "light"
    context.close()
