"""The classroom dashboard for a class of 200: the page's server time, and how long a
learner's change takes to reach an open dashboard. Prints one JSON object.

    DEBUG=true .venv/bin/python bench/dashboard.py [--learners 200] [--requests 50]
        [--updates 100]

A throwaway installation (``_harness``) on the Redis channel layer, the classroom
server's. The class: ``--learners`` learners, each further along than the last in a
realistic spread (chapters read, one or two quiz attempts per chapter read, checked
experiment runs), a tenth of them with a sandbox record running. Page: the instructor's
``GET /classrooms/<id>/`` through Django's test client (server time, warm). Updates: the
real ASGI application and consumer with a real session cookie, as a browser's dashboard
would have it open; each update is one learner marking a chapter read (through the same
service a learner's click calls, on the thread Django's ASGI handler runs sync views on), timed from
that call to the dashboard receiving the learner's re-rendered row. Updates come one at a
time, a random 0 to 0.5 s apart.

Targets (issue 12), on the 2-core reference machine: page p95 <= 150 ms; an update reaches
the dashboard in <= 1 s at p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from datetime import timedelta
from typing import Any

from _harness import percentile, platform

TARGET_PAGE_P95_MS = 150.0
TARGET_UPDATE_P99_MS = 1000.0


def seed(learners: int, rng: random.Random) -> tuple[Any, Any, list[Any]]:
    """The instructor, the classroom, and its learners, written in bulk (no signals)."""
    from django.utils import timezone

    from apps.accounts.models import User
    from apps.classrooms.models import Membership
    from apps.classrooms.services import classroom_create
    from apps.courses.models import ChapterProgress, QuizAttempt
    from apps.courses.selectors import chapter_list_live
    from apps.courses.services import content_sync_if_changed
    from apps.labs.models import ExperimentRun, Sandbox
    from apps.labs.patterns import PatternError, load_pattern

    content_sync_if_changed()
    chapters = chapter_list_live()
    instructor = User.objects.create_user(username="bench-instructor", role="instructor")
    classroom = classroom_create(owner=instructor, name="Bench class")
    now = timezone.now()
    users = User.objects.bulk_create(
        User(username=f"learner-{i:03d}", first_name=f"Learner {i}", last_login=now)
        for i in range(learners)
    )
    Membership.objects.bulk_create(Membership(classroom=classroom, user=u) for u in users)
    progress, attempts, runs, boxes = [], [], [], []
    experiments: dict[str, list[str]] = {}
    for chapter in chapters:
        try:
            experiments[chapter.sandbox] = [e.id for e in load_pattern(chapter.sandbox).experiments]
        except PatternError:
            experiments[chapter.sandbox] = []
    for user in users:
        reach = rng.randint(0, len(chapters) - 2)  # leaves a chapter or two for the updates
        for chapter in chapters[:reach]:
            progress.append(ChapterProgress(user=user, chapter=chapter))
            for _ in range(rng.randint(1, 2)):
                points = len(chapter.quiz)
                attempts.append(
                    QuizAttempt(user=user, chapter=chapter, answers={},
                                score=rng.randint(0, points), max_score=points)
                )  # fmt: skip
            for experiment in experiments[chapter.sandbox]:
                if rng.random() < 0.6:
                    runs.append(
                        ExperimentRun(user=user, pattern=chapter.sandbox, experiment=experiment,
                                      prediction="x", state=ExperimentRun.State.CHECKED,
                                      started_at=now - timedelta(minutes=rng.randint(5, 600)),
                                      correct=rng.random() < 0.5)
                    )  # fmt: skip
        if rng.random() < 0.1 and reach:
            boxes.append(
                Sandbox(owner=user, pattern=chapters[reach - 1].sandbox,
                        state=Sandbox.State.RUNNING, expires_at=now + timedelta(minutes=30),
                        last_seen_at=now)
            )  # fmt: skip
    ChapterProgress.objects.bulk_create(progress)
    QuizAttempt.objects.bulk_create(attempts)
    ExperimentRun.objects.bulk_create(runs)
    Sandbox.objects.bulk_create(boxes)
    return instructor, classroom, users


def page_times(instructor: Any, classroom: Any, requests: int) -> list[float]:
    from django.test import Client

    client = Client()
    client.force_login(instructor)
    url = f"/classrooms/{classroom.pk}/"
    for _ in range(5):  # warm the connection and the template cache
        assert client.get(url).status_code == 200
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(url)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    return samples


async def update_times(
    cookie: bytes, classroom: Any, users: list[Any], updates: int, rng: random.Random
) -> list[float]:
    from asgiref.sync import sync_to_async
    from channels.testing import WebsocketCommunicator

    from apps.courses.models import Chapter, ChapterProgress
    from apps.courses.services import chapter_mark_read
    from config.asgi import application

    ws = WebsocketCommunicator(
        application,
        f"/ws/classrooms/{classroom.pk}/",
        headers=[(b"cookie", cookie), (b"origin", b"http://localhost"), (b"host", b"localhost")],
    )
    connected, _ = await ws.connect()
    if not connected:
        raise SystemExit("the dashboard could not connect")

    def unread(user: Any) -> Any:
        read = ChapterProgress.objects.filter(user=user).values_list("chapter_id", flat=True)
        return Chapter.objects.filter(retired_at__isnull=True).exclude(pk__in=read).first()

    samples = []
    try:
        for _ in range(updates):
            user = rng.choice(users)
            chapter = await sync_to_async(unread)(user)
            if chapter is None:
                continue
            started = time.perf_counter()
            # As Django's ASGI handler runs a sync view: on the thread-sensitive executor.
            await sync_to_async(chapter_mark_read)(user=user, chapter=chapter)
            marker = f'id="learner-{user.pk}"'
            while True:
                message = await ws.receive_output(timeout=10)
                if message["type"] != "websocket.send":
                    raise SystemExit(f"the dashboard closed: {message}")
                html = message.get("text", "")
                if marker in html:
                    break
            samples.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(rng.uniform(0, 0.5))
    finally:
        await ws.disconnect()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--learners", type=int, default=200)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--updates", type=int, default=100)
    args = parser.parse_args()
    rng = random.Random(7)

    with platform("distlab-dashboard-", engine="local", redis=True) as lab:
        from django.conf import settings

        import config.asgi  # noqa: F401 (the web server's process, as it starts)

        settings.ALLOWED_HOSTS = ["testserver", "localhost"]
        instructor, classroom, users = seed(args.learners, rng)
        pages = page_times(instructor, classroom, args.requests)
        cookie = lab.cookie(instructor).encode()
        updates = asyncio.run(update_times(cookie, classroom, users, args.updates, rng))
    result: dict[str, Any] = {
        "benchmark": "dashboard",
        "learners": args.learners,
        "database": "sqlite",
        "layer": "redis",
        "page_requests": len(pages),
        "page_p50_ms": percentile(pages, 50),
        "page_p95_ms": percentile(pages, 95),
        "updates": len(updates),
        "update_p50_ms": percentile(updates, 50),
        "update_p99_ms": percentile(updates, 99),
        "target_page_p95_ms": TARGET_PAGE_P95_MS,
        "target_update_p99_ms": TARGET_UPDATE_P99_MS,
    }
    page_p95, update_p99 = result["page_p95_ms"], result["update_p99_ms"]
    result["ok"] = (
        page_p95 is not None
        and update_p99 is not None
        and page_p95 <= TARGET_PAGE_P95_MS
        and update_p99 <= TARGET_UPDATE_P99_MS
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
