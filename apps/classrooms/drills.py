"""Class-wide chaos drills: an instructor breaks the same node in every selected running
sandbox of one pattern among a classroom's learners, and each sandbox's own telemetry
says how its learner's system took it.

``drill_start`` checks and records the drill and queues ``drill_inject``, which injects
the fault into every target at once (a few threads: each injection is an engine call of
up to a few hundred milliseconds) through the same ``labs.services.fault_inject`` a
learner's own fault goes through, so it reverts on its own after its duration. Each
learner's event log says that a class drill did it and who ran it. ``drill_measure``
runs once the faults have reverted and settled: per sandbox, how long users saw errors
(first to last failed request) and how many requests failed, out of how many.

Safe by construction: only the classroom's instructors start one, only their learners'
sandboxes are touched, at most ``DRILLS_PER_MINUTE`` per classroom, every drill recorded.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.db import close_old_connections, connections, transaction
from django.utils import timezone

from apps.accounts.models import User
from apps.classrooms import selectors
from apps.classrooms.models import Classroom, Drill, DrillTarget
from apps.labs import services
from apps.labs.engine import EngineError
from apps.labs.measures import MEASURES, MeasureError, TelemetryMissing, Timeline
from apps.labs.models import Sandbox
from apps.labs.patterns import PatternError, load_pattern
from apps.labs.supervisor import snapshot_cache_key
from config.tasks import queue_task

log = logging.getLogger(__name__)
DRILLS_PER_MINUTE = 3
INJECT_THREADS = 8
SETTLE_S = 5  # measured this long after the fault reverts: the recovery is part of it
MEASURE_GIVE_UP_S = 60  # telemetry that has not caught up by then never will

NOT_AN_INSTRUCTOR = "Only this classroom's instructors may run a drill."
UNKNOWN_PATTERN = "No sandbox pattern '{pattern}'."
UNKNOWN_NODE = "{pattern} has no node '{node}'; it has {names}."
UNSUPPORTED_FAULT = "{pattern} does not support '{kind}' faults; it supports {kinds}."
BAD_DURATION = "The duration must be a whole number of seconds from 1 to {max}."
TOO_MANY = "At most {n} drills a minute per classroom: wait a moment and start it again."
NO_TARGETS = (
    "No learner of this classroom{chosen} has a running {pattern} sandbox: a drill needs "
    "at least one."
)


class DrillError(ValueError):
    pass


def drill_candidates(
    *, classroom: Classroom, pattern: str, learner_ids: list[int] | None = None
) -> list[Sandbox]:
    """The running sandboxes of ``pattern`` owned by the classroom's current learners
    (those of ``learner_ids`` only, if given): one per learner, their newest."""
    learners = selectors.classroom_learners(classroom=classroom)
    if learner_ids:
        learners = learners.filter(pk__in=learner_ids)
    newest: dict[int, Sandbox] = {}
    for sandbox in Sandbox.objects.filter(
        owner__in=learners, pattern=pattern, state=Sandbox.State.RUNNING
    ).order_by("created_at"):
        newest[sandbox.owner_id] = sandbox
    return list(newest.values())


def drill_start(
    *,
    classroom: Classroom,
    by: User,
    pattern: str,
    node: str,
    kind: str,
    duration: int,
    params: dict[str, Any] | None = None,
    learner_ids: list[int] | None = None,
    enqueue: bool = True,
) -> Drill:
    if not selectors.classroom_is_instructor(user=by, classroom=classroom):
        raise PermissionDenied(NOT_AN_INSTRUCTOR)
    try:
        spec = load_pattern(pattern)
    except PatternError:
        raise DrillError(UNKNOWN_PATTERN.format(pattern=pattern)) from None
    names = spec.node_names()
    if node not in names:
        raise DrillError(UNKNOWN_NODE.format(pattern=pattern, node=node, names=", ".join(names)))
    if kind not in spec.faults or kind not in services.FAULT_PARAMS:
        kinds = ", ".join(spec.faults)
        raise DrillError(UNSUPPORTED_FAULT.format(pattern=pattern, kind=kind, kinds=kinds))
    if kind == "restart":
        duration = 0
    elif not isinstance(duration, int) or not 1 <= duration <= services.MAX_FAULT_SECONDS:
        raise DrillError(BAD_DURATION.format(max=services.MAX_FAULT_SECONDS))
    try:
        clean = services.fault_params(kind, params or {})
    except services.SandboxError as exc:
        raise DrillError(str(exc)) from None
    with transaction.atomic():
        Classroom.objects.select_for_update().get(pk=classroom.pk)  # one start at a time
        recent = Drill.objects.filter(
            classroom=classroom, created_at__gte=timezone.now() - timedelta(minutes=1)
        ).count()
        if recent >= DRILLS_PER_MINUTE:
            raise DrillError(TOO_MANY.format(n=DRILLS_PER_MINUTE))
        targets = drill_candidates(classroom=classroom, pattern=pattern, learner_ids=learner_ids)
        if not targets:
            chosen = " you chose" if learner_ids else ""
            raise DrillError(NO_TARGETS.format(chosen=chosen, pattern=pattern))
        drill = Drill.objects.create(
            classroom=classroom,
            created_by=by,
            pattern=pattern,
            node=node,
            kind=kind,
            params=clean,
            duration=duration,
        )
        DrillTarget.objects.bulk_create(
            DrillTarget(drill=drill, learner_id=s.owner_id, sandbox=s) for s in targets
        )
        if enqueue:
            from apps.classrooms.tasks import drill_inject_task

            drill_id = drill.pk
            transaction.on_commit(lambda: queue_task(drill_inject_task, drill_id))
    log.info(
        "drill %s by %s: %s on %s in %d %s sandboxes",
        drill.pk, by.username, kind, node, len(targets), pattern,
    )  # fmt: skip
    return drill


def _describe(drill: Drill) -> str:
    who = drill.created_by.username if drill.created_by else "an instructor"
    what = {"kill": "killed", "pause": "paused", "restart": "restarted",
            "partition": "partitioned"}.get(drill.kind, f"put {drill.kind} on")  # fmt: skip
    lasting = f" for {drill.duration} s" if drill.duration else ""
    return f"Class drill: {who} {what} {drill.node}{lasting}. Watch how your system takes it."


def _inject_one(drill: Drill, target: DrillTarget) -> None:
    """One target, on its own thread (and database connection)."""
    try:
        sandbox = target.sandbox
        if sandbox is None:
            raise services.SandboxError("The sandbox is gone.")
        sandbox.refresh_from_db()
        fault = services.fault_inject(
            sandbox=sandbox,
            node_name=drill.node,
            kind=drill.kind,
            duration=drill.duration or None,
            params=drill.params,
            user=drill.created_by,
        )
        target.fault = fault
        target.injected_at = timezone.now()
        target.save(update_fields=["fault", "injected_at"])
        services.sandbox_tell(sandbox=sandbox, text=_describe(drill), kind="drill", node=drill.node)
    except (services.SandboxError, EngineError, Sandbox.DoesNotExist) as exc:
        target.error = str(exc)[:300]
        target.save(update_fields=["error"])
    finally:
        connections.close_all()


def drill_inject(*, drill_id: int, enqueue: bool = True) -> Drill:
    """Inject the drill's fault into every target at once (the task's body). Idempotent:
    a target already tried is not tried again."""
    drill = Drill.objects.select_related("created_by").get(pk=drill_id)
    pending = list(
        drill.targets.select_related("sandbox").filter(injected_at__isnull=True, error="")
    )
    if pending:
        with ThreadPoolExecutor(max_workers=min(INJECT_THREADS, len(pending))) as pool:
            list(pool.map(lambda t: _inject_one(drill, t), pending))
        close_old_connections()
    drill.injected_at = timezone.now()
    drill.save(update_fields=["injected_at"])
    if enqueue:
        from apps.classrooms.tasks import drill_measure_task

        queue_task(drill_measure_task, drill.pk, countdown=drill.duration + SETTLE_S + 1)
    return drill


class NotReady(Exception):
    """Some target's telemetry has not reached the end of its window yet."""


