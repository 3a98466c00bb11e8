from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from apps.accounts.models import User
from apps.labs import services
from apps.labs.engine.base import Engine
from apps.labs.models import Sandbox
from tests.conftest import client_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def sandbox(learner: User, local_engine: Engine) -> Sandbox:
    created = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    return services.sandbox_start(sandbox_id=created.hex)


def test_launch_from_the_panel(
    learner: User, local_engine: Engine, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    with django_capture_on_commit_callbacks() as callbacks:
        response = client_for(learner).post(
            reverse("labs:launch", args=["replicated-lb"]), HTTP_HX_REQUEST="true"
        )
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-testid="sandbox-state">Requested' in html
    assert 'hx-trigger="every 1s"' in html  # the panel polls until the sandbox runs
    assert len(callbacks) == 1
    assert Sandbox.objects.get().owner == learner


def test_over_quota_gets_a_message_not_an_error_page(sandbox: Sandbox, learner: User) -> None:
    response = client_for(learner).post(
        reverse("labs:launch", args=["replicated-lb"]), HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    assert "Stop one to launch another" in response.content.decode()
    assert Sandbox.objects.count() == 1


def test_the_local_engine_says_it_has_no_isolation(sandbox: Sandbox, learner: User) -> None:
    html = client_for(learner).get(reverse("labs:sandbox", args=[sandbox.hex])).content.decode()
    assert 'data-testid="no-isolation"' in html
    assert html.count('class="node node-running"') == 5


def test_the_chapter_page_shows_the_panel(sandbox: Sandbox, learner: User, chapter5) -> None:  # type: ignore[no-untyped-def]
    html = client_for(learner).get(chapter5.get_absolute_url()).content.decode()
    assert 'data-testid="sandbox-state">Running' in html
    assert 'data-testid="stop-sandbox"' in html


def test_chapters_whose_pattern_is_not_built_say_so(
    learner: User, course, local_engine: Engine
) -> None:  # type: ignore[no-untyped-def]
    chapter = next(c for c in course if c.sandbox != "replicated-lb")
    html = client_for(learner).get(chapter.get_absolute_url()).content.decode()
    assert 'data-testid="sandbox-unavailable"' in html
    assert 'data-testid="launch-sandbox"' not in html


def test_another_learner_gets_404_for_every_action(sandbox: Sandbox, other_learner: User) -> None:
    client = client_for(other_learner)
    assert client.get(reverse("labs:sandbox", args=[sandbox.hex])).status_code == 404
    for name in ("labs:stop", "labs:extend"):
        assert client.post(reverse(name, args=[sandbox.hex])).status_code == 404
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.RUNNING


def test_anonymous_visitors_are_sent_to_sign_in(sandbox: Sandbox, client: Client) -> None:
    response = client.get(reverse("labs:sandbox", args=[sandbox.hex]))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    assert client.post(reverse("labs:stop", args=[sandbox.hex])).status_code == 302
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.RUNNING


def test_staff_may_look_but_a_bad_id_is_404(sandbox: Sandbox, instructor: User) -> None:
    instructor.is_staff = True
    instructor.save()
    client = client_for(instructor)
    assert client.get(reverse("labs:sandbox", args=[sandbox.hex])).status_code == 200
    assert client.get(reverse("labs:sandbox", args=["not-a-uuid"])).status_code == 404


def test_the_owner_stops_and_extends(
    sandbox: Sandbox, learner: User, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    client = client_for(learner)
    before = sandbox.expires_at
    client.post(reverse("labs:extend", args=[sandbox.hex]), HTTP_HX_REQUEST="true")
    sandbox.refresh_from_db()
    assert sandbox.expires_at > before
    with django_capture_on_commit_callbacks() as callbacks:
        html = client.post(
            reverse("labs:stop", args=[sandbox.hex]), HTTP_HX_REQUEST="true"
        ).content.decode()
    assert "Removing the nodes" in html
    assert len(callbacks) == 1
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.STOPPING


def test_watching_the_panel_keeps_the_sandbox_from_idling(
    sandbox: Sandbox, learner: User, other_learner: User
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    long_ago = timezone.now() - timedelta(hours=1)
    Sandbox.objects.filter(pk=sandbox.pk).update(last_seen_at=long_ago)
    html = (
        client_for(learner)
        .get(reverse("labs:sandbox", args=[sandbox.hex]), HTTP_HX_REQUEST="true")
        .content.decode()
    )
    assert 'hx-trigger="every 30s"' in html  # a running panel keeps reporting in
    sandbox.refresh_from_db()
    assert sandbox.last_seen_at > long_ago
