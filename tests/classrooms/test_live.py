"""The live dashboard: a learner's change reaches their instructors' open dashboards as
their row, re-rendered; joins and leaves re-render the matrix; nobody else may listen.
Against the real ASGI application with real session cookies, on both channel layers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections

from apps.accounts.models import User
from apps.classrooms import consumers
from apps.classrooms.models import Classroom, Membership
from apps.courses.models import Chapter, ChapterProgress, QuizAttempt
from tests.config.test_background import REDIS_URL, redis_answers
from tests.conftest import require
from tests.labs.test_consumers import HOST, ORIGIN, _cookie_for, _make_sandbox, refused_with

pytestmark = pytest.mark.django_db(transaction=True)
cookie_for = sync_to_async(_cookie_for)


@pytest.fixture(params=["memory", "redis"])
def layer(request: pytest.FixtureRequest, settings: Any) -> str:
    """Each test on the in-memory layer (one process) and on Redis (the classroom
    server's, shared by its web processes and workers)."""
    if request.param == "redis":
        require(redis_answers(), f"Redis at {REDIS_URL}")
        settings.CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.core.RedisChannelLayer",
                "CONFIG": {"hosts": [REDIS_URL], "prefix": f"distlab-live-test-{id(settings)}"},
            }
        }
    else:
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    return str(request.param)


@pytest.fixture(autouse=True)
async def _close_db_connections(transactional_db: None) -> AsyncIterator[None]:
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture
def dashboard() -> Any:
    opened: list[WebsocketCommunicator] = []

    def open_(
        classroom: Classroom | int, cookie: tuple[bytes, bytes] | None, query: str = ""
    ) -> WebsocketCommunicator:
        pk = classroom.pk if isinstance(classroom, Classroom) else classroom
        headers = [HOST, ORIGIN] + ([cookie] if cookie else [])
        from config.asgi import application

        ws = WebsocketCommunicator(application, f"/ws/classrooms/{pk}/?{query}", headers=headers)
        opened.append(ws)
        return ws

    return open_


async def connected(ws: WebsocketCommunicator) -> WebsocketCommunicator:
    assert (await ws.connect())[0]
    assert await ws.receive_nothing(timeout=0.2)  # nothing at connect: the page has it all
    return ws


async def test_a_learner_reading_a_chapter_updates_their_row_in_place(
    layer: str,
    classroom: Classroom,
    instructor: User,
    learner: User,
    course: list[Chapter],
    dashboard: Any,
) -> None:
    ws = await connected(dashboard(classroom, await cookie_for(instructor)))
    chapter = course[0]
    await sync_to_async(ChapterProgress.objects.create)(user=learner, chapter=chapter)
    html = await ws.receive_from(timeout=3)
    assert html.startswith(f'<tr id="learner-{learner.pk}"')
    assert 'hx-swap-oob="true"' in html
    assert f'data-testid="cell-{learner.username}-{chapter.number}"' in html
    assert "1 read" in html and "is-read" in html
    assert await ws.receive_nothing(timeout=0.7)  # one change, one row
    await ws.disconnect()


async def test_a_burst_of_changes_is_one_message_with_each_row_once(
    layer: str, classroom: Classroom, instructor: User, learner: User, other_learner: User,
    course: list[Chapter], dashboard: Any,
) -> None:  # fmt: skip
    await sync_to_async(Membership.objects.create)(classroom=classroom, user=other_learner)
    chapter = next(c for c in course if c.sandbox == "replicated-lb")  # _make_sandbox's
    ws = await connected(
        dashboard(classroom, await cookie_for(instructor), "chapter=" + chapter.slug)
    )

    def work() -> None:
        ChapterProgress.objects.create(user=learner, chapter=chapter)
        QuizAttempt.objects.create(user=learner, chapter=chapter, answers={}, score=1, max_score=2)
        _make_sandbox(other_learner)

    await sync_to_async(work)()
    html = await ws.receive_from(timeout=3)
    assert html.count("<tr ") == 2
    assert f'id="learner-{learner.pk}"' in html and f'id="learner-{other_learner.pk}"' in html
    assert html.count('class="matrix-cell') == 2  # the page's chapter filter holds
    assert "1 attempt)" in html and "● running" in html  # the quiz and the sandbox
    assert await ws.receive_nothing(timeout=0.7)
    await ws.disconnect()


async def test_a_join_re_renders_the_matrix(
    layer: str, classroom: Classroom, instructor: User, other_learner: User, course: list[Chapter],
    dashboard: Any,
) -> None:  # fmt: skip
    ws = await connected(dashboard(classroom, await cookie_for(instructor), "sort=quiz"))
    await sync_to_async(Membership.objects.create)(classroom=classroom, user=other_learner)
    html = await ws.receive_from(timeout=3)
    assert html.startswith('<section id="matrix"') and 'hx-swap-oob="true"' in html
    assert "2 learners" in html and f'data-testid="row-{other_learner.username}"' in html
    await ws.disconnect()


async def test_changes_in_another_class_or_outside_any_are_not_sent(
    layer: str, classroom: Classroom, other_classroom: Classroom, instructor: User,
    other_learner: User, outsider: User, course: list[Chapter], dashboard: Any,
) -> None:  # fmt: skip
    ws = await connected(dashboard(classroom, await cookie_for(instructor)))
    for user in (other_learner, outsider):
        await sync_to_async(ChapterProgress.objects.create)(user=user, chapter=course[0])
    assert await ws.receive_nothing(timeout=1.0)
    await ws.disconnect()


async def test_only_the_class_instructors_and_staff_may_listen(
    layer: str, classroom: Classroom, other_classroom: Classroom, instructor: User,
    other_instructor: User, learner: User, staff: User, dashboard: Any,
) -> None:  # fmt: skip
    assert await refused_with(dashboard(classroom, None)) == 4401
    assert await refused_with(dashboard(classroom, await cookie_for(learner))) == 4404
    assert await refused_with(dashboard(classroom, await cookie_for(other_instructor))) == 4404
    assert await refused_with(dashboard(99999, await cookie_for(instructor))) == 4404
    ws = await connected(dashboard(classroom, await cookie_for(staff)))
    await ws.disconnect()


async def test_a_learner_removed_from_the_class_stops_being_news(
    layer: str, classroom: Classroom, instructor: User, learner: User, course: list[Chapter],
    dashboard: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(consumers, "CHECK_EVERY_S", 0.0)  # re-check the viewer at every send
    ws = await connected(dashboard(classroom, await cookie_for(instructor)))

    def leave() -> None:
        from apps.classrooms.services import membership_end

        membership_end(classroom=classroom, user_id=learner.pk)

    await sync_to_async(leave)()
    html = await ws.receive_from(timeout=3)  # the roster changed: the matrix, without her
    assert "No learners yet" in html
    await sync_to_async(ChapterProgress.objects.create)(user=learner, chapter=course[0])
    assert await ws.receive_nothing(timeout=1.0)
    await ws.disconnect()
