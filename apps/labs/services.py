"""Writes for sandboxes: launch, stop, faults, live controls, scaling, housekeeping.

Requests come from views and the ``sandbox`` command; the slow parts (talking to the
engine) run in Celery tasks that take ids and call back into this module. Every function
here that a task calls is idempotent: a redelivered task adopts what already exists.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from apps.accounts.models import User
from apps.labs.engine import EngineError, get_engine
from apps.labs.engine.base import NodeNotFound, NodeSpec, SandboxSpec
from apps.labs.models import ACTIVE_STATES, TRANSITIONS, Fault, Node, Sandbox
from apps.labs.node_status import status_forget
from apps.labs.patterns import Pattern, PatternError, load_pattern
from config.tasks import queue_task

log = logging.getLogger(__name__)

QUOTA_OWN = (
    "You already have {count} sandbox(es) running ({patterns}), the most your account "
    "may run at once. Stop one to launch another."
)
QUOTA_GLOBAL = (
    "All {limit} sandboxes this server can run are in use. The next one frees up in "
    "about {minutes} minute(s); try again then."
)
NOT_RUNNING = "This sandbox is {state}, not running: faults and controls need a running sandbox."
UNKNOWN_NODE = "This sandbox has no node named {name!r}."
UNSUPPORTED_FAULT = (
    "The {pattern} pattern does not support the fault {kind!r} (it supports: {kinds})."
)
BAD_DURATION = "The duration must be a whole number of seconds from 1 to {max}."
BAD_PARAM = "Fault {kind!r}: {message}"
UNKNOWN_PARAM = "Fault {kind!r} takes no parameter {name!r} (it takes: {names})."
UNKNOWN_CONTROL = "The {pattern} pattern has no live control {control!r} (it has: {names})."
BAD_CONTROL_VALUE = "Control {control!r}: {message}"
NODE_DOWN_FOR_FAULT = "Node {name} is not running (it is {state}): there is nothing to {kind}."

MAX_FAULT_SECONDS = 600
DEFAULT_FAULT_SECONDS = 30
READY_POLL_SECONDS = 0.05


class SandboxError(ValueError):
    """A request that cannot be done; the message is for the person who asked."""


class QuotaExceeded(SandboxError):
    pass


class InvalidTransition(RuntimeError):
    pass


# --- state machine -----------------------------------------------------------------------


def sandbox_transition(*, sandbox: Sandbox, to: str, **fields: Any) -> None:
    """Move a (locked) sandbox to state ``to``, refusing moves the state machine forbids."""
    if to not in TRANSITIONS[sandbox.state]:
        raise InvalidTransition(f"sandbox {sandbox.hex[:8]}: {sandbox.state} → {to} is not allowed")
    sandbox.state = to
    for name, value in fields.items():
        setattr(sandbox, name, value)
    sandbox.save(update_fields=["state", *fields])


def _locked(sandbox_id: uuid.UUID | str) -> Sandbox:
    return Sandbox.objects.select_for_update().get(pk=uuid.UUID(str(sandbox_id)))


# --- launch ----------------------------------------------------------------------------


def _quota_for(user: User) -> int:
    """Instructors: SANDBOX_PER_INSTRUCTOR. Learners: the largest quota set by a classroom
    they are in, else SANDBOX_PER_LEARNER."""
    if user.is_instructor:
        return int(settings.SANDBOX_PER_INSTRUCTOR)
    from apps.classrooms.selectors import sandbox_quota_for_learner

    quota = sandbox_quota_for_learner(user=user)
    return int(settings.SANDBOX_PER_LEARNER) if quota is None else quota


def _minutes_until_one_frees() -> int:
    soonest = (
        Sandbox.objects.filter(state__in=ACTIVE_STATES)
        .order_by("expires_at")
        .values_list("expires_at", flat=True)
        .first()
    )
    if soonest is None:
        return 1
    return max(1, math.ceil((soonest - timezone.now()).total_seconds() / 60))


LAUNCH_LOCK = 0x44_49_53_54  # "DIST": the advisory lock that serialises launches


def _lock_launches() -> None:
    """Until the transaction ends, no other launch passes this point. PostgreSQL: a
    transaction-level advisory lock; SQLite serialises writing transactions itself."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [LAUNCH_LOCK])


