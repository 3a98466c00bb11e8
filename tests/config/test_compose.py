"""docker-compose.yml describes the classroom stack consistently (a later issue runs it)."""

from __future__ import annotations

import yaml
from django.core.management import get_commands

from tests.conftest import REPO


def load() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_it_has_the_classroom_services() -> None:
    services = load()["services"]
    assert set(services) == {"db", "redis", "web", "worker", "beat", "supervisor"}
    assert "healthcheck" in services["db"] and "healthcheck" in services["redis"]


def test_app_services_build_our_image_and_reach_db_and_redis() -> None:
    compose = load()
    for name in ("web", "worker", "beat", "supervisor"):
        service = compose["services"][name]
        assert (REPO / service["build"]["dockerfile"]).is_file()
        env = service["environment"]
        assert env["DATABASE_URL"].startswith("postgres://") and "@db:" in env["DATABASE_URL"]
        assert env["REDIS_URL"].startswith("redis://redis:")
        assert set(service["depends_on"]) <= set(compose["services"])
    for volume in compose["services"]["db"]["volumes"]:
        assert volume.split(":")[0] in compose["volumes"]


def test_commands_exist() -> None:
    services = load()["services"]
    web = " ".join(services["web"]["command"])
    for command in ("migrate", "serve"):
        assert f"manage.py {command}" in web and command in get_commands()
    assert services["worker"]["command"][:4] == ["celery", "-A", "config", "worker"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "config", "beat"]
    assert services["supervisor"]["command"] == ["python", "manage.py", "supervise"]
    assert "supervise" in get_commands()


def test_the_supervisor_runs_like_the_worker_and_reaches_docker() -> None:
    """Same image and settings as the worker (plus the Docker engine, never a fallback to
    local processes), and the host's Docker socket with its group."""
    services = load()["services"]
    supervisor, worker = services["supervisor"], services["worker"]
    assert (supervisor["build"], supervisor["image"]) == (worker["build"], worker["image"])
    assert supervisor["depends_on"] == worker["depends_on"]
    assert supervisor["environment"] == worker["environment"]
    for name, service in services.items():  # never a silent fallback to local processes
        if service.get("image") == worker["image"]:
            assert service["environment"]["SANDBOX_ENGINE"] == "docker", name
    assert "/var/run/docker.sock:/var/run/docker.sock" in supervisor["volumes"]
    [group] = supervisor["group_add"]
    assert group.startswith("${DOCKER_GID:?")  # required: the socket's group id
    assert "ports" not in supervisor  # nothing reaches it: it only sends


def test_no_secret_is_written_in_it_and_the_web_port_is_for_the_proxy_only() -> None:
    """The database password came hard-coded, and X-Forwarded-Proto was trusted on a port
    published to everyone (anyone could claim HTTPS)."""
    compose = load()
    db = compose["services"]["db"]["environment"]
    assert db["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    url = compose["services"]["web"]["environment"]["DATABASE_URL"]
    assert ":${POSTGRES_PASSWORD:?" in url
    web = compose["services"]["web"]
    assert web["environment"]["TRUST_X_FORWARDED_PROTO"] == "true"
    assert all(port.startswith("127.0.0.1:") for port in web["ports"])
