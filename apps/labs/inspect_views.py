"""The lab's trace view and log search, for a pattern whose spec names a collector
(``observe.traces``, ``observe.logs``): fragments the sandbox panel loads and refreshes,
read from what the supervisor stored of the collector's reports (``inspect_cache_key``),
never from the engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from apps.accounts.http import AuthedHttpRequest
from apps.labs import selectors
from apps.labs.models import Sandbox
from apps.labs.supervisor import inspect_cache_key
from apps.labs.telemetry import LOG_LEVELS

TRACES = "labs/inspect.html#traces"
TRACE = "labs/inspect.html#trace"
LOGS = "labs/inspect.html#logs"
LOG_LINES = "labs/inspect.html#log_lines"
TRACE_FILTERS = {"all": "All", "errors": "Failed", "slow": "Slowest"}
LIST_LENGTH = 25
LOG_LENGTH = 100
FIELD_CHARS = 64  # what a filter keeps of its input
WAIT_TRIES = 8  # a clicked request's trace is looked for this many times, a second apart


def _collected(sandbox: Sandbox) -> Mapping[str, Any]:
    stored = cache.get(inspect_cache_key(sandbox.hex))
    return stored if isinstance(stored, dict) else {}


def clock(ts: Any) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S") if ts else ""


def trace_list(traces: Sequence[Mapping[str, Any]], only: str) -> list[Mapping[str, Any]]:
    """The traces the list shows: the newest first; failed ones only; or the slowest."""
    if only == "errors":
        chosen = [t for t in traces if t.get("status") == "error"][::-1]
    elif only == "slow":
        chosen = sorted(traces, key=lambda t: -float(t.get("ms") or 0))
    else:
        chosen = list(traces)[::-1]
    return [{**t, "clock": clock(t.get("started"))} for t in chosen[:LIST_LENGTH]]


def waterfall(trace: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The trace's spans in tree order (each after its parent, siblings by start), with
    their depth and their bar's place as percentages of the trace's duration."""
    spans = list(trace.get("spans") or [])
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[Mapping[str, Any]]] = {}
    for span in spans:
        parent = span.get("parent_id") if span.get("parent_id") in ids else ""
        children.setdefault(parent or "", []).append(span)
    ends = [s["offset_ms"] + s["ms"] for s in spans]
    total = max(float(trace.get("ms") or 0), *ends, 0.001)
    rows: list[dict[str, Any]] = []

    def visit(parent: str, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s["offset_ms"]):
            left = 100 * span["offset_ms"] / total
            rows.append(
                {
                    **span,
                    "depth": min(depth, 8),
                    "left": round(left, 2),
                    "width": round(max(0.4, min(100 - left, 100 * span["ms"] / total)), 2),
                }
            )
            if len(rows) < 200:
                visit(span["span_id"], depth + 1)

    visit("", 0)
    return rows


@require_safe
@login_required
def sandbox_traces(request: AuthedHttpRequest, sandbox_id: str) -> HttpResponse:
    """The trace list (``only``: all, errors, slow), refreshed every few seconds."""
    sandbox = selectors.sandbox_get_for_user(user=request.user, sandbox_id=sandbox_id)
    only = request.GET.get("only", "all")
    if only not in TRACE_FILTERS:
        only = "all"
    traces = list(_collected(sandbox).get("traces") or [])
    context = {
        "sandbox": sandbox,
        "only": only,
        "filters": TRACE_FILTERS,
        "traces": trace_list(traces, only),
        "collected": len(traces),
    }
    return render(request, TRACES, context)


@require_safe
@login_required
def sandbox_trace(request: AuthedHttpRequest, sandbox_id: str, trace_id: str) -> HttpResponse:
    """One trace as a waterfall. A request clicked on the graph or the p99 chart asks
    with ``wait=1``: its trace reaches the collector a second or two after the request
    ends, so until then the fragment asks again each second (``wait`` counts the tries).
    A trace the collector does not hold is said so, with why that may be (a 404, but
    200 to htmx, which swaps only successful answers)."""
    sandbox = selectors.sandbox_get_for_user(user=request.user, sandbox_id=sandbox_id)
    traces = _collected(sandbox).get("traces") or []
    trace = next((t for t in traces if t.get("trace_id") == trace_id), None)
    try:
        tries = min(max(int(request.GET.get("wait", 0)), 0), WAIT_TRIES)
    except ValueError:
        tries = 0
    context = {
        "sandbox": sandbox,
        "trace": trace,
        "trace_id": trace_id[:FIELD_CHARS],
        "rows": waterfall(trace) if trace else [],
        "waiting": not trace and 0 < tries < WAIT_TRIES,
        "next_try": tries + 1,
        "clicked": tries > 0,
    }
    found = trace is not None or context["waiting"] or request.htmx
    return render(request, TRACE, context, status=200 if found else 404)


def log_lines(
    lines: Sequence[Mapping[str, Any]], *, service: str, level: str, trace: str, text: str
) -> list[dict[str, Any]]:
    """The newest lines that match every filter given: a service, a level and above, a
    trace id (or its beginning), a piece of the message."""
    lowest = LOG_LEVELS.index(level) if level in LOG_LEVELS else 0
    text = text.lower()
    out = []
    for line in reversed(lines):
        if service and line.get("service") != service:
            continue
        if LOG_LEVELS.index(line.get("level", "info")) < lowest:
            continue
        if trace and not str(line.get("trace_id", "")).startswith(trace):
            continue
        if text and text not in str(line.get("msg", "")).lower():
            continue
        out.append({**line, "clock": clock(line.get("ts"))})
        if len(out) >= LOG_LENGTH:
            break
    return out


@require_safe
@login_required
def sandbox_logs(request: AuthedHttpRequest, sandbox_id: str) -> HttpResponse:
    """The central log, filtered (``service``, ``level``, ``trace``, ``q``), newest first."""
    sandbox = selectors.sandbox_get_for_user(user=request.user, sandbox_id=sandbox_id)
    filters = {
        key: request.GET.get(key, "").strip()[:FIELD_CHARS]
        for key in ("service", "level", "trace", "q")
    }
    lines = list(_collected(sandbox).get("logs") or [])
    services = sorted({str(line.get("service")) for line in lines if line.get("service")})
    context = {
        "sandbox": sandbox,
        "filters": filters,
        "services": services,
        "levels": LOG_LEVELS,
        "lines": log_lines(
            lines,
            service=filters["service"],
            level=filters["level"],
            trace=filters["trace"].lower(),
            text=filters["q"],
        ),
        "collected": len(lines),
    }
    partial = request.htmx and request.htmx.target == "lab-log-lines"
    return render(request, LOG_LINES if partial else LOGS, context)
