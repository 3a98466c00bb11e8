"""Every response carries the Content-Security-Policy (the browser tests check that no
page breaks it)."""

from __future__ import annotations

import pytest
from django.test import Client

from config.security import POLICY

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "path", ["/", "/accounts/login/", "/nonexistent/", "/static/distlab/lab.js"]
)
def test_every_response_carries_the_policy(client: Client, path: str) -> None:
    response = client.get(path)
    assert response["Content-Security-Policy"] == POLICY


def test_the_policy_allows_no_inline_script_and_no_framing() -> None:
    directives = dict(d.split(" ", 1) for d in POLICY.split("; "))
    assert directives["script-src"] == "'self'"
    assert directives["object-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
