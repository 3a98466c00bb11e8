"""Background work: the same Celery tasks run on the embedded in-process worker (no
Redis) and on a real worker through Redis, including delayed and periodic tasks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import Celery
from django.conf import settings

from apps.courses.models import Chapter
from apps.courses.tasks import content_sync_task
from tests.conftest import REPO, require, shared_test_database_url
from tests.courses.factories import write_chapter

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    settings.CONTENT_DIR = tmp_path
    write_chapter(tmp_path, "01-one.md", slug="one", number=1)
    return tmp_path


@pytest.fixture
def embedded(embedded_celery_factory: Callable[..., Celery]) -> Celery:
    return embedded_celery_factory(
        {"content-sync": {"task": "apps.courses.tasks.content_sync_task", "schedule": 0.5}}
    )


@pytest.mark.django_db(transaction=True)
def test_embedded_worker_runs_delayed_tasks(embedded_celery: Celery, folder: Path) -> None:
    started = time.monotonic()
    content_sync_task.apply_async(countdown=1.0)
    time.sleep(0.3)
    assert not Chapter.objects.exists()  # not yet: the countdown holds it
    wait_for(lambda: Chapter.objects.filter(slug="one").exists())
    assert time.monotonic() - started >= 1.0


@pytest.mark.django_db(transaction=True)
def test_embedded_beat_runs_periodic_tasks(embedded: Celery, folder: Path) -> None:
    wait_for(lambda: Chapter.objects.filter(slug="one").exists())
    write_chapter(folder, "02-two.md", slug="two", number=2)
    wait_for(lambda: Chapter.objects.filter(slug="two").exists())


def redis_answers() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_runs_tasks_through_redis(folder: Path) -> None:
    require(redis_answers(), f"Redis at {REDIS_URL}")
    database_url = shared_test_database_url()
    env = {
        **os.environ,
        "DEBUG": "true",
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": database_url,
        "CONTENT_DIR": str(folder),
    }
    # A queue of our own, so no other worker on this Redis takes the task.
    queue = f"test-{os.getpid()}"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "--pool=solo",
            "-Q",
            queue,
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "--loglevel=WARNING",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        app = Celery("producer", broker=REDIS_URL)
        app.send_task("apps.courses.tasks.content_sync_task", queue=queue, countdown=0.5)
        wait_for(lambda: Chapter.objects.filter(slug="one").exists(), timeout=30)
    finally:
        worker.terminate()
        output = worker.communicate(timeout=30)[0]
    assert "Traceback" not in output, output
