from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_http_methods, require_POST, require_safe
from django_htmx.http import reswap, retarget
from pygments.lexers import PythonLexer

from apps.accounts import throttle
from apps.accounts.http import AuthedHttpRequest
from apps.courses.content import highlight_code
from apps.labs import selectors, services
from apps.labs.engine import EngineError, get_engine
from apps.labs.models import Fault, Sandbox
from apps.labs.node_status import node_statuses
from apps.labs.patterns import Pattern, PatternError, load_pattern, pattern_ids, program_path

PANEL = "labs/sandbox.html#panel"
STATUS = "labs/sandbox.html#status"
FAULTS = "labs/sandbox.html#faults"
CONTROLS = "labs/sandbox.html#controls"
LAUNCHING_TOO_FAST = "You launched {n} times in the last minute: wait a moment, then launch again."
FAULTING_TOO_FAST = (
    "You injected {n} faults in the last minute: wait a moment, then try again "
    "(and watch what the last ones did)."
)
REVERT_FAILED = (
    "The fault could not be ended just now ({error}). It stays listed as active and is "
    "retried within a minute."
)


def panel_context(
    *, user: Any, pattern: str, sandbox: Sandbox | None = None, **extra: Any
) -> dict[str, Any]:
    """What the sandbox panel shows: the user's sandbox of this pattern (if any), its
    nodes as the engine sees them, time left, whether nodes are isolated, and for a
    running sandbox the live lab (topology, fault and control forms)."""
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
            nodes = node_statuses(engine, sandbox.hex)  # the supervisor's, if fresh
    except EngineError as exc:
        engine_error = str(exc)
    minutes_left = None
    if sandbox is not None and sandbox.is_active:
        minutes_left = max(0, int((sandbox.expires_at - timezone.now()).total_seconds() // 60))
    context: dict[str, Any] = {
        "pattern": pattern,
        "sandbox": sandbox,
        "watching": sandbox is not None and sandbox.owner_id != user.pk,
        "may_control": sandbox is None or selectors.sandbox_can_control(user=user, sandbox=sandbox),
        "nodes": nodes,
        "isolated": isolated,
        "engine_error": engine_error,
        "minutes_left": minutes_left,
        "available": pattern in pattern_ids(),
    }
    if sandbox is not None and sandbox.state == Sandbox.State.RUNNING:
        spec = load_pattern(sandbox.pattern)
        context["topology"] = topology(spec, sandbox)
        context["programs"] = [
            {"program": program, "nodes": [d.name for d in defs]}
            for program, defs in spec.programs().items()
        ]
        context.update(faults_context(sandbox, spec))
        context.update(controls_context(sandbox, spec))
    return {**context, **extra}


def topology(spec: Pattern, sandbox: Sandbox) -> dict[str, Any]:
    """What the graph draws before the first frame: nodes, layout and links (by node name
    or replicated role, as in the pattern: the browser expands roles to instances), and
    what the pattern observes (its marks, gauges, states and tables, with their labels)
    and its series (charted apart)."""
    return {
        "direction": spec.layout.direction,
        "columns": [list(column) for column in spec.layout.columns],
        "links": [
            {"from": link.source, "to": link.target, "label": link.label, "kind": link.kind}
            for link in spec.links
        ],
        "nodes": {n.name: {"role": n.role, "state": "up"} for n in sandbox.nodes.all()},
        "observe": spec.observe.as_dict(),
        "series": [{"id": s.id, "label": s.label} for s in spec.series],
    }


# The fault parameters the panel asks for, by kind, with their labels; their ranges and
# defaults are the services' (``services.FAULT_PARAMS``), rates shown as percentages.
FAULT_FIELD_LABELS: dict[str, dict[str, str]] = {
    "latency": {"ms": "Added latency (ms)"},
    "errors": {"rate": "Share of requests failed (%)"},
    "drop": {"rate": "Share of requests dropped (%)"},
}


def fault_fields(kind: str) -> list[tuple[str, str, float, float, float]]:
    """(form field, label, minimum, maximum, default) for each parameter of ``kind``."""
    fields: list[tuple[str, str, float, float, float]] = []
    for name, label in FAULT_FIELD_LABELS.get(kind, {}).items():
        _type, low, high, default = services.FAULT_PARAMS[kind][name]
        if name == "rate":
            fields.append(
                ("rate_pct", label, round(low * 100), round(high * 100), round(default * 100))
            )
        else:
            fields.append((name, label, low, high, default))
    return fields


FAULT_HELP = {
    "kill": "Stop the node's process: it comes back when the fault reverts.",
    "pause": "Freeze the node: connections stay open but nothing answers.",
    "restart": "Stop and start the node at once (no duration).",
    "partition": "Cut the node off from the others; it keeps running.",
    "latency": "Delay every request the node serves.",
    "errors": "Answer a share of requests with HTTP 503.",
    "drop": "Accept a share of requests and never answer them.",
}
FAULT_DURATIONS = (10, 20, 30, 60, 120, 300)


def faults_context(
    sandbox: Sandbox, spec: Pattern | None = None, form: dict[str, str] | None = None
) -> dict[str, Any]:
    """The fault form (with ``form``: the learner's last choices) and the active faults."""
    spec = spec or load_pattern(sandbox.pattern)
    active = list(
        Fault.objects.filter(sandbox=sandbox, reverted_at__isnull=True)
        .select_related("node")
        .order_by("expires_at")
    )
    return {
        "faults_active": active,
        "fault_kinds": [
            {
                "id": kind,
                "label": Fault.Kind(kind).label,
                "help": FAULT_HELP.get(kind, ""),
                "fields": fault_fields(kind),
            }
            for kind in spec.faults
        ],
        "fault_durations": FAULT_DURATIONS,
        "fault_nodes": [n.name for n in sandbox.nodes.all()],
        "fault_form": {"node": "", "kind": "", "duration": "30", **(form or {})},
    }


def controls_context(sandbox: Sandbox, spec: Pattern | None = None) -> dict[str, Any]:
    spec = spec or load_pattern(sandbox.pattern)
    values = services.control_values(sandbox=sandbox, pattern=spec)
    return {"controls": [{"spec": c, "value": values.get(c.id)} for c in spec.controls]}


@require_POST
@login_required
def sandbox_launch(request: AuthedHttpRequest, pattern: str) -> HttpResponse:
    message = ""
    sandbox = None
    limit = throttle.launches()
    try:
        if limit.exceeded(str(request.user.pk)):
            raise services.SandboxError(LAUNCHING_TOO_FAST.format(n=limit.count))
        limit.hit(str(request.user.pk))
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
    sandbox = selectors.sandbox_get_for_control(user=request.user, sandbox_id=sandbox_id)
    _tell_owner(request, sandbox, "stopped this sandbox")
    sandbox = services.sandbox_stop(sandbox=sandbox)
    if not request.htmx:
        return redirect("labs:sandbox", sandbox_id=sandbox.hex)
    return render(
        request, PANEL, panel_context(user=request.user, pattern=sandbox.pattern, sandbox=sandbox)
    )


@require_POST
@login_required
def sandbox_extend(request: AuthedHttpRequest, sandbox_id: str) -> HttpResponse:
    sandbox = selectors.sandbox_get_for_control(user=request.user, sandbox_id=sandbox_id)
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
    # From the live lab only the status bar is replaced: the graph and charts stay.
    return render(request, STATUS if request.POST.get("part") == "status" else PANEL, context)


def _ended_panel(request: AuthedHttpRequest, sandbox: Sandbox) -> HttpResponse:
    """A part of the live lab asked of a sandbox that no longer runs: the whole panel,
    which says what became of it, in place of the panel (not inside the part)."""
    response = render(
        request, PANEL, panel_context(user=request.user, pattern=sandbox.pattern, sandbox=sandbox)
    )
    return reswap(retarget(response, "#sandbox-box"), "outerHTML")


def _running_sandbox(request: AuthedHttpRequest, sandbox_id: str) -> Sandbox:
    """The sandbox a panel acts on: to change it (POST), its owner (or who may control
    any); to read it (GET: the panel's refresh), whoever may watch it."""
    if request.method == "POST":
        return selectors.sandbox_get_for_control(user=request.user, sandbox_id=sandbox_id)
    return selectors.sandbox_get_for_user(user=request.user, sandbox_id=sandbox_id)


def _tell_owner(request: AuthedHttpRequest, sandbox: Sandbox, did: str, node: str = "") -> None:
    """Someone other than the owner acted (an instructor, with the learner's consent): the
    owner's event log says who and what."""
    if sandbox.owner_id != request.user.pk:
        who = request.user.get_full_name() or request.user.username
        text = f"{who} (not you: {request.user.username}) {did}."
        services.sandbox_tell(sandbox=sandbox, text=text, kind="acted", node=node)


def _may_control(request: AuthedHttpRequest, sandbox: Sandbox) -> bool:
    return selectors.sandbox_can_control(user=request.user, sandbox=sandbox)


def _number(raw: str | None, name: str) -> float:
    try:
        value = float(raw or "")
    except ValueError:
        raise services.SandboxError(f"{name} must be a number.") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise services.SandboxError(f"{name} must be a number.")
    return value


def _fault_request(post: Any) -> dict[str, Any]:
    """The fault form's fields, as ``services.fault_inject`` takes them."""
    kind = post.get("kind", "")
    params: dict[str, Any] = {}
    for field, label, _low, _high, _default in fault_fields(kind):
        value = _number(post.get(field), label)
        if field == "rate_pct":
            params["rate"] = value / 100
        else:
            params[field] = int(value)
    duration: int | None = None
    if kind != "restart":
        seconds = _number(post.get("duration"), "The duration")
        if seconds != int(seconds):
            raise services.SandboxError("The duration must be a whole number of seconds.")
        duration = int(seconds)
    return {"node_name": post.get("node", ""), "kind": kind, "duration": duration, "params": params}


@require_http_methods(["GET", "POST"])
@login_required
def sandbox_faults(request: AuthedHttpRequest, sandbox_id: str) -> HttpResponse:
    """The fault form and the active faults (GET); inject a fault (POST)."""
    sandbox = _running_sandbox(request, sandbox_id)
    message = notice = ""
    # The form keeps the learner's choices, also when the page refreshes it after an event.
    source = request.POST if request.method == "POST" else request.GET
    form = {k: source[k] for k in ("node", "kind", "duration") if k in source}
    if request.method == "POST":
        limit = throttle.fault_injections()
        try:
            if limit.exceeded(str(request.user.pk)):
                raise services.SandboxError(FAULTING_TOO_FAST.format(n=limit.count))
            limit.hit(str(request.user.pk))
            fault = services.fault_inject(
                sandbox=sandbox, user=request.user, **_fault_request(request.POST)
            )
            notice = f"{fault.get_kind_display()} on {fault.node.name}."
            _tell_owner(request, sandbox, f"injected {notice[:-1].lower()}", fault.node.name)
        except (services.SandboxError, EngineError) as exc:
            message = str(exc)
    if sandbox.state != Sandbox.State.RUNNING:
        return _ended_panel(request, sandbox)
    context = {
        "sandbox": sandbox,
        "may_control": _may_control(request, sandbox),
        "fault_message": message,
        "fault_notice": notice,
    }
    context.update(faults_context(sandbox, form=form))
    return render(request, FAULTS, context, status=400 if message else 200)


@require_POST
@login_required
def sandbox_fault_revert(
    request: AuthedHttpRequest, sandbox_id: str, fault_id: int
) -> HttpResponse:
    """End a fault before its time (the same revert the countdown would do)."""
    sandbox = _running_sandbox(request, sandbox_id)
    fault = Fault.objects.filter(sandbox=sandbox, pk=fault_id).first()
    if fault is None:
        raise Http404("No such fault in this sandbox.")
    try:
        services.fault_revert(fault_id=fault.pk)
        _tell_owner(
            request,
            sandbox,
            f"reverted {fault.get_kind_display().lower()} on {fault.node.name}",
            fault.node.name,
        )
    except EngineError as exc:
        context = {
            "sandbox": sandbox,
            "may_control": _may_control(request, sandbox),
            "fault_message": REVERT_FAILED.format(error=exc),
        }
        context.update(faults_context(sandbox))
        return render(request, FAULTS, context, status=503)
    context = {
        "sandbox": sandbox,
        "may_control": _may_control(request, sandbox),
        "fault_notice": f"{fault.get_kind_display()} reverted.",
    }
    context.update(faults_context(sandbox))
    return render(request, FAULTS, context)


@require_http_methods(["GET", "POST"])
@login_required
def sandbox_controls(request: AuthedHttpRequest, sandbox_id: str) -> HttpResponse:
    """The pattern's live controls (GET); set one (POST ``control`` and ``value``)."""
    sandbox = _running_sandbox(request, sandbox_id)
    message = ""
    if request.method == "POST":
        control_id = request.POST.get("control", "")
        raw = request.POST.get("value", "")
        control = load_pattern(sandbox.pattern).control(control_id)
        value: Any = raw
        if control is not None and control.kind == "toggle":
            value = raw in ("on", "true", "1")
        elif control is not None and control.kind in ("number", "scale"):
            try:
                value = _number(raw, control.label)
                value = int(value) if value == int(value) else value
            except services.SandboxError as exc:
                message = str(exc)
        if not message:
            try:
                services.sandbox_control(sandbox=sandbox, control_id=control_id, value=value)
                _tell_owner(
                    request, sandbox, f"set {control.label if control else control_id} to {value}"
                )
            except (services.SandboxError, EngineError, TimeoutError) as exc:
                message = str(exc)
    if sandbox.state != Sandbox.State.RUNNING:
        return _ended_panel(request, sandbox)
    context = {
        "sandbox": sandbox,
        "may_control": _may_control(request, sandbox),
        "control_message": message,
    }
    context.update(controls_context(sandbox))
    return render(request, CONTROLS, context, status=400 if message else 200)


@require_safe
@login_required
def program_source(request: AuthedHttpRequest, pattern: str, program: str) -> HttpResponse:
    """A node program of a pattern, read-only and highlighted: learners read the code that
    runs in their sandbox. Only the programs the pattern's nodes run are shown."""
    try:
        spec = load_pattern(pattern)
    except PatternError:
        raise Http404("No such pattern.") from None
    programs = spec.programs()
    if program not in programs:
        raise Http404("No such program in this pattern.")
    path = program_path(spec, program)
    source = path.read_text(encoding="utf-8")
    defs = programs[program]
    context = {
        "pattern": spec,
        "program": program,
        "nodes": [f"{d.role}-1 … {d.role}-{d.max_count}" if d.replicated else d.name for d in defs],
        "plural": len(defs) > 1 or defs[0].replicated,
        "shared": path.parent != spec.folder,
        "code": mark_safe(highlight_code(source, PythonLexer())),  # noqa: S308 - Pygments escapes the source
        "lines": source.count("\n") + 1,
        "programs": sorted(programs),
    }
    return render(request, "labs/program.html", context)