def sandbox_launch(*, user: User, pattern_id: str, enqueue: bool = True) -> Sandbox:
    """Check the pattern and the quotas, record the sandbox (requested) and, once the
    transaction commits, queue its launch."""
    try:
        load_pattern(pattern_id)
    except PatternError as exc:
        raise SandboxError(str(exc)) from exc
    now = timezone.now()
    with transaction.atomic():
        # Serialise every launch on one lock for the global count (two users' launches
        # once both counted 29 of 30 and made 31), and on the user's row for their own.
        _lock_launches()
        User.objects.select_for_update().get(pk=user.pk)
        own = list(Sandbox.objects.filter(owner=user, state__in=ACTIVE_STATES))
        if len(own) >= _quota_for(user):
            raise QuotaExceeded(
                QUOTA_OWN.format(
                    count=len(own), patterns=", ".join(sorted({s.pattern for s in own}))
                )
            )
        if Sandbox.objects.filter(state__in=ACTIVE_STATES).count() >= settings.SANDBOX_MAX_TOTAL:
            raise QuotaExceeded(
                QUOTA_GLOBAL.format(
                    limit=settings.SANDBOX_MAX_TOTAL, minutes=_minutes_until_one_frees()
                )
            )
        sandbox = Sandbox.objects.create(
            owner=user,
            pattern=pattern_id,
            expires_at=now + timedelta(minutes=settings.SANDBOX_LIFETIME_MINUTES),
            last_seen_at=now,
        )
        if enqueue:
            from apps.labs.tasks import sandbox_launch_task

            sandbox_id = sandbox.hex
            transaction.on_commit(lambda: queue_task(sandbox_launch_task, sandbox_id))
    return sandbox


def sandbox_spec(*, sandbox: Sandbox, pattern: Pattern | None = None) -> SandboxSpec:
    """What the engine must run for this sandbox: the pattern's nodes, plus replicas
    added or removed since launch (the Node rows are the truth once it runs)."""
    pattern = pattern or load_pattern(sandbox.pattern)
    rows = list(sandbox.nodes.all())
    if rows:
        by_name = {n.name: n for n in pattern.expand(count_overrides=_counts(rows, pattern))}
        nodes = tuple(
            NodeSpec(name=r.name, role=r.role, program=r.program, env=by_name[r.name].env)
            if r.name in by_name
            else NodeSpec(name=r.name, role=r.role, program=r.program)
            for r in rows
        )
    else:
        nodes = tuple(
            NodeSpec(name=n.name, role=n.role, program=n.program, env=n.env)
            for n in pattern.expand()
        )
    return SandboxSpec(
        sandbox_id=sandbox.hex,
        owner=sandbox.owner.username,
        pattern=sandbox.pattern,
        expires_at=sandbox.expires_at,
        nodes=nodes,
    )


def _counts(rows: list[Node], pattern: Pattern) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node_def in pattern.nodes:
        if node_def.count is not None:
            counts[node_def.name] = sum(1 for r in rows if r.role == node_def.role)
    return counts


