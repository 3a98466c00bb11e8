"""Fixed users and a small content folder shared by the whole suite."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.cache import cache
from django.test import Client

from apps.accounts.models import User
from apps.courses.models import Chapter
from apps.courses.services import content_sync

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


def make_user(username: str, role: str = User.Role.LEARNER) -> User:
    return User.objects.create_user(
        username=username, email=f"{username}@example.invalid", password=PASSWORD, role=role
    )


@pytest.fixture(autouse=True)
def _clear_cache() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


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
