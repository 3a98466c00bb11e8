"""LTI 1.3 launches from a test platform that signs with its own key: a new learner gets
an account (or links the one they are signed in to), lands on the chapter, and joins the
LMS course's classroom; every launch that is not exactly right is refused with words a
learner can act on, and changes nothing."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import Client

from apps.accounts.models import User
from apps.classrooms.models import Membership
from apps.lti.models import Context, Identity, ScoreLink
from tests.conftest import client_for
from tests.lti.conftest import choose
from tests.lti.platform import INSTRUCTOR, Lms, rsa_key

CHAPTER = "/chapters/replicated-load-balanced-services/"


def signed_in(browser: Client) -> User | None:
    response = browser.get(CHAPTER)
    user = response.wsgi_request.user
    return user if user.is_authenticated else None  # type: ignore[return-value]


def test_a_new_learner_gets_an_account_and_lands_on_the_chapter(lms: Lms, browser: Client) -> None:
    first = lms.launch(browser)
    assert first.status_code == 302 and first["Location"] == "/lti/welcome/"
    page = browser.get("/lti/welcome/")
    assert b"Create my Distlab account" in page.content
    assert b"Test LMS" in page.content and b"Distributed Systems 101" in page.content

    landed = choose(browser, "new")
    assert landed["Location"] == CHAPTER  # type: ignore[index]
    user = signed_in(browser)
    assert user is not None and user.first_name == "Alex" and user.email == "alex@school.invalid"
    assert not user.has_usable_password()
    assert Identity.objects.get(sub="lms-user-1").user == user
    link = ScoreLink.objects.get(user=user)
    assert link.lineitem == lms.lineitem and link.chapter.slug in CHAPTER

    # Next time, straight to the chapter, as the same account.
    again = lms.launch(Client(enforce_csrf_checks=True))
    assert again.status_code == 302 and again["Location"] == CHAPTER
    assert User.objects.filter(lti_identities__isnull=False).count() == 1


def test_over_https_the_launch_cookies_work_across_sites(lms: Lms, browser: Client) -> None:
    """Behind TLS the state and launch-session cookies are SameSite=None; Secure (the
    LMS posts from another site); the launch works with them."""
    response = lms.launch(browser, secure=True)
    assert response.status_code == 302 and response["Location"] == "/lti/welcome/"
    state = [c for name, c in browser.cookies.items() if name.startswith("lti1p3-state-")]
    assert state and state[0]["samesite"] == "None" and state[0]["secure"]


def test_over_https_a_browser_that_drops_the_cookies_is_told_why(lms: Lms, browser: Client) -> None:
    state, nonce = lms.login(browser, secure=True)
    framed = Client(enforce_csrf_checks=True)  # as a browser blocking cross-site cookies
    post = {"id_token": lms.id_token(nonce), "state": state}
    refused(framed.post("/lti/launch/", post, secure=True), "open in a new window")


def test_a_signed_in_learner_links_their_account(lms: Lms, learner: User) -> None:
    browser = client_for(learner)
    assert lms.launch(browser)["Location"] == "/lti/welcome/"
    page = browser.get("/lti/welcome/")
    assert f"signed in to Distlab as <strong>{learner.username}".encode() in page.content
    assert choose(browser, "this")["Location"] == CHAPTER  # type: ignore[index]
    assert Identity.objects.get(sub="lms-user-1").user == learner


def test_the_custom_parameter_names_the_chapter(lms: Lms, browser: Client) -> None:
    lms.launch(browser, custom={"chapter": "introduction"}, target="http://testserver/")
    assert choose(browser, "new")["Location"] == "/chapters/introduction/"  # type: ignore[index]


def test_the_course_becomes_a_classroom_its_learners_join(lms: Lms) -> None:
    teacher = Client(enforce_csrf_checks=True)
    lms.launch(teacher, sub="lms-teacher", roles=(INSTRUCTOR,))
    choose(teacher, "new")
    owner = Identity.objects.get(sub="lms-teacher").user
    assert owner.is_instructor
    classroom = Context.objects.get(context_id="course-7").classroom
    assert classroom is not None and classroom.owner == owner
    assert classroom.name == "Distributed Systems 101"

    student = Client(enforce_csrf_checks=True)
    lms.launch(student, sub="lms-student")
    choose(student, "new")
    learner = Identity.objects.get(sub="lms-student").user
    assert not learner.is_instructor
    assert Membership.objects.filter(classroom=classroom, user=learner, left_at=None).exists()
    dashboard = client_for(owner).get(classroom.get_absolute_url())
    assert dashboard.status_code == 200 and learner.username.encode() in dashboard.content


def refused(response: object, words: str) -> None:
    assert response.status_code == 400, response.content  # type: ignore[attr-defined]
    assert words in response.content.decode()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"key": rsa_key()[0]}, "not signed by the LMS"),
        ({"aud": "another-tool"}, "meant for another tool"),
        ({"exp": int(time.time()) - 120, "iat": int(time.time()) - 600}, "has expired"),
        ({"nonce": "a-nonce-distlab-never-sent"}, "already used"),
        (
            {"https://purl.imsglobal.org/spec/lti/claim/deployment_id": "not-registered"},
            "deployment",
        ),
        ({"target": "http://testserver/", "custom": None}, "does not say which chapter"),
        ({"custom": {"chapter": "no-such-chapter"}}, "does not have"),
    ],
    ids=[
        "bad-signature",
        "wrong-audience",
        "expired",
        "unknown-nonce",
        "deployment",
        "no-chapter",
        "unknown-chapter",
    ],
)
def test_a_launch_that_is_not_right_is_refused_and_changes_nothing(
    lms: Lms, browser: Client, change: dict[str, Any], words: str
) -> None:
    refused(lms.launch(browser, **change), words)
    assert not Identity.objects.exists() and signed_in(browser) is None


def test_a_replayed_launch_is_refused(lms: Lms, browser: Client) -> None:
    state, nonce = lms.login(browser)
    post = {"id_token": lms.id_token(nonce), "state": state}
    assert browser.post("/lti/launch/", post).status_code == 302
    refused(browser.post("/lti/launch/", post), "already used")


def test_a_launch_without_distlabs_state_is_refused(lms: Lms, browser: Client) -> None:
    _, nonce = lms.login(browser)
    stranger = Client(enforce_csrf_checks=True)  # another browser: no state cookie
    refused(
        stranger.post("/lti/launch/", {"id_token": lms.id_token(nonce), "state": "state-x"}),
        "did not start from a sign-in",
    )


def test_an_unregistered_platform_cannot_start_a_login(lms: Lms, browser: Client) -> None:
    response = browser.post("/lti/login/", {"iss": "https://lms.invalid", "login_hint": "x"})
    refused(response, "not registered")


def test_the_welcome_page_needs_a_launch(browser: Client, db: None) -> None:
    response = browser.get("/lti/welcome/")
    assert response.status_code == 410 and b"expired" in response.content
