"""A learner launches chapter 5's sandbox from the chapter page, watches it come up, and
stops it — through the real launch task on the embedded worker."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from apps.accounts.models import User
from apps.courses.models import Chapter
from apps.labs.models import Sandbox
from tests.e2e.conftest import shot

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def sign_in(page, username: str, password: str) -> None:  # type: ignore[no-untyped-def]
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def test_launch_watch_and_stop_from_the_chapter(
    page, course, local_engine, embedded_celery
) -> None:  # type: ignore[no-untyped-def]
    User.objects.create_user(username="lab", password="a-long-enough-passphrase-1")
    sign_in(page, "lab", "a-long-enough-passphrase-1")
    page.goto(Chapter.objects.get(number=5).get_absolute_url() + "#sandbox")
    panel = page.locator("#sandbox-box")
    expect(panel.get_by_test_id("no-isolation")).to_be_visible()  # said plainly

    panel.get_by_test_id("launch-sandbox").click()
    expect(page.get_by_test_id("sandbox-state")).to_have_text("Running", timeout=30_000)
    expect(page.locator(".node-list [data-node]")).to_have_count(5)
    page.locator("#sandbox").scroll_into_view_if_needed()
    shot(page, "10-sandbox-running")

    sandbox = Sandbox.objects.get()
    assert sandbox.state == Sandbox.State.RUNNING
    assert len(local_engine.status(sandbox.hex)) == 5

    page.get_by_test_id("stop-sandbox").click()
    expect(page.get_by_test_id("launch-sandbox")).to_be_visible(timeout=30_000)
    expect(panel).to_contain_text("stopped and its nodes removed")
    shot(page, "11-sandbox-stopped")
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.STOPPED
    assert local_engine.list_sandboxes() == []
