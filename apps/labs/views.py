from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST, require_safe

from apps.accounts.http import AuthedHttpRequest
from apps.labs import selectors, services
from apps.labs.engine import EngineError, get_engine
from apps.labs.models import Sandbox
from apps.labs.patterns import pattern_ids

PANEL = "labs/sandbox.html#panel"


def panel_context(
    *, user: Any, pattern: str, sandbox: Sandbox | None = None, **extra: Any
) -> dict[str, Any]:
    """What the sandbox panel shows: the user's sandbox of this pattern (if any), its
    nodes as the engine sees them, time left, and whether nodes are isolated."""
    if sandbox is None and user.is_authenticated:
        sandbox = selectors.sandbox_active_for_user(user=user, pattern=pattern)
    if sandbox is not None and sandbox.is_active and sandbox.owner_id == user.pk:
        services.sandbox_touch(sandbox=sandbox)  # the owner is watching: not idle
    nodes: list[Any] = []
    engine_error = ""
    isolated = True
    try:
        engine = get_engine()
        isolated = engine.isolated
        if sandbox is not None and sandbox.state == Sandbox.State.RUNNING:
            nodes = engine.status(sandbox.hex)
    except EngineError as exc:
        engine_error = str(exc)
    minutes_left = None
    if sandbox is not None and sandbox.is_active:
        minutes_left = max(0, int((sandbox.expires_at - timezone.now()).total_seconds() // 60))
    return {
        "pattern": pattern,
        "sandbox": sandbox,
        "nodes": nodes,
        "isolated": isolated,
        "engine_error": engine_error,
        "minutes_left": minutes_left,
        "available": pattern in pattern_ids(),
        **extra,
    }


@require_POST
@login_required
def sandbox_launch(request: AuthedHttpRequest, pattern: str) -> HttpResponse:
    message = ""
    sandbox = None
    try:
        sandbox = services.sandbox_launch(user=request.user, pattern_id=pattern)
    except services.SandboxError as exc:
        message = str(exc)
    context = panel_context(user=request.user, pattern=pattern, sandbox=sandbox, message=message)
    if not request.htmx:
        if sandbox is not None:
            return redirect("labs:sandbox", sandbox_id=sandbox.hex)
        return render(request, "labs/sandbox.html", context, status=409)
    return render(request, PANEL, context)


@require_safe
@login_required
def sandbox_detail(request: AuthedHttpRequest, sandbox_id: str) -> HttpResponse:
    sandbox = selectors.sandbox_get_for_user(user=request.user, sandbox_id=sandbox_id)
    context = panel_context(user=request.user, pattern=sandbox.pattern, sandbox=sandbox)
    return render(request, PANEL if request.htmx else "labs/sandbox.html", context)


@require_POST
@login_required
def sandbox_stop(request: AuthedHttpRequest, sandbox_id: str) -> HttpResponse:
    sandbox = selectors.sandbox_get_for_user(user=request.user, sandbox_id=sandbox_id)
    sandbox = services.sandbox_stop(sandbox=sandbox)
    if not request.htmx:
        return redirect("labs:sandbox", sandbox_id=sandbox.hex)
    return render(
        request, PANEL, panel_context(user=request.user, pattern=sandbox.pattern, sandbox=sandbox)
    )


@require_POST
@login_required
def sandbox_extend(request: AuthedHttpRequest, sandbox_id: str) -> HttpResponse:
    sandbox = selectors.sandbox_get_for_user(user=request.user, sandbox_id=sandbox_id)
    message = ""
    try:
        sandbox = services.sandbox_extend(sandbox=sandbox)
    except services.SandboxError as exc:
        message = str(exc)
    if not request.htmx:
        return redirect("labs:sandbox", sandbox_id=sandbox.hex)
    context = panel_context(
        user=request.user, pattern=sandbox.pattern, sandbox=sandbox, message=message
    )
    return render(request, PANEL, context)
