"""Health endpoints for a proxy or compose (`/healthz`, `/readyz`) and `manage.py doctor`,
against the real database, a real (local) engine, and a Redis and a Docker engine that do
not answer: a closed loopback port and a socket that does not exist."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from apps.courses.services import content_sync
from apps.labs.engine import get_engine
from tests.conftest import REPO

pytestmark = pytest.mark.django_db(transaction=True)  # the checks run on threads of their own


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def local_engine(settings, tmp_path: Path) -> Iterator[None]:  # type: ignore[no-untyped-def]
    settings.SANDBOX_ENGINE = "local"
    settings.VAR_DIR = tmp_path
    get_engine.cache_clear()
    yield
    get_engine.cache_clear()


@pytest.fixture
def docker_gone(settings, tmp_path: Path) -> Iterator[None]:  # type: ignore[no-untyped-def]
    settings.SANDBOX_ENGINE = "docker"
    settings.DOCKER_HOST = f"unix://{tmp_path}/docker.sock"
    get_engine.cache_clear()
    yield
    get_engine.cache_clear()


@pytest.fixture
def redis_gone(settings) -> str:  # type: ignore[no-untyped-def]
    url = f"redis://127.0.0.1:{closed_port()}/0"
    settings.REDIS_URL = url
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}
    }
    return url


def test_healthz_answers_without_touching_the_database_whatever_the_host(
    client: Client, django_assert_num_queries, settings
) -> None:  # type: ignore[no-untyped-def]
    settings.ALLOWED_HOSTS = ["lab.example.org"]
    settings.SECURE_SSL_REDIRECT = True
    with django_assert_num_queries(0):
        response = client.get("/healthz", HTTP_HOST="127.0.0.1:8000")  # a container's check
    assert response.status_code == 200
    assert response.content == b"ok\n"
    assert response["Cache-Control"] == "no-store"
    assert client.get("/", HTTP_HOST="127.0.0.1:8000").status_code == 400  # the rest: refused


def test_readyz_is_ready_when_database_and_engine_answer(client: Client, local_engine) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/readyz")
    assert response.status_code == 200, response.json()
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "redis": "ok", "engine": "ok"},
    }


def test_readyz_names_what_fails_and_keeps_the_details_to_itself(
    client: Client, docker_gone, redis_gone: str
) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    response = client.get("/readyz")
    assert time.monotonic() - started < 5  # each check is bounded
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert body["checks"] == {"database": "ok", "redis": "failing", "engine": "failing"}
    assert "docker.sock" not in response.content.decode()
    assert redis_gone.split("//")[1] not in response.content.decode()


def test_readyz_refuses_writes(client: Client) -> None:
    assert client.post("/readyz").status_code == 405


def test_doctor_says_what_to_fix_and_how(local_engine, settings) -> None:  # type: ignore[no-untyped-def]
    settings.DEBUG = False
    out = StringIO()
    with pytest.raises(CommandError, match="1 to fix: content"):
        call_command("doctor", stdout=out)
    text = out.getvalue()
    assert "no chapter is indexed" in text
    assert "manage.py content sync" in text  # the advice, not just the failure
    assert "database       sqlite answers" in text or "postgresql answers" in text

    content_sync(content_dir=REPO / "content")
    out = StringIO()
    call_command("doctor", stdout=out)
    assert "12 chapters" in out.getvalue()
    assert "Distlab is ready for a class." in out.getvalue()


def test_doctor_points_at_the_engine_and_warns_of_debug(docker_gone, settings) -> None:  # type: ignore[no-untyped-def]
    settings.DEBUG = True
    content_sync(content_dir=REPO / "content")
    out = StringIO()
    with pytest.raises(CommandError, match="2 to fix: engine, sandbox image"):
        call_command("doctor", stdout=out)
    text = out.getvalue()
    assert "Start the Docker engine (dockerd), or correct DOCKER_HOST" in text
    assert "sandbox image  needs the engine (above)" in text
    assert "warn debug mode" in text
