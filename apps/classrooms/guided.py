"""Guided class experiments: an instructor asks the whole class to run one of a chapter's
experiments, and sees the class's predictions against what their sandboxes measured.

Nothing runs on a learner's sandbox without them: ``class_experiment_start`` records the
ask and tells every learner's running sandbox of the pattern (its event log), and the
learner's experiments panel marks the experiment as asked by the class
(``class_experiments_asked``). Each learner predicts and starts it themselves, through the
experiment's own form, on their own sandbox: the prediction comes before the faults, as in
any experiment. ``class_experiment_results`` takes each learner's first run started while
the ask was open (the first prediction is the honest one; a second try has seen the
answer) and counts predictions, right ones and what the sandboxes measured.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from datetime import timedelta

from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from apps.accounts.models import User
from apps.classrooms import selectors
from apps.classrooms.drills import DRILLS_PER_MINUTE, drill_candidates
from apps.classrooms.models import ClassExperiment, Classroom
from apps.labs import services
from apps.labs.models import ExperimentRun
from apps.labs.patterns import Experiment, PatternError, load_pattern

log = logging.getLogger(__name__)
MAX_MINUTES = 60

NOT_AN_INSTRUCTOR = "Only this classroom's instructors may ask the class to run an experiment."
UNKNOWN_EXPERIMENT = "{pattern} has no experiment '{experiment}'."
UNKNOWN_PATTERN = "No sandbox pattern '{pattern}'."
BAD_MINUTES = "Keep it open for a whole number of minutes from 1 to {max}."
TOO_MANY = "At most {n} class experiments a minute: wait a moment and ask again."


class ClassExperimentError(ValueError):
    pass


def _experiment(pattern: str, experiment_id: str) -> Experiment:
    try:
        spec = load_pattern(pattern)
    except PatternError:
        raise ClassExperimentError(UNKNOWN_PATTERN.format(pattern=pattern)) from None
    found = next((e for e in spec.experiments if e.id == experiment_id), None)
    if found is None:
        raise ClassExperimentError(
            UNKNOWN_EXPERIMENT.format(pattern=pattern, experiment=experiment_id)
        )
    return found


def experiment_title(pattern: str, experiment_id: str) -> str:
    """The experiment's title as learners read it; its id if the pattern no longer has it."""
    try:
        return _experiment(pattern, experiment_id).title
    except ClassExperimentError:
        return experiment_id


def class_experiment_start(
    *, classroom: Classroom, by: User, pattern: str, experiment: str, minutes: int
) -> tuple[ClassExperiment, int]:
    """Ask the class; returns the ask and how many running sandboxes were told. An open ask
    of the same pattern in this classroom is closed by the new one."""
    if not selectors.classroom_is_instructor(user=by, classroom=classroom):
        raise PermissionDenied(NOT_AN_INSTRUCTOR)
    found = _experiment(pattern, experiment)
    if not isinstance(minutes, int) or not 1 <= minutes <= MAX_MINUTES:
        raise ClassExperimentError(BAD_MINUTES.format(max=MAX_MINUTES))
    now = timezone.now()
    with transaction.atomic():
        Classroom.objects.select_for_update().get(pk=classroom.pk)  # one ask at a time
        asks = ClassExperiment.objects.filter(classroom=classroom)
        if asks.filter(created_at__gte=now - timedelta(minutes=1)).count() >= DRILLS_PER_MINUTE:
            raise ClassExperimentError(TOO_MANY.format(n=DRILLS_PER_MINUTE))
        asks.filter(pattern=pattern, closes_at__gt=now).update(closes_at=now)
        ask = ClassExperiment.objects.create(
            classroom=classroom,
            created_by=by,
            pattern=pattern,
            experiment=experiment,
            created_at=now,
            closes_at=now + timedelta(minutes=minutes),
        )
    who = by.get_full_name() or by.username
    text = (
        f"Class experiment: {who} asks the class to run “{found.title}”. Open it under "
        "Experiments, make your prediction, then start it."
    )
    told = drill_candidates(classroom=classroom, pattern=pattern)
    for sandbox in told:
        services.sandbox_tell(sandbox=sandbox, text=text, kind="class-experiment", severity="info")
    log.info("class experiment %s by %s: %s/%s", ask.pk, by.username, pattern, experiment)
    return ask, len(told)