def drill_measure(*, drill_id: int) -> Drill:
    """Per injected target, from its sandbox's own telemetry: errors lasted, requests
    failed, out of how many, over the fault's time plus ``SETTLE_S``. Raises NotReady
    while a target's telemetry lags (the task retries), until ``MEASURE_GIVE_UP_S``."""
    drill = Drill.objects.get(pk=drill_id)
    waiting = False
    for target in drill.targets.select_related("sandbox", "fault").filter(measured={}):
        if target.fault is None or target.sandbox is None:
            continue
        start = target.fault.created_at.timestamp()
        end = start + drill.duration + SETTLE_S
        snapshot = cache.get(snapshot_cache_key(target.sandbox.hex))
        history = snapshot.get("history") if isinstance(snapshot, dict) else None
        try:
            result = MEASURES["error_duration"].compute(
                history or [], Timeline({"drill": (start, end)}), {"from_step": "drill"}
            )
            measured: dict[str, Any] = {
                k: result[k] for k in ("error_s", "errors", "calls", "error_pct")
            }
        except TelemetryMissing as exc:
            if time.time() < end + MEASURE_GIVE_UP_S:
                waiting = True
                continue
            measured = {"error": str(exc)[:300]}
        except MeasureError as exc:
            measured = {"error": str(exc)[:300]}
        target.measured = measured
        target.save(update_fields=["measured"])
    if waiting:
        raise NotReady
    drill.measured_at = timezone.now()
    drill.save(update_fields=["measured_at"])
    return drill
