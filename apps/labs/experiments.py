"""Experiments: the learner predicts, the platform acts on their sandbox step by step, then
checks the prediction against the sandbox's own telemetry.

``experiment_start`` (from a view) records the run and, once the transaction commits,
queues its first step and a watchdog. Each step task (``experiment_step``) applies the
step's actions (faults through ``services.fault_inject``, controls through
``services.sandbox_control``), records when it started, and queues the next step to run
``duration_s`` later; after the last one, the check (``experiment_check``) runs
``CHECK_DELAY_S`` after the last step's end, when the snapshot the supervisor stores
about once a second covers the whole run, and retries every second until
``CHECK_TIMEOUT_S``. The check computes the experiment's measure, judges the prediction,
and writes the explanation.

Every function a task calls is idempotent: a redelivered step or check finds the run
past it and does nothing. A run whose tasks were lost (a worker died, the process
restarted) is failed by the watchdog queued at the start, or by
``experiment_resolve_stale`` when someone looks at the sandbox's experiments.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.accounts.models import User
from apps.labs import selectors, services
from apps.labs.engine import EngineError
from apps.labs.measures import MEASURES, MeasureError, TelemetryMissing, Timeline, safe_format
from apps.labs.models import ExperimentRun, Sandbox
from apps.labs.patterns import Action, Experiment, Pattern, PatternError, load_pattern
from apps.labs.supervisor import snapshot_cache_key
from config.tasks import queue_task

log = logging.getLogger(__name__)

CHECK_DELAY_S = 2.5  # after the last step: the stored snapshot covers the run by then
CHECK_TIMEOUT_S = 15.0  # after the last step: telemetry still missing is a failure
CHECK_RETRY_S = 1.0
STEP_GRACE_S = 10.0  # a step (or the check) this late means its task was lost

NOT_OWNER = "Only the learner who launched this sandbox can run its experiments."
UNKNOWN_EXPERIMENT = "The {pattern} sandbox has no experiment {experiment!r}."
NOT_RUNNING = "The sandbox is {state}: experiments need a running sandbox."
BUSY = (
    "The experiment “{title}” is still running on this sandbox (about {seconds} s left): "
    "wait for its result, or cancel it."
)
NOTHING_TO_CANCEL = "No experiment is running on this sandbox."
OUT_OF_ORDER = (
    "The scenario goes one stage at a time, in order: stage {number}, “{title}”, comes first."
)
STEP_FAILED = "Step {number} (“{step}”) could not be done: {message}"
SANDBOX_ENDED = (
    "The sandbox was {state} before the experiment finished, so there is nothing to check. "
    "Launch it again and rerun the experiment."
)
NO_TELEMETRY = (
    "The sandbox's live telemetry did not reach the platform during the experiment, so "
    "your prediction could not be checked. Wait until the live view shows traffic, then "
    "run the experiment again. ({detail})"
)
INTERRUPTED = (
    "The experiment stopped half-way: the server's background worker was interrupted. Run it again."
)
GONE = "This experiment is no longer part of the {pattern} pattern."
CANCELLED_BY_LEARNER = (
    "You cancelled the experiment: whatever it changed on your sandbox is put back."
)
CANCELLED_BY_STOP = "The sandbox was stopped during the experiment, which was cancelled."
CANCELLED_BY_EXPIRY = "The sandbox expired during the experiment, which was cancelled."


class ExperimentError(ValueError):
    """A request about an experiment that cannot be done; the message is for the learner."""


class ExperimentNotFound(ExperimentError):
    pass


class SandboxNotRunning(ExperimentError):
    pass


class ExperimentBusy(ExperimentError):
    pass


class PredictionInvalid(ExperimentError):
    pass


class ScenarioOrder(ExperimentError):
    pass


@dataclass(frozen=True)
class Stage:
    """One stage of a pattern's scenario on one sandbox: its experiment and the learner's
    latest checked run of it there (None: not done yet)."""

    number: int
    experiment: Experiment
    run: ExperimentRun | None


def scenario_stages(*, sandbox: Sandbox, pattern: Pattern) -> list[Stage]:
    """The pattern's scenario as this sandbox went through it (a scenario is one sandbox's:
    a new sandbox starts it again)."""
    if pattern.scenario is None:
        return []
    runs: dict[str, ExperimentRun] = {}
    checked = ExperimentRun.objects.filter(
        sandbox=sandbox,
        state=ExperimentRun.State.CHECKED,
        experiment__in=pattern.scenario.experiments,
    ).order_by("started_at")
    for run in checked:
        runs[run.experiment] = run  # the latest wins
    stages = []
    for number, experiment_id in enumerate(pattern.scenario.experiments, start=1):
        experiment = pattern.experiment(experiment_id)
        assert experiment is not None  # the loader checked it
        stages.append(Stage(number, experiment, runs.get(experiment_id)))
    return stages


class CheckNotReady(Exception):
    """Too early to check (telemetry still catching up): the check task retries."""


# --- start and cancel -------------------------------------------------------------------


def experiment_start(
    *,
    user: User,
    sandbox_id: str | uuid.UUID,
    experiment_id: str,
    prediction: Any,
    enqueue: bool = True,
) -> ExperimentRun:
    """Start an experiment on the user's own running sandbox, with their prediction.

    Raises Http404 (another learner's sandbox) or PermissionDenied (not signed in, or
    someone who may watch the sandbox but does not own it); ExperimentNotFound,
    SandboxNotRunning, ExperimentBusy (one run at a time per sandbox) or
    PredictionInvalid, whose messages are for the learner."""
    sandbox = selectors.sandbox_get_for_user(user=user, sandbox_id=sandbox_id)
    if sandbox.owner_id != user.pk:
        raise PermissionDenied(NOT_OWNER)
    experiment = _experiment_or_404(sandbox.pattern, experiment_id)
    with transaction.atomic():
        sandbox = Sandbox.objects.select_for_update().get(pk=sandbox.pk)
        if sandbox.state != Sandbox.State.RUNNING:
            raise SandboxNotRunning(NOT_RUNNING.format(state=sandbox.get_state_display().lower()))
        experiment_resolve_stale(sandbox=sandbox)
        busy = selectors.experiment_run_running(sandbox=sandbox)
        if busy is not None:
            raise ExperimentBusy(_busy_message(busy))
        _check_scenario_order(sandbox, experiment)
        try:
            value = experiment.prediction.validate(prediction)
        except ValueError as exc:
            raise PredictionInvalid(str(exc)) from None
        try:
            with transaction.atomic():
                run = ExperimentRun.objects.create(
                    user=user,
                    sandbox=sandbox,
                    pattern=sandbox.pattern,
                    experiment=experiment.id,
                    prediction=value,
                    started_at=timezone.now(),
                    saved_controls=services.control_values(sandbox=sandbox),
                )
        except IntegrityError:  # another start won the race (the one-running constraint)
            winner = selectors.experiment_run_running(sandbox=sandbox)
            raise ExperimentBusy(
                _busy_message(winner) if winner else BUSY.format(title="?", seconds="a few")
            ) from None
        if enqueue:
            from apps.labs.tasks import experiment_check_task, experiment_step_task

            run_id = run.pk
            watchdog = experiment.duration_s + CHECK_TIMEOUT_S + STEP_GRACE_S
            transaction.on_commit(lambda: queue_task(experiment_step_task, run_id, 0))
            transaction.on_commit(
                lambda: queue_task(experiment_check_task, run_id, countdown=watchdog)
            )
    return run


def experiment_cancel(*, user: User, sandbox_id: str | uuid.UUID) -> ExperimentRun:
    """The owner cancels the experiment running on their sandbox: the faults its steps
    injected are reverted and the controls its steps would have put back are put back,
    now, so the sandbox is as it was before the run."""
    sandbox = selectors.sandbox_get_for_user(user=user, sandbox_id=sandbox_id)
    if sandbox.owner_id != user.pk:
        raise PermissionDenied(NOT_OWNER)
    with transaction.atomic():
        run = (
            ExperimentRun.objects.select_for_update(of=("self",))
            .filter(sandbox=sandbox, state=ExperimentRun.State.RUNNING)
            .first()
        )
        if run is None:
            raise ExperimentError(NOTHING_TO_CANCEL)
        _finish(run, ExperimentRun.State.CANCELLED, error=CANCELLED_BY_LEARNER)
    for fault_id in run.faults:  # idempotent; what the engine refuses is retried later
        try:
            services.fault_revert(fault_id=fault_id)
        except EngineError as exc:
            log.warning("fault %s not reverted yet: %s", fault_id, exc)
    _put_back(run, sandbox)
    return run


def experiment_cancel_for_sandbox(*, sandbox: Sandbox, reason: str = "") -> int:
    """The sandbox is stopping: cancel its running experiment (called by
    ``services.sandbox_stop``). Returns how many runs were cancelled."""
    message = CANCELLED_BY_EXPIRY if reason == "expired" else CANCELLED_BY_STOP
    return ExperimentRun.objects.filter(sandbox=sandbox, state=ExperimentRun.State.RUNNING).update(
        state=ExperimentRun.State.CANCELLED,
        error=message,
        finished_at=timezone.now(),
    )


def experiment_resolve_stale(*, sandbox: Sandbox) -> list[int]:
    """Settle the sandbox's running runs that cannot go on: the sandbox is no longer
    running, or their next task is long overdue (lost with a worker)."""
    settled = []
    now = time.time()
    for run in ExperimentRun.objects.filter(sandbox=sandbox, state=ExperimentRun.State.RUNNING):
        experiment = _experiment(run)
        if sandbox.state != Sandbox.State.RUNNING:
            message = SANDBOX_ENDED.format(state=sandbox.get_state_display().lower())
        elif experiment is None:
            message = GONE.format(pattern=run.pattern)
        elif now > _due(run, experiment) + STEP_GRACE_S:
            message = INTERRUPTED
        else:
            continue
        with transaction.atomic():
            locked = ExperimentRun.objects.select_for_update().get(pk=run.pk)
            if locked.is_running:
                _finish(locked, ExperimentRun.State.FAILED, error=message)
                settled.append(run.pk)
    return settled


# --- steps ------------------------------------------------------------------------------


def experiment_step(*, run_id: int, index: int) -> ExperimentRun | None:
    """Carry out step ``index`` of a run (the step task's body), then queue the next one,
    or the check after the last. Idempotent: a step already done is not done again."""
    with transaction.atomic():
        # Locks in the order start and stop take them (the sandbox, then its runs): the
        # step's controls lock the sandbox too.
        sandbox_id = ExperimentRun.objects.filter(pk=run_id).values_list("sandbox_id", flat=True)
        Sandbox.objects.select_for_update().filter(pk__in=sandbox_id).first()
        run = (
            ExperimentRun.objects.select_for_update(of=("self",))
            .select_related("sandbox", "user")
            .filter(pk=run_id)
            .first()
        )
        if run is None or not run.is_running or len(run.timeline) != index:
            return run
        experiment = _experiment(run)
        if experiment is None or index >= len(experiment.steps):
            _finish(run, ExperimentRun.State.FAILED, error=GONE.format(pattern=run.pattern))
            return run
        sandbox = run.sandbox
        if sandbox is None or sandbox.state != Sandbox.State.RUNNING:
            state = sandbox.get_state_display().lower() if sandbox else "deleted"
            _finish(run, ExperimentRun.State.FAILED, error=SANDBOX_ENDED.format(state=state))
            return run
        step = experiment.steps[index]
        try:
            for action in step.actions:
                _apply(action, run, sandbox)
        except (services.SandboxError, EngineError, PatternError) as exc:
            log.info("experiment run %s, step %s failed: %s", run.pk, step.id, exc)
            error = STEP_FAILED.format(number=index + 1, step=step.text, message=exc)
            _finish(run, ExperimentRun.State.FAILED, error=error)
            return run
        run.timeline = [*run.timeline, round(time.time(), 4)]
        run.step_index = index
        run.save(update_fields=["timeline", "step_index", "faults"])
        _queue_after(run, experiment, index)
    return run


def _apply(action: Action, run: ExperimentRun, sandbox: Sandbox) -> None:
    if action.kind == "fault":
        fault = services.fault_inject(
            sandbox=sandbox,
            node_name=action.node,
            kind=action.fault,
            duration=action.duration_s or None,
            params=dict(action.params),
            user=run.user,
        )
        run.faults = [*run.faults, fault.pk]
        return
    if action.restore:
        if action.control not in run.saved_controls:
            return
        value = run.saved_controls[action.control]
    else:
        value = action.value
    services.sandbox_control(sandbox=sandbox, control_id=action.control, value=value)


def _queue_after(run: ExperimentRun, experiment: Experiment, index: int) -> None:
    from apps.labs.tasks import experiment_check_task, experiment_step_task

    run_id = run.pk
    countdown = experiment.steps[index].duration_s
    if index + 1 < len(experiment.steps):
        transaction.on_commit(
            lambda: queue_task(experiment_step_task, run_id, index + 1, countdown=countdown)
        )
    else:
        transaction.on_commit(
            lambda: queue_task(experiment_check_task, run_id, countdown=countdown + CHECK_DELAY_S)
        )


def _put_back(run: ExperimentRun, sandbox: Sandbox) -> None:
    """Apply the ``restore`` actions of the steps a cancelled run did not reach."""
    experiment = _experiment(run)
    if experiment is None or sandbox.state != Sandbox.State.RUNNING:
        return
    for step in experiment.steps[len(run.timeline) :]:
        for action in step.actions:
            if action.restore:
                try:
                    _apply(action, run, sandbox)
                except (services.SandboxError, EngineError) as exc:
                    log.info("could not put %s back: %s", action.control, exc)


# --- the check --------------------------------------------------------------------------


def experiment_check(*, run_id: int) -> ExperimentRun | None:
    """Measure, judge and explain a run whose steps are done (the check task's body; also
    the watchdog's). Raises CheckNotReady while it is too early; fails the run, with a
    message for the learner, when the sandbox ended or its telemetry is missing."""
    with transaction.atomic():
        run = (
            ExperimentRun.objects.select_for_update(of=("self",))
            .select_related("sandbox")
            .filter(pk=run_id)
            .first()
        )
        if run is None or not run.is_running:
            return run
        experiment = _experiment(run)
        if experiment is None:
            _finish(run, ExperimentRun.State.FAILED, error=GONE.format(pattern=run.pattern))
            return run
        now = time.time()
        if len(run.timeline) < len(experiment.steps):  # the watchdog, while steps go on
            if now > _due(run, experiment) + STEP_GRACE_S:
                _finish(run, ExperimentRun.State.FAILED, error=INTERRUPTED)
                return run
            raise CheckNotReady
        end = run_timeline(run, experiment).window(experiment.steps[0].id, experiment.steps[-1].id)
        if now < end[1] + CHECK_DELAY_S - 0.05:
            raise CheckNotReady
        sandbox = run.sandbox
        if sandbox is None or sandbox.state != Sandbox.State.RUNNING:
            state = sandbox.get_state_display().lower() if sandbox else "deleted"
            _finish(run, ExperimentRun.State.FAILED, error=SANDBOX_ENDED.format(state=state))
            return run
        snapshot = cache.get(snapshot_cache_key(sandbox.hex))
        history = snapshot.get("history") if isinstance(snapshot, dict) else None
        check = experiment.check
        try:
            measured = MEASURES[check.measure].compute(
                history or [], run_timeline(run, experiment), check.params
            )
        except TelemetryMissing as exc:
            if now < end[1] + CHECK_TIMEOUT_S:
                raise CheckNotReady from None
            _finish(run, ExperimentRun.State.FAILED, error=NO_TELEMETRY.format(detail=exc))
            return run
        except MeasureError as exc:
            _finish(run, ExperimentRun.State.FAILED, error=str(exc))
            return run
        result = judge(experiment, run.prediction, measured, pattern_values(run.pattern))
        run.measured = measured
        run.correct = result.correct
        run.explanation = result.explanation
        _finish(run, ExperimentRun.State.CHECKED)
    return run


@dataclass(frozen=True)
class Verdict:
    answer: str | float
    correct: bool
    explanation: str


def judge(
    experiment: Experiment,
    prediction: Any,
    measured: Mapping[str, float],
    spec_values: Mapping[str, float],
) -> Verdict:
    """Judge a prediction against measured values, and fill the explanation."""
    check = experiment.check
    answer = check.judge.answer(measured)
    correct = check.judge.correct(prediction, measured)
    values = {
        **measured,
        **spec_values,
        "prediction": experiment.prediction.show(prediction),
        "answer": experiment.prediction.show(answer),
    }
    return Verdict(answer, correct, safe_format(check.template(answer), values))


def _check_scenario_order(sandbox: Sandbox, experiment: Experiment) -> None:
    """A scenario's stage waits until every stage before it was run and checked here."""
    pattern = load_pattern(sandbox.pattern)
    stages = scenario_stages(sandbox=sandbox, pattern=pattern)
    for stage in stages:
        if stage.experiment.id == experiment.id:
            return
        if stage.run is None:
            raise ScenarioOrder(
                OUT_OF_ORDER.format(number=stage.number, title=stage.experiment.title)
            )


def run_timeline(run: ExperimentRun, experiment: Experiment) -> Timeline:
    """Each step's actual start and end: the next step's start; the last step's end is
    its start plus its duration."""
    starts = list(run.timeline)
    steps: dict[str, tuple[float, float]] = {}
    for index, start in enumerate(starts):
        step = experiment.steps[index]
        end = starts[index + 1] if index + 1 < len(starts) else start + step.duration_s
        steps[step.id] = (float(start), float(end))
    return Timeline(steps)


def pattern_values(pattern_id: str) -> dict[str, float]:
    try:
        return load_pattern(pattern_id).spec_values()
    except PatternError:
        return {}


# --- helpers ----------------------------------------------------------------------------


def _experiment(run: ExperimentRun) -> Experiment | None:
    try:
        return load_pattern(run.pattern).experiment(run.experiment)
    except PatternError:
        return None


def _experiment_or_404(pattern_id: str, experiment_id: str) -> Experiment:
    try:
        experiment = load_pattern(pattern_id).experiment(experiment_id)
    except PatternError:
        experiment = None
    if experiment is None:
        raise ExperimentNotFound(
            UNKNOWN_EXPERIMENT.format(pattern=pattern_id, experiment=experiment_id)
        )
    return experiment


def _due(run: ExperimentRun, experiment: Experiment) -> float:
    """When the run's next task should have run: the next step, or the check."""
    done = len(run.timeline)
    if done == 0:
        return run.started_at.timestamp()
    end_of_current = run.timeline[-1] + experiment.steps[done - 1].duration_s
    if done < len(experiment.steps):
        return float(end_of_current)
    return float(end_of_current + CHECK_TIMEOUT_S)


def seconds_left(run: ExperimentRun, experiment: Experiment, now: float | None = None) -> float:
    """Until the run's steps are all done (for the countdown); 0 while it is checking."""
    now = time.time() if now is None else now
    done = len(run.timeline)
    if done == 0:
        return experiment.duration_s
    end_of_current = run.timeline[-1] + experiment.steps[done - 1].duration_s
    later = sum(s.duration_s for s in experiment.steps[done:])
    return max(0.0, end_of_current + later - now)


def _busy_message(run: ExperimentRun) -> str:
    experiment = _experiment(run)
    if experiment is None:
        return BUSY.format(title=run.experiment, seconds="a few")
    left = seconds_left(run, experiment) + CHECK_DELAY_S
    return BUSY.format(title=experiment.title, seconds=round(left))


def _finish(run: ExperimentRun, state: str, *, error: str = "") -> None:
    run.state = state
    run.error = error
    run.finished_at = timezone.now()
    run.save(update_fields=["state", "error", "finished_at", "measured", "correct", "explanation"])