def class_experiment_close(*, ask: ClassExperiment, by: User) -> ClassExperiment:
    if not selectors.classroom_is_instructor(user=by, classroom=ask.classroom):
        raise PermissionDenied(NOT_AN_INSTRUCTOR)
    now = timezone.now()
    if ask.closes_at > now:
        ask.closes_at = now
        ask.save(update_fields=["closes_at"])
    return ask


def class_experiments_asked(*, user: User, pattern: str) -> dict[str, ClassExperiment]:
    """The open asks of ``pattern`` in the classrooms ``user`` is a learner of, by
    experiment id (the newest when two classrooms ask for the same one)."""
    asks = (
        ClassExperiment.objects.filter(
            classroom__memberships__user=user,
            classroom__memberships__left_at__isnull=True,
            pattern=pattern,
            closes_at__gt=timezone.now(),
        )
        .select_related("created_by", "classroom")
        .order_by("created_at", "pk")
    )
    return {ask.experiment: ask for ask in asks}


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LearnerResult:
    learner: User
    run: ExperimentRun | None  # their first run while the ask was open
    prediction: str = ""
    measured: str = ""  # the answer their sandbox measured, as the prediction reads
    correct: bool | None = None


@dataclass(frozen=True)
class OptionCount:
    """One option of a choice prediction: how many predicted it, how many of those were
    right, and in how many sandboxes it is what happened."""

    label: str
    predicted: int
    right: int
    happened: int

    def pct(self, of: int) -> int:
        return round(100 * self.predicted / of) if of else 0


@dataclass(frozen=True)
class Results:
    ask: ClassExperiment
    experiment: Experiment | None
    learners: list[LearnerResult]
    options: list[OptionCount] = field(default_factory=list)
    predicted_median: float | None = None  # number predictions
    measured_median: float | None = None
    unit: str = ""

    @property
    def predicted(self) -> int:
        return sum(1 for r in self.learners if r.run is not None)

    @property
    def checked(self) -> int:
        return sum(1 for r in self.learners if r.correct is not None)

    @property
    def right(self) -> int:
        return sum(1 for r in self.learners if r.correct)

    @property
    def pending(self) -> int:
        return sum(
            1 for r in self.learners if r.run is not None and r.run.state == r.run.State.RUNNING
        )


def class_experiment_results(*, ask: ClassExperiment) -> Results:
    try:
        experiment: Experiment | None = _experiment(ask.pattern, ask.experiment)
    except ClassExperimentError:
        experiment = None  # the pattern changed since: show the raw runs
    learners = list(selectors.classroom_learners(classroom=ask.classroom))
    first: dict[int, ExperimentRun] = {}
    runs = (
        ExperimentRun.objects.filter(
            user__in=learners,
            pattern=ask.pattern,
            experiment=ask.experiment,
            started_at__gte=ask.created_at,
            started_at__lt=ask.closes_at,
        )
        .exclude(state=ExperimentRun.State.CANCELLED)
        .order_by("started_at", "pk")
    )
    for found_run in runs:
        first.setdefault(found_run.user_id, found_run)
    rows = []
    answers: list[str | float] = []
    for learner in learners:
        run = first.get(learner.pk)
        if run is None or experiment is None:
            rows.append(LearnerResult(learner, run))
            continue
        shown = ""
        correct = None
        if run.state == ExperimentRun.State.CHECKED:
            try:
                answer = experiment.check.judge.answer(run.measured)
            except KeyError:  # measured before the spec changed
                answer = None
            if answer is not None:
                answers.append(answer)
                shown = experiment.prediction.show(answer)
            correct = run.correct
        rows.append(
            LearnerResult(learner, run, experiment.prediction.show(run.prediction), shown, correct)
        )
    results = Results(ask, experiment, rows)
    if experiment is None:
        return results
    prediction = experiment.prediction
    made = [first[r.learner.pk] for r in rows if r.run is not None]
    if prediction.kind == "choice":
        options = [
            OptionCount(
                option.label,
                predicted=sum(1 for run in made if run.prediction == option.id),
                right=sum(1 for run in made if run.prediction == option.id and run.correct),
                happened=sum(1 for a in answers if a == option.id),
            )
            for option in prediction.options
        ]
        return Results(ask, experiment, rows, options=options)
    numbers = [float(run.prediction) for run in made if isinstance(run.prediction, int | float)]
    measured = [float(a) for a in answers if isinstance(a, int | float)]
    return Results(
        ask,
        experiment,
        rows,
        predicted_median=statistics.median(numbers) if numbers else None,
        measured_median=statistics.median(measured) if measured else None,
        unit=prediction.unit,
    )
