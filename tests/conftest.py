"""Fixed users and a small content folder shared by the whole suite."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache
from django.test import Client

from apps.accounts.models import User
from apps.courses.models import Chapter
from apps.courses.services import content_sync
from apps.labs.engine import get_engine
from apps.labs.engine.base import Engine
from config.celery import app as default_app
from config.embedded import EmbeddedCelery

PASSWORD = "correct-horse-battery-staple"
REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip a test whose engine is missing on a developer's machine; fail it in CI, where
    everything the suite needs must be installed (`.ci/run`)."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def shared_test_database_url() -> str:
    """DATABASE_URL of the test database, for a subprocess (a worker, a command) that must
    see the rows this test commits. Requires PostgreSQL (in CI); skips elsewhere."""
    from django.db import connection

    require(connection.vendor == "postgresql", "PostgreSQL (a database another process can open)")
    db = connection.settings_dict
    return f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def queued(callbacks: list[Any]) -> list[Any]:
    """The on-commit callbacks that queue work, without the live dashboard's news
    (``apps.classrooms.live``, which follows every sandbox and run saved)."""
    return [c for c in callbacks if getattr(c, "__module__", "") != "apps.classrooms.live"]


def make_user(username: str, role: str = User.Role.LEARNER) -> User:
    return User.objects.create_user(
        username=username, email=f"{username}@example.invalid", password=PASSWORD, role=role
    )


@pytest.fixture
def embedded_celery_factory() -> Iterator[Callable[..., Celery]]:
    """Starts background tasks for real, on the embedded worker (in-memory broker),
    whatever broker the settings name. Tests using it need ``transaction=True`` so the
    worker's threads see committed rows."""
    from celery import _state

    workers: list[EmbeddedCelery] = []
    previous_default = _state.default_app

    def start(beat_schedule: dict[str, Any] | None = None) -> Celery:
        app = Celery("embedded-test")
        app.config_from_object("django.conf:settings", namespace="CELERY")
        app.conf.broker_url = "memory://"
        app.conf.beat_schedule = beat_schedule or {}
        app.autodiscover_tasks(force=True)  # every app's tasks, before the worker starts
        app.set_current()
        app.set_default()  # for other threads too (the live server's request threads)
        worker = EmbeddedCelery(app)
        worker.start()
        workers.append(worker)
        return app

    yield start
    for worker in workers:
        worker.stop()
    _state.set_default_app(previous_default)
    default_app.set_current()


@pytest.fixture
def embedded_celery(embedded_celery_factory: Callable[..., Celery]) -> Celery:
    return embedded_celery_factory()


@pytest.fixture
def local_engine(settings, tmp_path: Path) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    """Sandboxes run on the local-process engine, in a folder of this test's own; every
    sandbox left behind is destroyed afterwards."""
    settings.SANDBOX_ENGINE = "local"
    settings.VAR_DIR = tmp_path
    settings.SANDBOX_INSTANCE = f"test-{os.getpid()}"
    get_engine.cache_clear()
    engine = get_engine()
    yield engine
    for info in engine.list_sandboxes():
        engine.destroy(info.sandbox_id)
    get_engine.cache_clear()


def clear_own_cache() -> None:
    """Empty this test process's cache. On Redis only the keys under this process's prefix
    go (``cache.clear()`` would flush the database that parallel workers share)."""
    default = caches["default"]
    if isinstance(default, RedisCache):
        client = default._cache.get_client(None, write=True)
        keys = list(client.scan_iter(match=f"{default.key_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    else:
        default.clear()


@pytest.fixture(autouse=True)
def _clear_cache() -> Iterator[None]:
    clear_own_cache()
    yield
    clear_own_cache()


@pytest.fixture
def learner(db: None) -> User:
    return make_user("alice")


@pytest.fixture
def other_learner(db: None) -> User:
    return make_user("bob")


@pytest.fixture
def instructor(db: None) -> User:
    return make_user("carol", User.Role.INSTRUCTOR)


@pytest.fixture
def outsider(db: None) -> User:
    """Signed in, but a stranger to everyone else's data (and inactive in no class)."""
    return make_user("mallory")


def client_for(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def learner_client(learner: User) -> Client:
    return client_for(learner)


@pytest.fixture
def instructor_client(instructor: User) -> Client:
    return client_for(instructor)


@pytest.fixture
def content_dir(tmp_path: Path, settings) -> Path:  # type: ignore[no-untyped-def]
    """A copy of the real course content that a test may edit freely."""
    target = tmp_path / "content"
    shutil.copytree(REPO / "content", target)
    settings.CONTENT_DIR = target
    return target


@pytest.fixture
def course(db: None, content_dir: Path) -> list[Chapter]:
    """The real course, indexed."""
    content_sync(content_dir=content_dir)
    return list(Chapter.objects.filter(retired_at__isnull=True).order_by("number"))


@pytest.fixture
def chapter5(course: list[Chapter]) -> Chapter:
    return Chapter.objects.get(number=5)


def _realtime_paths() -> tuple[str, ...]:
    patterns = sorted(p.name for p in (REPO / "sandboxes" / "patterns").iterdir() if p.is_dir())
    nodes = tuple(f"tests/sandboxes/test_{name.replace('-', '_')}.py" for name in patterns)
    return ("tests/walkthroughs/", "tests/e2e/test_pattern_labs.py", *nodes)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A pattern run on real time (its node programs, its chapter's walkthrough, its lab in
    Chromium), each on processes or a sandbox of its own, is marked ``realtime``: such
    tests mostly wait on the clock, and `make test` runs them side by side after the rest."""
    paths = _realtime_paths()
    for item in items:
        if item.nodeid.startswith(paths):
            item.add_marker(pytest.mark.realtime)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No sandbox node process outlives the test run, even if a test died half-way."""
    import signal

    from apps.labs.engine.local import _node_processes

    basetemp = str(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    for pid in _node_processes():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"DISTLAB_STATE_DIR={basetemp}".encode() in environ:
            os.kill(pid, signal.SIGKILL)
