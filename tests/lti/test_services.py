"""LTI's other half: deep linking (an instructor picks chapters; the platform gets a
signed list of links) and scores back (Assignment and Grade Services, through the
platform's token endpoint); the tool's keyset; the admin's configuration page."""

from __future__ import annotations

import jwt
import pytest
from django.test import Client

from apps.accounts.models import User
from apps.courses.models import Chapter
from apps.lti.models import Platform, ScoreLink
from apps.lti.scores import SendFailed, chapter_score
from apps.lti.tasks import send_scores_task
from tests.conftest import client_for, make_user
from tests.lti.conftest import choose
from tests.lti.platform import INSTRUCTOR, Lms

CHAPTER5 = "replicated-load-balanced-services"


def deep_link_page(lms: Lms, browser: Client, roles: tuple[str, ...] = (INSTRUCTOR,)) -> object:
    lms.launch(browser, message_type="LtiDeepLinkingRequest", sub="lms-teacher", roles=roles)
    landed = choose(browser, "new")
    assert landed["Location"] == "/lti/deep-link/"  # type: ignore[index]
    return browser.get("/lti/deep-link/")


def test_an_instructor_picks_chapters_and_the_platform_gets_signed_links(
    lms: Lms, browser: Client
) -> None:
    page = deep_link_page(lms, browser)
    assert page.status_code == 200  # type: ignore[attr-defined]
    assert b"Replicated load-balanced services" in page.content  # type: ignore[attr-defined]
    token = browser.cookies["csrftoken"].value
    answer = browser.post(
        "/lti/deep-link/",
        {"chapter": [CHAPTER5, "introduction"], "csrfmiddlewaretoken": token},
    )
    assert answer.status_code == 200
    html = answer.content.decode()
    assert f'action="{lms.base}/deep-link-return"' in html
    assert f"form-action 'self' {lms.base}" in answer["Content-Security-Policy"]
    signed = html.split('name="JWT" value="')[1].split('"')[0]

    # The platform checks it with the keys Distlab publishes.
    key = jwt.PyJWK(lms.tool_jwks["keys"][0]).key
    claims = jwt.decode(signed, key, algorithms=["RS256"], audience=lms.issuer)
    assert claims["iss"] == lms.client_id
    assert claims["https://purl.imsglobal.org/spec/lti-dl/claim/data"] == "opaque-platform-data"
    items = claims["https://purl.imsglobal.org/spec/lti-dl/claim/content_items"]
    by_chapter = {item["custom"]["chapter"]: item for item in items}
    assert set(by_chapter) == {CHAPTER5, "introduction"}
    ch5 = Chapter.objects.get(slug=CHAPTER5)
    assert by_chapter[CHAPTER5]["url"] == f"http://testserver/chapters/{CHAPTER5}/"
    assert by_chapter[CHAPTER5]["lineItem"]["scoreMaximum"] == 1 + ch5.quiz_points + 2

    # The picker is used once.
    assert browser.get("/lti/deep-link/").status_code == 404


def test_a_learner_cannot_add_chapters(lms: Lms, browser: Client) -> None:
    page = deep_link_page(
        lms, browser, roles=("http://purl.imsglobal.org/vocab/lis/v2/membership#Learner",)
    )
    assert page.status_code == 403  # type: ignore[attr-defined]


def test_no_chapter_picked_is_said(lms: Lms, browser: Client) -> None:
    deep_link_page(lms, browser)
    token = browser.cookies["csrftoken"].value
    answer = browser.post("/lti/deep-link/", {"csrfmiddlewaretoken": token})
    assert answer.status_code == 400 and b"Pick at least one chapter" in answer.content


def launched_learner(lms: Lms) -> tuple[User, Client]:
    browser = Client()
    lms.launch(browser)
    choose(browser, "new")
    return ScoreLink.objects.get().user, browser