def sandbox_start(*, sandbox_id: str) -> Sandbox:
    """Bring a requested sandbox up (the launch task's body). Idempotent: a redelivered
    launch adopts the nodes that already exist."""
    started = time.monotonic()
    with transaction.atomic():
        sandbox = _locked(sandbox_id)
        if sandbox.state == Sandbox.State.REQUESTED:
            sandbox_transition(sandbox=sandbox, to=Sandbox.State.STARTING)
        elif sandbox.state != Sandbox.State.STARTING:
            return sandbox  # already running, or stopped meanwhile: nothing to do
    engine = get_engine()
    try:
        spec = sandbox_spec(sandbox=sandbox)
        _stage(sandbox, f"Creating the network and starting {len(spec.nodes)} nodes")
        engine.create(spec)
        _wait_ready(sandbox, spec, report=True)
    except (EngineError, PatternError, TimeoutError) as exc:
        log.warning("sandbox %s failed to launch: %s", sandbox.hex, exc)
        _fail(sandbox.hex, f"The sandbox could not start: {exc}")
        engine.destroy(sandbox.hex)
        raise
    statuses = {s.name: s for s in engine.status(sandbox.hex)}
    with transaction.atomic():
        sandbox = _locked(sandbox_id)
        if sandbox.state != Sandbox.State.STARTING:
            return sandbox  # stopped while starting: the stop task removes the nodes
        for node in spec.nodes:
            Node.objects.update_or_create(
                sandbox=sandbox,
                name=node.name,
                defaults={
                    "role": node.role,
                    "program": node.program,
                    "address": statuses[node.name].address if node.name in statuses else "",
                },
            )
        sandbox_transition(
            sandbox=sandbox,
            to=Sandbox.State.RUNNING,
            engine=engine.name,
            started_at=timezone.now(),
            launch_seconds=round(time.monotonic() - started, 3),
            stage="",
        )
    log.info(
        "sandbox %s (%s, %s) running after %.1f s",
        sandbox.hex[:8],
        sandbox.pattern,
        sandbox.owner.get_username(),
        sandbox.launch_seconds or 0,
    )
    return sandbox


def _stage(sandbox: Sandbox, text: str) -> None:
    """Say what the launch is doing now (the panel shows it while the sandbox starts)."""
    Sandbox.objects.filter(pk=sandbox.pk).update(stage=text[:80])


def _wait_ready(
    sandbox: Sandbox,
    spec: SandboxSpec,
    *,
    report: bool = False,
    names: set[str] | None = None,
) -> None:
    """The nodes ``names`` (default: all) answer their control channel (they serve HTTP
    by then); with ``report``, the launch stage counts them. A node whose process ends
    meanwhile fails this at once, rather than at the timeout."""
    engine = get_engine()
    deadline = time.monotonic() + settings.SANDBOX_LAUNCH_TIMEOUT
    waiting = set(names) if names is not None else {n.name for n in spec.nodes}
    total = len(waiting)
    reported = -1
    next_status = time.monotonic() + 1.0
    while waiting:
        if report and len(waiting) != reported:
            reported = len(waiting)
            _stage(sandbox, f"Waiting for the nodes to answer: {total - reported} of {total} ready")
        for name in sorted(waiting):
            try:
                if engine.control(sandbox.hex, name, {"op": "state"}).get("ok"):
                    waiting.discard(name)
            except EngineError:
                pass
        if waiting and time.monotonic() >= next_status:
            next_status = time.monotonic() + 1.0
            for node in engine.status(sandbox.hex):
                if node.name in waiting and node.state == "exited":
                    raise EngineError(
                        f"node {node.name} stopped while starting (exit code {node.exit_code})"
                    )
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(
                f"nodes not ready after {settings.SANDBOX_LAUNCH_TIMEOUT} s: "
                + ", ".join(sorted(waiting))
            )
        if waiting:
            time.sleep(READY_POLL_SECONDS)


def _fail(sandbox_id: str, message: str) -> None:
    with transaction.atomic():
        sandbox = _locked(sandbox_id)
        if Sandbox.State.FAILED in TRANSITIONS[sandbox.state]:
            sandbox_transition(
                sandbox=sandbox, to=Sandbox.State.FAILED, error=message, ended_at=timezone.now()
            )


# --- stop, extend, expiry ----------------------------------------------------------------


def sandbox_stop(*, sandbox: Sandbox, reason: str = "", enqueue: bool = True) -> Sandbox:
    """Ask for a sandbox to stop; its nodes are removed by the stop task."""
    with transaction.atomic():
        sandbox = _locked(sandbox.pk)
        if sandbox.state in {Sandbox.State.STOPPING} or not sandbox.is_active:
            return sandbox
        sandbox_transition(
            sandbox=sandbox,
            to=Sandbox.State.STOPPING,
            stop_reason=reason,
            stop_requested_at=timezone.now(),
        )
        from apps.labs.experiments import experiment_cancel_for_sandbox

        experiment_cancel_for_sandbox(sandbox=sandbox, reason=reason)
        if enqueue:
            from apps.labs.tasks import sandbox_stop_task

            sandbox_id = sandbox.hex
            transaction.on_commit(lambda: queue_task(sandbox_stop_task, sandbox_id))
    return sandbox


