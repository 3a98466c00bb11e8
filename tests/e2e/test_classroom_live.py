"""The dashboard is live: with the matrix open, the instructor sees a learner's chapter
turn read and a new learner's row appear, without reloading — through `manage.py serve`
(the WebSocket needs the ASGI server), in a real headless Chromium."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

from apps.accounts.models import User
from apps.classrooms.models import Membership
from apps.classrooms.services import classroom_create, join_code_create
from apps.courses.models import Chapter
from tests.e2e.conftest import shot
from tests.e2e.platform import PASSWORD, STATE_UP, Platform, node
from tests.e2e.platform import shot as panel_shot
from tests.e2e.test_sandbox_panel import sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_the_matrix_changes_as_learners_work(browser, platform: Platform) -> None:  # type: ignore[no-untyped-def]
    carol = User.objects.create_user(username="carol", password=PASSWORD, role=User.Role.INSTRUCTOR)
    alice = User.objects.create_user(username="alice", first_name="Alice", password=PASSWORD)
    User.objects.create_user(username="bob", first_name="Bob", password=PASSWORD)
    classroom = classroom_create(owner=carol, name="Distributed Systems, spring")
    Membership.objects.create(classroom=classroom, user=alice)
    code = join_code_create(classroom=classroom, by=carol).code

    def page_for(username: str):  # type: ignore[no-untyped-def]
        context = browser.new_context(
            viewport={"width": 1280, "height": 800}, base_url=platform.base
        )
        page = context.new_page()
        page.set_default_timeout(15_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        sign_in(page, username, PASSWORD)
        return page, errors

    teacher, teacher_errors = page_for("carol")
    teacher.goto(f"/classrooms/{classroom.pk}/")
    cell = teacher.get_by_test_id("cell-alice-5").locator(".m-read")
    expect(cell).to_have_text("·")
    teacher.wait_for_timeout(500)  # the socket connects after the page's scripts run

    learner, _ = page_for("alice")
    learner.goto(Chapter.objects.get(number=5).get_absolute_url())
    clicked = time.monotonic()
    learner.get_by_test_id("mark-read").click()
    expect(cell).to_have_text("✓", timeout=5_000)  # no reload: the row came over the socket
    print(f"read → instructor's matrix: {time.monotonic() - clicked:.2f} s")
    expect(teacher.get_by_test_id("row-alice")).to_contain_text("1 read")

    newcomer, _ = page_for("bob")
    newcomer.goto("/classrooms/join/")
    newcomer.get_by_role("textbox", name="Class code").fill(code)
    newcomer.get_by_role("button", name="Join").click()
    expect(teacher.get_by_test_id("row-bob")).to_be_visible(timeout=5_000)
    expect(teacher.locator("#matrix")).to_contain_text("2 learners")
    shot(teacher, "classroom-07-live-matrix")

    # After the matrix was re-rendered over the socket, it is still live.
    newcomer.goto(Chapter.objects.get(number=1).get_absolute_url())
    newcomer.get_by_test_id("mark-read").click()
    expect(teacher.get_by_test_id("cell-bob-1").locator(".m-read")).to_have_text("✓", timeout=5_000)

    # A launch: the sandbox's states are saved by the background worker's thread, and
    # still reach the dashboard (through the server's loop, with the in-memory layer).
    learner.goto(Chapter.objects.get(number=5).get_absolute_url() + "#sandbox")
    learner.get_by_test_id("launch-sandbox").click()
    expect(learner.get_by_test_id("sandbox-state")).to_have_text("Running", timeout=60_000)
    box = teacher.get_by_test_id("cell-alice-5").locator(".m-box")
    expect(box).to_contain_text("running", timeout=5_000)
    shot(teacher, "classroom-08-live-matrix-sandbox")

    # A class drill: the instructor kills replica-2 in every running chapter-5 sandbox;
    # the learner sees it on the graph and reads who did it; the record gets the figures.
    teacher.goto(f"/classrooms/{classroom.pk}/")
    teacher.get_by_test_id("drills-link").click()
    expect(teacher.get_by_role("heading", name="No drills yet")).to_be_visible()
    teacher.get_by_test_id("drill-target").select_option("replicated-lb:replica-2")
    teacher.get_by_test_id("drill-kind").select_option("kill")
    teacher.get_by_test_id("drill-duration").fill("5")
    teacher.get_by_test_id("drill-start").click()
    expect(teacher.locator(".message")).to_contain_text(
        "Drill started: kill on replica-2 in 1 sandbox"
    )
    wall = teacher.context.new_page()  # the projector's tab
    wall.goto(f"/classrooms/{classroom.pk}/wall/")
    card = wall.get_by_test_id("wall-alice")
    expect(card).to_have_attribute("data-status", "bad", timeout=10_000)  # the class goes red
    expect(card).to_contain_text("down: replica-2")
    shot(wall, "classroom-12-health-wall-red")
    expect(learner.get_by_test_id("event-log")).to_contain_text(
        "Class drill: carol killed replica-2 for 5 s", timeout=10_000
    )
    expect(node(learner, "replica-2")).not_to_have_class(STATE_UP, timeout=5_000)
    active = learner.get_by_test_id("active-fault")
    expect(active).to_have_attribute("data-node", "replica-2")  # listed: the panel refreshed
    panel_shot(learner, "classroom-10-drill-learner")
    expect(node(learner, "replica-2")).to_have_class(STATE_UP, timeout=30_000)  # reverted
    expect(card).to_have_attribute("data-status", "ok", timeout=20_000)  # and recovers
    shot(wall, "classroom-13-health-wall-recovered")
    row = teacher.get_by_test_id("drill-target-alice")
    for _ in range(30):  # measured once the fault has reverted and settled
        teacher.reload()
        if "Measured" in teacher.get_by_test_id("drill-status").first.inner_text():
            break
        teacher.wait_for_timeout(1_000)
    expect(row).to_contain_text(" s")
    expect(row).to_contain_text("reverted")
    expect(row).to_contain_text(re.compile(r"\d+ of \d+ \("))
    shot(teacher, "classroom-11-drill-record", full_page=True)

    # A guided class experiment: the instructor asks the class to run "Kill a replica";
    # the learner's log and panel say so at once, the learner predicts and starts it, and
    # the instructor's open results page counts the prediction without a reload.
    teacher.goto(f"/classrooms/{classroom.pk}/")
    teacher.get_by_test_id("class-experiments-link").click()
    expect(teacher.get_by_role("heading", name="No class experiments yet")).to_be_visible()
    teacher.get_by_test_id("ask-experiment").select_option("replicated-lb:kill-replica")
    teacher.get_by_test_id("ask-minutes").fill("5")
    teacher.get_by_test_id("ask-start").click()
    expect(teacher.get_by_test_id("ask-summary")).to_contain_text("0 of 2 learners predicted")
    expect(learner.get_by_test_id("event-log")).to_contain_text(
        "Class experiment: carol asks the class to run", timeout=10_000
    )
    card = learner.get_by_test_id("experiment-kill-replica")
    expect(learner.get_by_test_id("class-ask-kill-replica")).to_be_visible(timeout=10_000)
    expect(card.get_by_test_id("asked-badge")).to_be_visible()
    panel_shot(learner, "classroom-14-class-experiment-learner")
    card.get_by_test_id("prediction-kill-replica-under-3s").check()
    card.get_by_test_id("start-kill-replica").click()
    expect(card.get_by_test_id("run-status")).to_have_attribute("data-state", "running")
    expect(teacher.get_by_test_id("ask-summary")).to_contain_text(
        "1 of 2 learners predicted", timeout=10_000
    )
    expect(teacher.get_by_test_id("ask-row-alice")).to_contain_text("Less than 3 seconds")
    shot(teacher, "classroom-15-class-experiment-results", full_page=True)

    learner.get_by_test_id("stop-sandbox").click()
    expect(box).to_have_count(0, timeout=30_000)
    assert teacher_errors == []
