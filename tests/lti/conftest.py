from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.test import Client

from apps.courses.models import Chapter
from tests.lti.platform import Lms, serve_lms


@pytest.fixture
def lms(course: list[Chapter]) -> Iterator[Lms]:
    """A registered test platform listening on loopback, with the real course indexed."""
    with serve_lms() as platform:
        platform.register()
        platform.tool_jwks = Client().get("/lti/jwks/").json()
        yield platform


@pytest.fixture
def browser() -> Client:
    """A browser with no Distlab session, checking CSRF as a real one does."""
    return Client(enforce_csrf_checks=True)


def choose(browser: Client, account: str) -> object:
    """The new user's choice on the welcome page, with the page's CSRF token."""
    page = browser.get("/lti/welcome/")
    assert page.status_code == 200, page.content
    token = browser.cookies["csrftoken"].value
    return browser.post("/lti/welcome/", {"account": account, "csrfmiddlewaretoken": token})