def sandbox_teardown(*, sandbox_id: str) -> Sandbox:
    """Remove a stopping sandbox's nodes and network (the stop task's body). Idempotent."""
    sandbox = Sandbox.objects.get(pk=uuid.UUID(str(sandbox_id)))
    if sandbox.state != Sandbox.State.STOPPING:
        return sandbox
    get_engine().destroy(sandbox.hex)
    now = timezone.now()
    with transaction.atomic():
        sandbox = _locked(sandbox_id)
        if sandbox.state != Sandbox.State.STOPPING:
            return sandbox
        sandbox.faults.filter(reverted_at__isnull=True).update(reverted_at=now)
        final = Sandbox.State.EXPIRED if sandbox.stop_reason == "expired" else Sandbox.State.STOPPED
        sandbox_transition(sandbox=sandbox, to=final, ended_at=now)
    log.info("sandbox %s (%s) %s: %s", sandbox.hex[:8], sandbox.pattern, final, sandbox.stop_reason)
    return sandbox


def sandbox_extend(*, sandbox: Sandbox) -> Sandbox:
    """Give a running sandbox more time, up to the maximum lifetime."""
    with transaction.atomic():
        sandbox = _locked(sandbox.pk)
        if not sandbox.is_active:
            raise SandboxError(NOT_RUNNING.format(state=sandbox.state))
        limit = sandbox.created_at + timedelta(minutes=settings.SANDBOX_MAX_LIFETIME_MINUTES)
        wanted = max(sandbox.expires_at, timezone.now()) + timedelta(
            minutes=settings.SANDBOX_EXTEND_MINUTES
        )
        sandbox.expires_at = min(wanted, limit)
        sandbox.save(update_fields=["expires_at"])
    return sandbox


def sandbox_tell(
    *, sandbox: Sandbox, text: str, kind: str = "notice", node: str = "", severity: str = "warning"
) -> None:
    """An event in the sandbox's live log that the platform writes itself (a class drill,
    an instructor's action), sent to whoever watches it now."""
    from apps.labs.supervisor import group_name
    from config import layer

    event = {"type": "event", "v": 1, "ts": time.time(), "node": node, "kind": kind,
             "severity": severity, "text": text}  # fmt: skip
    layer.group_send(group_name(sandbox.hex), {"type": "sandbox.event", "data": event})


def sandbox_touch(*, sandbox: Sandbox) -> None:
    """Somebody is watching: postpones idle expiry."""
    Sandbox.objects.filter(pk=sandbox.pk).update(last_seen_at=timezone.now())


@dataclass(frozen=True)
class ReapReport:
    expired: tuple[str, ...]
    idle: tuple[str, ...]
    relaunched: tuple[str, ...]
    vanished: tuple[str, ...]
    orphans_removed: tuple[str, ...]
    stops_finished: tuple[str, ...] = ()


