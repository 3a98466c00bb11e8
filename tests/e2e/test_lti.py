"""Distlab launched from an LMS in a real headless Chromium: the test-side platform's
course page starts the login, its authorization page posts the signed launch back, and
Distlab takes it from there — a learner's first launch (new account, the chapter), an
instructor adding chapters by deep linking, a tampered launch refused, and the admin's
configuration page."""

from __future__ import annotations

from urllib.parse import urlencode

import jwt
import pytest
from django.test import Client
from playwright.sync_api import expect

from apps.accounts.models import User
from apps.classrooms.models import Membership
from apps.lti.models import Context, Identity
from tests.e2e.conftest import shot
from tests.lti.platform import serve_lms

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
PASSWORD = "a-long-enough-passphrase-1"


def test_a_course_in_an_lms_launches_distlab(browser, live_server, course) -> None:  # type: ignore[no-untyped-def]
    def new_page():  # type: ignore[no-untyped-def]
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(15_000)
        return page

    with serve_lms(host="localhost") as lms:
        lms.tool = live_server.url
        lms.register()
        lms.tool_jwks = Client().get("/lti/jwks/").json()

        def open_from_course(page, **who: str) -> None:  # type: ignore[no-untyped-def]
            page.goto(f"{lms.base}/course?{urlencode(who)}")
            page.get_by_role("button", name="Open Distlab").click()

        # The instructor adds chapter 5 to the course (deep linking).
        teacher = new_page()
        open_from_course(teacher, sub="lms-teacher", role="instructor", kind="deep")
        expect(teacher.get_by_test_id("lti-welcome")).to_be_visible()
        teacher.get_by_test_id("lti-new").click()
        expect(teacher.get_by_test_id("lti-deep-link")).to_be_visible()
        teacher.get_by_label("5. Replicated load-balanced services").check()
        shot(teacher, "70-lti-deep-link")
        teacher.get_by_test_id("lti-add").click()
        expect(teacher.get_by_role("heading", name="Added to your course")).to_be_visible()
        items = jwt.decode(lms.deep_links[0], options={"verify_signature": False})[
            "https://purl.imsglobal.org/spec/lti-dl/claim/content_items"
        ]
        assert [i["custom"]["chapter"] for i in items] == ["replicated-load-balanced-services"]

        # A learner's first launch: a new account, then the chapter.
        learner = new_page()
        open_from_course(learner, sub="lms-student", chapter="replicated-load-balanced-services")
        expect(learner.get_by_test_id("lti-welcome")).to_contain_text("Distributed Systems 101")
        shot(learner, "71-lti-welcome")
        learner.get_by_test_id("lti-new").click()
        expect(learner.get_by_role("heading", level=1)).to_contain_text(
            "Replicated load-balanced services"
        )
        expect(learner.locator(".nav-user")).to_contain_text("alex-")
        shot(learner, "72-lti-chapter")
        student = Identity.objects.get(sub="lms-student").user
        classroom = Context.objects.get().classroom
        assert classroom is not None and classroom.owner.username.startswith("alex-")
        assert Membership.objects.filter(classroom=classroom, user=student).exists()

        # A launch signed with another key is refused, and says why.
        intruder = new_page()
        open_from_course(intruder, sub="lms-student", tamper="1")
        expect(intruder.get_by_test_id("lti-refused")).to_contain_text("not signed by the LMS")
        expect(intruder.locator(".nav-user")).to_have_count(0)
        shot(intruder, "73-lti-refused")

    # The admin's page: the URLs to give the LMS and the registered platform.
    User.objects.create_user(username="root", password=PASSWORD, is_staff=True)
    admin = new_page()
    admin.goto(f"{live_server.url}/accounts/login/")
    admin.get_by_label("Username").fill("root")
    admin.get_by_label("Password").fill(PASSWORD)
    admin.get_by_role("button", name="Sign in").click()
    admin.get_by_test_id("nav-lti").click()
    expect(admin.get_by_test_id("lti-tool-urls")).to_contain_text(f"{live_server.url}/lti/login/")
    expect(admin.get_by_test_id("lti-platforms")).to_contain_text("Test LMS")
    shot(admin, "74-lti-configuration", full_page=True)
