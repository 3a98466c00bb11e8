"""An instructor creates a class, a learner joins it by code and reads a chapter, and the
instructor sees them in the progress matrix, opens their detail and exports the CSV —
in a real headless Chromium."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from apps.accounts.models import User
from apps.classrooms.models import Classroom, Membership
from apps.courses.models import Chapter
from apps.courses.services import chapter_mark_read, quiz_submit
from tests.e2e.conftest import shot

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
PASSWORD = "a-long-enough-passphrase-1"


def sign_in(page, username: str) -> None:  # type: ignore[no-untyped-def]
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".nav-user")).to_contain_text(username)


def _classmates(classroom: Classroom, chapters: list[Chapter]) -> None:
    """Two learners further along, so the matrix reads as it would in a real class."""
    for name, first, reach in (("grace", "Grace", 4), ("linus", "Linus", 2)):
        user = User.objects.create_user(username=name, first_name=first, password=PASSWORD)
        Membership.objects.create(classroom=classroom, user=user)
        for chapter in chapters[:reach]:
            chapter_mark_read(user=user, chapter=chapter)
            answers = {q["id"]: list(q["answers"]) for q in chapter.quiz[:-1]}
            answers |= {  # the last question answered wrong
                q["id"]: [next(o["id"] for o in q["options"] if o["id"] not in q["answers"])]
                for q in chapter.quiz[-1:]
            }
            quiz_submit(user=user, chapter=chapter, answers=answers)


def test_an_instructor_runs_a_class_and_exports_its_progress(browser, live_server, course) -> None:  # type: ignore[no-untyped-def]
    User.objects.create_user(username="carol", password=PASSWORD, role=User.Role.INSTRUCTOR)
    User.objects.create_user(username="alice", first_name="Alice", password=PASSWORD)

    def new_page():  # type: ignore[no-untyped-def]
        context = browser.new_context(
            viewport={"width": 1280, "height": 900}, base_url=live_server.url
        )
        page = context.new_page()
        page.set_default_timeout(15_000)
        return page

    teacher = new_page()
    sign_in(teacher, "carol")
    teacher.get_by_test_id("nav-classrooms").click()
    expect(teacher.get_by_role("heading", name="No classrooms yet")).to_be_visible()
    teacher.get_by_label("Name").fill("")
    teacher.get_by_role("button", name="Create classroom").click()
    expect(teacher.locator(".field-errors")).to_contain_text("This field is required")
    teacher.get_by_label("Name").fill("Distributed Systems, fall")
    teacher.get_by_label("Sandboxes per learner").fill("2")
    teacher.get_by_role("button", name="Create classroom").click()
    expect(teacher.get_by_role("heading", level=1)).to_have_text("Manage Distributed Systems, fall")
    code = teacher.locator(".code-live .join-code").first.inner_text()
    assert re.fullmatch(r"[2-9A-HJKMNP-Z]{8}", code)
    shot(teacher, "classroom-01-manage-codes")

    learner = new_page()
    sign_in(learner, "alice")
    learner.get_by_test_id("nav-join").click()
    learner.get_by_role("textbox", name="Class code").fill("NOTACODE")
    learner.get_by_role("button", name="Join").click()
    expect(learner.locator(".field-errors")).to_contain_text("No class has the code 'NOTACODE'")
    shot(learner, "classroom-02-join-bad-code")
    learner.get_by_role("textbox", name="Class code").fill(code.lower())
    learner.get_by_role("button", name="Join").click()
    expect(learner.locator(".message")).to_contain_text("You joined Distributed Systems, fall")
    shot(learner, "classroom-03-joined")
    chapter = Chapter.objects.get(number=5)
    learner.goto(chapter.get_absolute_url())
    learner.get_by_test_id("mark-read").click()
    expect(learner.get_by_test_id("mark-read")).to_have_count(0)

    classroom = Classroom.objects.get()
    _classmates(classroom, course)
    teacher.goto("/classrooms/")
    teacher.get_by_role("link", name="Distributed Systems, fall").click()
    row = teacher.get_by_test_id("row-alice")
    expect(row).to_be_visible()
    expect(teacher.get_by_test_id("cell-alice-5").locator(".m-read")).to_have_text("✓")
    expect(teacher.get_by_test_id("cell-alice-4").locator(".m-read")).to_have_text("·")
    expect(teacher.get_by_test_id("cell-grace-1").locator(".m-quiz")).to_contain_text("/")
    shot(teacher, "classroom-04-matrix")

    # Filter (htmx swaps the matrix in place, and the address keeps the filter).
    teacher.get_by_test_id("filter-q").fill("gra")
    expect(teacher.get_by_test_id("row-alice")).to_have_count(0)
    expect(teacher.get_by_test_id("row-grace")).to_be_visible()
    expect(teacher).to_have_url(re.compile(r"q=gra"))
    teacher.get_by_test_id("filter-q").fill("")
    teacher.get_by_test_id("filter-sort").select_option("read")
    expect(teacher.locator("tbody tr").first).to_have_attribute("data-testid", "row-grace")
    teacher.get_by_test_id("filter-chapter").select_option(chapter.slug)
    expect(teacher.get_by_test_id("cell-alice-4")).to_have_count(0)
    expect(teacher.get_by_test_id("cell-alice-5")).to_be_visible()
    shot(teacher, "classroom-05-matrix-one-chapter")

    # The CSV of that chapter (its link says so once the filtered matrix is in).
    expect(teacher.get_by_test_id("export-csv")).to_contain_text(f"chapter {chapter.number}")
    with teacher.expect_download() as download_info:
        teacher.get_by_test_id("export-csv").click()
    download = download_info.value
    assert chapter.slug in download.suggested_filename
    text = Path(download.path()).read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["username"] for r in rows} == {"alice", "grace", "linus"}
    alice = next(r for r in rows if r["username"] == "alice")
    assert alice[f"ch5 {chapter.slug} read"] == "1"

    # A row opens the learner's detail.
    teacher.get_by_test_id("filter-chapter").select_option("")
    teacher.get_by_role("link", name="Grace").click()
    expect(teacher.get_by_role("heading", level=1)).to_have_text("Grace")
    expect(teacher.get_by_test_id("detail-1")).to_contain_text("Latest quiz answers")
    expect(teacher.get_by_test_id("detail-1").locator(".answer.is-wrong")).to_have_count(1)
    shot(teacher, "classroom-06-learner-detail", full_page=False)

    # Class insight: the question both classmates got wrong comes first, as a bar.
    teacher.goto(f"/classrooms/{classroom.pk}/")
    teacher.get_by_test_id("insight-link").click()
    expect(teacher.get_by_role("heading", level=1)).to_have_text("What to explain again")
    first = teacher.get_by_test_id("insight-1").get_by_test_id("question-insight").first
    expect(first).to_contain_text("2 of 2 wrong (100%)")
    shot(teacher, "classroom-09-insight")