def sandbox_reap(*, enqueue: bool = True) -> ReapReport:
    """Housekeeping (periodic, and at start-up): expire over-age and idle sandboxes,
    re-queue launches whose worker died, finish stops whose task was lost, mark
    sandboxes whose nodes vanished as failed, and remove engine objects no live sandbox
    owns."""
    now = timezone.now()
    idle_before = now - timedelta(minutes=settings.SANDBOX_IDLE_MINUTES)
    expired, idle, relaunched, vanished, finished = [], [], [], [], []
    for sandbox in Sandbox.objects.filter(
        state__in=[Sandbox.State.RUNNING, Sandbox.State.STARTING, Sandbox.State.REQUESTED]
    ):
        if sandbox.expires_at <= now:
            sandbox_stop(sandbox=sandbox, reason="expired", enqueue=enqueue)
            expired.append(sandbox.hex)
        elif sandbox.state == Sandbox.State.RUNNING and sandbox.last_seen_at <= idle_before:
            sandbox_stop(sandbox=sandbox, reason="expired", enqueue=enqueue)
            idle.append(sandbox.hex)
    engine = get_engine()
    stale = now - timedelta(seconds=settings.SANDBOX_LAUNCH_TIMEOUT * 2)
    for sandbox in Sandbox.objects.filter(
        state__in=[Sandbox.State.REQUESTED, Sandbox.State.STARTING], created_at__lte=stale
    ):
        # Its launch task was lost with a worker: launching again adopts what exists.
        relaunched.append(sandbox.hex)
        if enqueue:
            from apps.labs.tasks import sandbox_launch_task

            queue_task(sandbox_launch_task, sandbox.hex)
    # A stop whose task was lost (a worker died, the broker lost it) would hold the
    # learner's quota forever: finish it here once it has had time to finish by itself.
    stuck = now - timedelta(seconds=settings.SANDBOX_LAUNCH_TIMEOUT * 2)
    for sandbox in Sandbox.objects.filter(state=Sandbox.State.STOPPING).filter(
        Q(stop_requested_at__lte=stuck) | Q(stop_requested_at__isnull=True)
    ):
        sandbox_teardown(sandbox_id=sandbox.hex)
        finished.append(sandbox.hex)
    for sandbox in Sandbox.objects.filter(state=Sandbox.State.RUNNING):
        if not engine.status(sandbox.hex):
            _fail(sandbox.hex, "The sandbox's nodes disappeared (the engine was restarted?).")
            vanished.append(sandbox.hex)
    live = {
        s.hex for s in Sandbox.objects.filter(state__in=ACTIVE_STATES - {Sandbox.State.STOPPING})
    }
    orphans = []
    for info in engine.list_sandboxes():
        if info.sandbox_id not in live:
            sandbox_uuid = _uuid_or_none(info.sandbox_id)
            stopping = (
                Sandbox.objects.filter(pk=sandbox_uuid, state=Sandbox.State.STOPPING).first()
                if sandbox_uuid is not None
                else None
            )
            if stopping is not None:
                sandbox_teardown(sandbox_id=stopping.hex)
            else:
                engine.destroy(info.sandbox_id)
            orphans.append(info.sandbox_id)
    return ReapReport(
        tuple(expired),
        tuple(idle),
        tuple(relaunched),
        tuple(vanished),
        tuple(orphans),
        tuple(finished),
    )


