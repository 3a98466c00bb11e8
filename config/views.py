"""Error pages that keep the site's layout and say what to do next; health endpoints."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.template import loader
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from config import health


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return render(request, "errors/404.html", status=404)


def forbidden(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return render(request, "errors/403.html", status=403)


def server_error(request: HttpRequest) -> HttpResponse:
    # No request context: the failure may be in a context processor or the database.
    return HttpResponse(loader.get_template("errors/500.html").render(), status=500)


@never_cache
@require_safe
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: the database, Redis and the sandbox engine answer (each within a few
    seconds). 503 with the failing ones named; what failed and why is for `manage.py
    doctor`, not for anonymous callers."""
    checks = health.run_checks(health.READINESS)
    ready = all(check.ok for check in checks)
    body = {
        "status": "ready" if ready else "not ready",
        "checks": {check.name: "ok" if check.ok else "failing" for check in checks},
    }
    return JsonResponse(body, status=200 if ready else 503)