def test_progress_on_the_chapter_goes_back_to_the_lms_as_a_score(
    lms: Lms, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    user, browser = launched_learner(lms)
    chapter = Chapter.objects.get(slug=CHAPTER5)
    maximum = chapter_score(user_id=user.pk, chapter=chapter).maximum

    with django_capture_on_commit_callbacks() as queued:
        browser.post(f"/chapters/{CHAPTER5}/progress/")
    assert [c.__module__ for c in queued].count("apps.lti.scores") == 1
    send_scores_task.apply(args=(user.pk, chapter.pk)).get()

    score = lms.scores[-1]
    assert score["scoreGiven"] == 1 and score["scoreMaximum"] == maximum
    assert score["userId"] == "lms-user-1"
    assert score["activityProgress"] == "InProgress" and score["gradingProgress"] == "FullyGraded"
    link = ScoreLink.objects.get()
    assert (link.sent_given, link.sent_maximum, link.error) == (1, maximum, "")


def test_progress_elsewhere_sends_nothing(lms: Lms, django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    _, browser = launched_learner(lms)
    with django_capture_on_commit_callbacks() as queued:
        browser.post("/chapters/introduction/progress/")
    assert "apps.lti.scores" not in [c.__module__ for c in queued]


def test_a_refused_score_is_recorded_and_retried(lms: Lms) -> None:
    user, _ = launched_learner(lms)
    chapter = Chapter.objects.get(slug=CHAPTER5)
    lms.fail_scores = True
    with pytest.raises(SendFailed):
        send_scores_task.run(user.pk, chapter.pk)
    assert "HTTP 503" in ScoreLink.objects.get().error
    lms.fail_scores = False
    send_scores_task.run(user.pk, chapter.pk)
    assert ScoreLink.objects.get().error == "" and lms.scores


def test_a_token_request_signed_with_an_unpublished_key_is_refused(lms: Lms) -> None:
    user, _ = launched_learner(lms)
    lms.tool_jwks = {"keys": []}  # the platform knows no key of Distlab's
    with pytest.raises(SendFailed):
        send_scores_task.run(user.pk, Chapter.objects.get(slug=CHAPTER5).pk)
    assert "HTTP 401" in ScoreLink.objects.get().error and not lms.scores
    assert lms.refusals


def test_the_keyset_publishes_the_signing_key(client: Client, db: None) -> None:
    keys = client.get("/lti/jwks/").json()["keys"]
    assert len(keys) == 1 and keys[0]["kty"] == "RSA" and keys[0]["alg"] == "RS256"
    assert "d" not in keys[0]  # the public half only


@pytest.mark.parametrize("who", ["anonymous", "learner", "instructor"])
def test_only_the_schools_admin_configures_lti(who: str, db: None) -> None:
    browser = Client() if who == "anonymous" else client_for(make_user(who, who))
    response = browser.get("/lti/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_the_admin_registers_a_platform(db: None) -> None:
    admin = make_user("root")
    admin.is_staff = True
    admin.save(update_fields=["is_staff"])
    browser = client_for(admin)
    page = browser.get("/lti/")
    assert b"http://testserver/lti/login/" in page.content and b"BEGIN PUBLIC KEY" in page.content
    form = {
        "name": "Moodle",
        "issuer": "https://moodle.school.invalid",
        "client_id": "abc123",
        "deployment_ids": " 1 \n\n 2 ",
        "auth_login_url": "https://moodle.school.invalid/mod/lti/auth.php",
        "auth_token_url": "https://moodle.school.invalid/mod/lti/token.php",
        "key_set_url": "https://moodle.school.invalid/mod/lti/certs.php",
        "active": "on",
    }
    bad = browser.post(
        "/lti/",
        {**form, "deployment_ids": "  ", "key_set_url": "ftp://moodle.school.invalid/certs"},
    )
    assert bad.status_code == 400 and b"This field is required" in bad.content
    assert b"An http(s) URL" in bad.content
    assert not Platform.objects.exists()
    assert browser.post("/lti/", form).status_code == 302
    assert Platform.objects.get().deployments == ["1", "2"]