def _uuid_or_none(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


# --- faults ------------------------------------------------------------------------------

# Parameter rules per fault kind: name → (type, minimum, maximum, default).
FAULT_PARAMS: dict[str, dict[str, tuple[type, float, float, float]]] = {
    "latency": {"ms": (int, 1, 10_000, 300), "jitter_ms": (int, 0, 5_000, 0)},
    "errors": {"rate": (float, 0.01, 1.0, 0.5), "status": (int, 500, 503, 503)},
    "drop": {"rate": (float, 0.01, 1.0, 1.0)},
    "kill": {},
    "pause": {},
    "restart": {},
    "partition": {},
}
RUNTIME_FAULTS = frozenset({"latency", "errors", "drop"})


def fault_params(kind: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """A fault's parameters checked against ``FAULT_PARAMS``, defaults filled in; or
    SandboxError saying what is wrong."""
    rules = FAULT_PARAMS[kind]
    params: dict[str, Any] = {}
    for name in raw:
        if name not in rules:
            names = ", ".join(rules) or "none"
            raise SandboxError(UNKNOWN_PARAM.format(kind=kind, name=name, names=names))
    for name, (kind_type, low, high, default) in rules.items():
        value = raw.get(name, default)
        try:
            number = kind_type(value)
        except (TypeError, ValueError):
            raise SandboxError(
                BAD_PARAM.format(kind=kind, message=f"{name} must be a number, got {value!r}")
            ) from None
        if isinstance(number, float) and not math.isfinite(number):
            raise SandboxError(BAD_PARAM.format(kind=kind, message=f"{name} must be finite"))
        if not low <= number <= high:
            raise SandboxError(
                BAD_PARAM.format(
                    kind=kind, message=f"{name} must be from {low} to {high}, got {number}"
                )
            )
        params[name] = number
    if kind == "errors" and params["status"] not in (500, 503):
        raise SandboxError(BAD_PARAM.format(kind=kind, message="status must be 500 or 503"))
    return params


def fault_inject(
    *,
    sandbox: Sandbox,
    node_name: str,
    kind: str,
    duration: int | None = None,
    params: Mapping[str, Any] | None = None,
    user: User | None = None,
    enqueue: bool = True,
) -> Fault:
    """Validate and apply a fault, record it, and schedule its automatic revert."""
    if sandbox.state != Sandbox.State.RUNNING:
        raise SandboxError(NOT_RUNNING.format(state=sandbox.get_state_display().lower()))
    pattern = load_pattern(sandbox.pattern)
    if kind not in FAULT_PARAMS or kind not in pattern.faults:
        raise SandboxError(
            UNSUPPORTED_FAULT.format(
                pattern=sandbox.pattern, kind=kind, kinds=", ".join(pattern.faults)
            )
        )
    node = sandbox.nodes.filter(name=node_name).first()
    if node is None:
        raise SandboxError(UNKNOWN_NODE.format(name=node_name))
    if kind == "restart":
        seconds = 0
    else:
        seconds = DEFAULT_FAULT_SECONDS if duration is None else duration
        if not isinstance(seconds, int) or not 1 <= seconds <= MAX_FAULT_SECONDS:
            raise SandboxError(BAD_DURATION.format(max=MAX_FAULT_SECONDS))
    clean = fault_params(kind, params or {})

    engine = get_engine()
    state = next((s.state for s in engine.status(sandbox.hex) if s.name == node.name), "missing")
    if kind in {"pause", "partition", *RUNTIME_FAULTS} and state != "running":
        raise SandboxError(NODE_DOWN_FOR_FAULT.format(name=node.name, state=state, kind=kind))
    _apply(engine, sandbox.hex, node.name, kind, clean)
    if kind == "restart":
        _after_restart(sandbox, node.name)

    now = timezone.now()
    with transaction.atomic():
        fault = Fault.objects.create(
            sandbox=sandbox,
            node=node,
            kind=kind,
            params={**clean, "duration": seconds},
            created_by=user,
            expires_at=now + timedelta(seconds=seconds) if seconds else None,
            reverted_at=now if not seconds else None,
        )
        if seconds and enqueue:
            from apps.labs.tasks import fault_revert_task

            fault_id = fault.pk
            transaction.on_commit(
                lambda: queue_task(fault_revert_task, fault_id, countdown=seconds)
            )
    return fault


def _apply(engine: Any, sandbox_id: str, name: str, kind: str, params: dict[str, Any]) -> None:
    if kind in RUNTIME_FAULTS:
        reply = engine.control(sandbox_id, name, {"op": "fault", "kind": kind, **params})
        if not reply.get("ok"):
            raise SandboxError(f"Node {name} refused the fault: {reply.get('error')}")
    else:
        getattr(engine, kind)(sandbox_id, name)
        status_forget(sandbox_id)


def fault_revert(*, fault_id: int) -> Fault | None:
    """Undo a fault whose time is up (the scheduled task's body, or the learner ending it
    early). Idempotent. The fault is marked reverted only once the engine has undone it:
    when the engine fails, it stays active (shown, and retried by ``fault_revert_due``)
    and the EngineError is raised. Another active fault of the same kind on the node
    keeps the node faulted: a runtime fault is re-applied with the newest one's
    parameters, an engine fault (a partition) is left in place until the last one ends."""
    with transaction.atomic():
        fault = (
            Fault.objects.select_for_update()
            .select_related("sandbox", "node")
            .filter(pk=fault_id)
            .first()
        )
        if fault is None or fault.reverted_at is not None:
            return fault
        if fault.sandbox.state == Sandbox.State.RUNNING:
            try:
                _undo(fault)
            except NodeNotFound as exc:  # the node is gone (scaled down): nothing to undo
                log.info("fault %s: %s", fault.pk, exc)
        fault.reverted_at = timezone.now()
        fault.save(update_fields=["reverted_at"])
    return fault


def _undo(fault: Fault) -> None:
    engine = get_engine()
    sandbox_id, name = fault.sandbox.hex, fault.node.name
    still = (
        Fault.objects.filter(node=fault.node, kind=fault.kind, reverted_at__isnull=True)
        .exclude(pk=fault.pk)
        .order_by("-created_at", "-pk")
        .first()
    )
    if fault.kind in RUNTIME_FAULTS:
        if still is not None:
            params = {k: v for k, v in still.params.items() if k != "duration"}
            _apply(engine, sandbox_id, name, fault.kind, params)
        else:
            engine.control(sandbox_id, name, {"op": "clear", "kind": fault.kind})
    elif still is not None:
        return  # the node stays paused, killed or cut off until its last fault ends
    elif fault.kind == "kill":
        engine.restart(sandbox_id, name)
        status_forget(sandbox_id)
        _after_restart(fault.sandbox, name)
    elif fault.kind == "pause":
        engine.resume(sandbox_id, name)
        status_forget(sandbox_id)
    elif fault.kind == "partition":
        engine.heal(sandbox_id, name)
        status_forget(sandbox_id)


def fault_revert_due() -> list[int]:
    """Revert every fault past its expiry (a safety net for lost countdown tasks, and the
    retry of reverts the engine refused). Returns the ids reverted."""
    due = list(
        Fault.objects.filter(reverted_at__isnull=True, expires_at__lte=timezone.now()).values_list(
            "pk", flat=True
        )
    )
    done = []
    for fault_id in due:
        try:
            fault_revert(fault_id=fault_id)
        except EngineError as exc:
            log.warning("fault %s not reverted yet (retried on the next run): %s", fault_id, exc)
            continue
        done.append(fault_id)
    return done


# --- live controls and scaling --------------------------------------------------------


def sandbox_control(*, sandbox: Sandbox, control_id: str, value: Any) -> dict[str, Any]:
    """Apply one of the pattern's live controls (policy, rate, replica count, …)."""
    if sandbox.state != Sandbox.State.RUNNING:
        raise SandboxError(NOT_RUNNING.format(state=sandbox.get_state_display().lower()))
    pattern = load_pattern(sandbox.pattern)
    control = next((c for c in pattern.controls if c.id == control_id), None)
    if control is None:
        names = ", ".join(c.id for c in pattern.controls)
        raise SandboxError(
            UNKNOWN_CONTROL.format(pattern=sandbox.pattern, control=control_id, names=names)
        )
    try:
        checked = control.validate(value)
    except (PatternError, ValueError) as exc:
        raise SandboxError(BAD_CONTROL_VALUE.format(control=control_id, message=exc)) from exc
    if control.kind == "scale":
        assert control.role is not None
        return sandbox_scale(sandbox=sandbox, role=control.role, count=int(checked))
    engine = get_engine()
    targets = [n.name for n in sandbox.nodes.all() if control.applies_to(n.name, n.role)]
    down: list[EngineError] = []
    for name in sorted(targets, key=_natural):
        try:
            reply = engine.control(
                sandbox.hex, name, {"op": "config", "set": {control.key: checked}}
            )
        except EngineError as exc:
            if len(targets) == 1:
                raise
            # One instance of a role is down (killed, say): it is given the learner's
            # settings when it comes back (_reapply_controls), like a restarted node.
            log.info("control %s not sent to %s for now: %s", control_id, name, exc)
            down.append(exc)
            continue
        if not reply.get("ok"):
            raise SandboxError(f"Node {name} refused: {reply.get('error')}")
    if down and len(down) == len(targets):
        raise down[0]
    with transaction.atomic():
        locked = _locked(sandbox.pk)
        locked.controls = {**locked.controls, control_id: checked}
        locked.save(update_fields=["controls"])
    sandbox.controls = locked.controls
    return {"control": control_id, "value": checked}


def control_values(*, sandbox: Sandbox, pattern: Pattern | None = None) -> dict[str, Any]:
    """Each live control's current value: what the learner set, else the default (a
    scale control's value is the number of nodes of its role)."""
    pattern = pattern or load_pattern(sandbox.pattern)
    values: dict[str, Any] = {}
    for control in pattern.controls:
        if control.kind == "scale":
            values[control.id] = sandbox.nodes.filter(role=control.role).count()
        else:
            values[control.id] = sandbox.controls.get(control.id, control.default)
    return values


def sandbox_scale(*, sandbox: Sandbox, role: str, count: int) -> dict[str, Any]:
    """Add or remove nodes of a replicated role, then tell every node the new peers."""
    pattern = load_pattern(sandbox.pattern)
    node_def = next((n for n in pattern.nodes if n.role == role and n.count is not None), None)
    if node_def is None:
        raise SandboxError(f"The {sandbox.pattern} pattern has no replicated role {role!r}.")
    assert node_def.min_count is not None and node_def.max_count is not None
    if not node_def.min_count <= count <= node_def.max_count:
        raise SandboxError(
            f"{role} count must be from {node_def.min_count} to {node_def.max_count}, got {count}."
        )
    engine = get_engine()
    rows = [n for n in sandbox.nodes.all() if n.role == role]
    spec = sandbox_spec(sandbox=sandbox, pattern=pattern)
    wanted = {
        n.name: n for n in pattern.expand(count_overrides={node_def.name: count}) if n.role == role
    }
    have = {n.name for n in rows}
    for name in sorted(set(wanted) - have, key=_natural):
        new = wanted[name]
        status = engine.add_node(
            spec, NodeSpec(name=name, role=new.role, program=new.program, env=new.env)
        )
        Node.objects.update_or_create(
            sandbox=sandbox,
            name=name,
            defaults={"role": new.role, "program": new.program, "address": status.address},
        )
    leaving = sorted(have - set(wanted), key=_natural, reverse=True)
    if leaving:
        # Take them out of every node's address book first, so the balancer stops sending
        # to them before they go: scaling down loses no request.
        _push_peers(sandbox, exclude=set(leaving))
    for name in leaving:
        engine.remove_node(sandbox.hex, name)
        Node.objects.filter(sandbox=sandbox, name=name).delete()
    status_forget(sandbox.hex)
    # Only the new nodes: one that a fault has killed meanwhile is not waited for.
    _wait_ready(sandbox, sandbox_spec(sandbox=sandbox, pattern=pattern), names=set(wanted) - have)
    _push_peers(sandbox)
    for name in sorted(set(wanted) - have, key=_natural):  # a role's settings reach new nodes
        _reapply_controls(sandbox, name)
    return {"control": "scale", "role": role, "count": count}


def _push_peers(
    sandbox: Sandbox, only: str | None = None, exclude: set[str] | frozenset[str] = frozenset()
) -> None:
    """Tell nodes the sandbox's current address book (after scaling, or to a node that
    restarted with the address book it was created with), leaving out ``exclude``."""
    engine = get_engine()
    peers = [
        {"name": s.name, "role": s.role, "address": s.address}
        for s in engine.status(sandbox.hex)
        if s.name not in exclude
    ]
    for node in sandbox.nodes.all():
        if node.name in exclude or (only is not None and node.name != only):
            continue
        try:
            engine.control(sandbox.hex, node.name, {"op": "peers", "set": peers})
        except EngineError as exc:  # a killed node learns its peers when it restarts
            log.info("peers update skipped for %s: %s", node.name, exc)


def _after_restart(sandbox: Sandbox, name: str) -> None:
    deadline = time.monotonic() + settings.SANDBOX_LAUNCH_TIMEOUT
    engine = get_engine()
    while time.monotonic() < deadline:
        try:
            if engine.control(sandbox.hex, name, {"op": "state"}).get("ok"):
                break
        except EngineError:
            time.sleep(READY_POLL_SECONDS)
    _push_peers(sandbox, only=name)
    _reapply_controls(sandbox, name)


def _reapply_controls(sandbox: Sandbox, name: str) -> None:
    """A restarted node starts from its defaults: give it back the learner's settings."""
    sandbox.refresh_from_db(fields=["controls"])
    pattern = load_pattern(sandbox.pattern)
    node_def = pattern.node_def(name)
    if node_def is None:
        return
    role = node_def.role
    changes = {
        c.key: sandbox.controls[c.id]
        for c in pattern.controls
        if c.applies_to(name, role) and c.key is not None and c.id in sandbox.controls
    }
    if not changes:
        return
    try:
        get_engine().control(sandbox.hex, name, {"op": "config", "set": changes})
    except EngineError as exc:
        log.info("controls not re-applied to %s: %s", name, exc)


def _natural(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (name, 0)
