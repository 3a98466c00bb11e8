"""docker-compose.yml describes the classroom stack consistently (a later issue runs it)."""

from __future__ import annotations

from pathlib import Path

import yaml
from django.core.management import get_commands

from tests.conftest import REPO


def load() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_it_has_the_classroom_services() -> None:
    services = load()["services"]
    assert set(services) == {"db", "redis", "web", "worker", "beat", "supervisor", "docker-proxy"}
    assert "healthcheck" in services["db"] and "healthcheck" in services["redis"]
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])


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


def test_only_the_proxy_holds_the_docker_socket_and_the_supervisor_goes_through_it() -> None:
    """Whoever holds the Docker socket is root on the host: only the filtering proxy
    does; the supervisor reaches Docker through the proxy's socket."""
    services = load()["services"]
    holders = [
        n for n, s in services.items() if any("docker.sock:" in v for v in s.get("volumes", []))
    ]
    assert holders == ["docker-proxy"]
    proxy, supervisor, worker = services["docker-proxy"], services["supervisor"], services["worker"]
    assert proxy["command"][:3] == ["python", "manage.py", "docker_proxy"]
    assert "docker_proxy" in get_commands()
    [group] = proxy["group_add"]
    assert group.startswith("${DOCKER_GID:?")  # required: the socket's group id
    listen = proxy["command"][proxy["command"].index("--listen") + 1]
    assert supervisor["environment"]["DOCKER_HOST"] == f"unix://{listen}"
    assert supervisor["environment"] == worker["environment"]  # the worker launches
    assert supervisor["volumes"] == worker["volumes"] == [f"docker-proxy:{Path(listen).parent}"]
    assert (supervisor["build"], supervisor["image"]) == (worker["build"], worker["image"])
    for service in (proxy, supervisor):
        assert "ports" not in service  # nothing reaches them from outside
    for name, service in services.items():  # never a silent fallback to local processes
        if service.get("image") == worker["image"]:
            assert service["environment"]["SANDBOX_ENGINE"] == "docker", name


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
