"""Is this Distlab able to serve a class? Checks of what it depends on, each with advice a
teacher can act on: for `/healthz` and `/readyz` (a proxy's or compose's health checks) and
for `manage.py doctor` (a person at a terminal).

Every check is bounded in time (``CHECK_TIMEOUT_S``): a database or Docker engine that
hangs is reported as not answering rather than holding the caller.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse

CHECK_TIMEOUT_S = 3.0


class LivenessMiddleware:
    """``GET /healthz``: the process answers HTTP. Answered before anything else, so that a
    health check from inside a container (Host 127.0.0.1, plain HTTP) is neither refused
    by ALLOWED_HOSTS nor redirected to HTTPS, and a slow database never gets a live web
    process restarted."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/healthz" and request.method in ("GET", "HEAD"):
            response = HttpResponse("ok\n", content_type="text/plain")
            response["Cache-Control"] = "no-store"
            return response
        return self.get_response(request)


class Failing(Exception):
    """A check failed: ``detail`` says what was seen, ``advice`` what to do."""

    level = "fail"

    def __init__(self, detail: str, advice: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.advice = advice


class Caution(Failing):
    """Works, but not as a server for a class should."""

    level = "warn"


@dataclass(frozen=True)
class Check:
    name: str
    level: str  # ok, warn or fail
    detail: str
    advice: str = ""

    @property
    def ok(self) -> bool:
        return self.level != "fail"


def database() -> str:
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        raise Failing(
            f"cannot reach {connection.vendor}: {exc}".strip(),
            "Start the database server, or correct DATABASE_URL.",
        ) from exc
    return f"{connection.vendor} answers"


def _needs_database(check: Callable[[], str]) -> Callable[[], str]:
    """A check that reads the database says so when the database is the problem."""

    def checked() -> str:
        try:
            connection.ensure_connection()
        except Exception as exc:
            raise Failing("needs the database (above)", "") from exc
        return check()

    checked.__name__ = check.__name__
    return checked


@_needs_database
def migrations() -> str:
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if pending:
        raise Failing(
            f"{len(pending)} migration(s) not applied",
            "Run `python manage.py migrate` (make run does it).",
        )
    return "all applied"


def redis() -> str:
    if not settings.REDIS_URL:
        return "not used: in-memory channel layer and an in-process worker"
    import redis as redis_py  # Redis itself: the site's cache carries on without it

    key = f"health:{uuid.uuid4().hex}"
    client = redis_py.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.set(key, "1", ex=10)
        answered = client.get(key)
        client.delete(key)
    except Exception as exc:
        raise Failing(f"cannot reach Redis: {exc}", "Start Redis, or correct REDIS_URL.") from exc
    finally:
        client.close()
    if answered != b"1":
        raise Failing("Redis did not keep a value", "Check Redis's memory and eviction settings.")
    return "answers"


def engine() -> str:
    from apps.labs.engine import get_engine

    try:
        current = get_engine()
        current.ping()
    except Exception as exc:
        if settings.SANDBOX_ENGINE == "local":
            advice = "Check that VAR_DIR is writable."
        else:
            advice = (
                "Start the Docker engine (dockerd), or correct DOCKER_HOST; the user running "
                "Distlab must be allowed on the Docker socket."
            )
        raise Failing(f"the sandbox engine does not answer: {exc}", advice) from exc
    kind = "Docker" if type(current).__name__ == "DockerEngine" else "local processes"
    return f"{kind} ({settings.SANDBOX_ENGINE}) answers"


def image() -> str:
    from apps.labs.engine import EngineUnavailable, get_engine
    from apps.labs.engine.docker import DockerEngine
    from apps.labs.image import image_exists

    current = get_engine()
    if not isinstance(current, DockerEngine):
        return "not needed: sandboxes run as local processes"
    try:
        present = image_exists(current.client, current.image)
    except EngineUnavailable as exc:
        raise Failing("needs the engine (above)", "") from exc
    if not present:
        raise Failing(
            f"the sandbox image {current.image} is not on this Docker engine",
            "Build it: `make image` (or `make image IMAGE_ARGS=--offline` where no "
            "registry answers).",
        )
    return f"{current.image} present"


@_needs_database
def content() -> str:
    from apps.courses.models import Chapter

    count = Chapter.objects.filter(retired_at__isnull=True).count()
    if not count:
        raise Failing(
            "no chapter is indexed: the course is empty",
            "Run `python manage.py content sync` (and check CONTENT_DIR).",
        )
    return f"{count} chapters"


def debug_mode() -> str:
    if settings.DEBUG:
        raise Caution(
            "DEBUG is on: fine on your own machine, never for a class",
            "Set DEBUG=false (and SECRET_KEY, ALLOWED_HOSTS) on a server others use.",
        )
    return "off"


# What `/readyz` needs to say the site can serve pages and sandboxes.
READINESS: dict[str, Callable[[], str]] = {
    "database": database,
    "redis": redis,
    "engine": engine,
}
# Everything `manage.py doctor` looks at, in the order a person fixes things.
DOCTOR: dict[str, Callable[[], str]] = {
    "database": database,
    "migrations": migrations,
    "redis": redis,
    "engine": engine,
    "sandbox image": image,
    "content": content,
    "debug mode": debug_mode,
}


def _run(check: Callable[[], str]) -> str:
    try:
        return check()
    finally:
        connection.close()  # this thread's own connection, if the check opened one


def run_checks(
    checks: dict[str, Callable[[], str]], timeout: float = CHECK_TIMEOUT_S
) -> list[Check]:
    """Run the checks side by side, each within ``timeout`` seconds."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(checks))
    try:
        futures = {name: pool.submit(_run, check) for name, check in checks.items()}
        results = []
        for name, future in futures.items():
            try:
                results.append(Check(name, "ok", future.result(timeout=timeout)))
            except Failing as failing:
                results.append(Check(name, failing.level, failing.detail, failing.advice))
            except concurrent.futures.TimeoutError:
                results.append(
                    Check(
                        name,
                        "fail",
                        f"no answer within {timeout:g} s",
                        "It is up but stuck, or unreachable: check it and the network.",
                    )
                )
            except Exception as exc:  # a check that broke: say so rather than crash
                results.append(Check(name, "fail", f"{type(exc).__name__}: {exc}"))
        return results
    finally:
        pool.shutdown(wait=False)  # a check stuck past its time does not hold the caller
