"""The experiments fragment of the sandbox panel.

``labs:experiments`` (GET) lists the pattern's experiments with the learner's last result
for each, a prediction form per experiment, and, while one runs, its current step and a
countdown (the fragment then polls itself every second). ``labs:experiment_start`` and
``labs:experiment_cancel`` (POST) answer with the same fragment. The panel loads it with
``hx-get`` into ``<section id="experiments">``; without htmx each URL is a page of its own
(a POST redirects to it, or answers 422 with the form's error).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST, require_safe

from apps.accounts.http import AuthedHttpRequest
from apps.labs import experiments, selectors
from apps.labs.models import ExperimentRun, Sandbox
from apps.labs.patterns import Experiment, PatternError, load_pattern

PAGE = "labs/experiments.html"
FRAGMENT = "labs/experiments.html#experiments"


@dataclass(frozen=True)
class Card:
    """One experiment as the fragment shows it."""

    experiment: Experiment
    run: ExperimentRun | None  # the learner's latest run of it
    running: bool = False
    step_number: int = 0  # 1-based: the step in progress (0: about to start)
    step_text: str = ""
    step_seconds_left: int = 0
    seconds_left: int = 0  # until every step is done
    checking: bool = False  # steps done, waiting for the check
    progress_pct: int = 0
    prediction_text: str = ""
    answer_text: str = ""
    measured: tuple[tuple[str, str], ...] = ()
    value: str = ""  # the form's value, kept after an error
    error: str = ""

    @property
    def steps(self) -> list[tuple[int, Any, str]]:
        """(number, step, "done" | "current" | "") for the running run's step list."""
        out = []
        for index, step in enumerate(self.experiment.steps, start=1):
            state = ""
            if self.running and (index < self.step_number or self.checking):
                state = "done"
            elif self.running and index == self.step_number:
                state = "current"
            out.append((index, step, state))
        return out


def experiment_card(
    experiment: Experiment,
    run: ExperimentRun | None,
    *,
    value: str = "",
    error: str = "",
) -> Card:
    if run is None:
        return Card(experiment, None, value=value, error=error)
    fields: dict[str, Any] = {
        "prediction_text": experiment.prediction.show(run.prediction),
        "value": value,
        "error": error,
    }
    if run.is_running:
        now = time.time()
        done = len(run.timeline)
        left = experiments.seconds_left(run, experiment, now)
        total = experiment.duration_s or 1.0
        fields |= {
            "running": True,
            "step_number": done,
            "checking": done == len(experiment.steps) and left <= 0,
            "seconds_left": math.ceil(left),
            "progress_pct": round(100 * (1 - left / total)) if done else 0,
        }
        if done:
            step = experiment.steps[done - 1]
            fields["step_text"] = step.text
            step_end = run.timeline[-1] + step.duration_s
            fields["step_seconds_left"] = max(0, math.ceil(step_end - now))
    elif run.state == ExperimentRun.State.CHECKED:
        check = experiment.check
        try:
            answer = check.judge.answer(run.measured)
            fields["answer_text"] = experiment.prediction.show(answer)
        except KeyError:  # measured before the spec changed
            fields["answer_text"] = ""
        fields["measured"] = tuple(
            (check.outputs[name].label, check.outputs[name].show(run.measured[name]))
            for name in check.show
            if name in run.measured
        )
    return Card(experiment, run, **fields)


def experiments_context(
    *,
    user: Any,
    sandbox: Sandbox,
    form_for: str = "",
    value: str = "",
    error: str = "",
    message: str = "",
) -> dict[str, Any]:
    """What the fragment shows. ``form_for``/``value``/``error``: a refused start, whose
    form keeps the learner's answer and shows why."""
    experiments.experiment_resolve_stale(sandbox=sandbox)
    try:
        pattern = load_pattern(sandbox.pattern)
    except PatternError:
        pattern = None
    found = pattern.experiments if pattern is not None else ()
    # The running run first, then the latest runs: a run that is checked between the two
    # reads is then either still running here (and the fragment polls once more) or
    # checked there, never running in one and gone from the other, which showed a card
    # with no run and stopped the polling for good.
    running = selectors.experiment_run_running(sandbox=sandbox)
    last = selectors.experiment_last_runs(user=sandbox.owner, pattern=sandbox.pattern)
    is_owner = sandbox.owner_id == user.pk
    cards = []
    for experiment in found:
        run = last.get(experiment.id)
        if run is not None and run.is_running and run.sandbox_id != sandbox.pk:
            run = None  # running on another of the learner's sandboxes: not this one's news
        elif run is not None and run.is_running and running is None:
            running = run  # started between the two reads: poll for it
        mine = experiment.id == form_for
        cards.append(
            experiment_card(
                experiment,
                run,
                value=value if mine else "",
                error=error if mine else "",
            )
        )
    # Experiments the learner's class asked for (classrooms.guided): marked, open, first.
    from apps.classrooms.guided import class_experiments_asked

    asked = class_experiments_asked(user=sandbox.owner, pattern=sandbox.pattern) if is_owner else {}
    if asked:
        cards.sort(key=lambda c: c.experiment.id not in asked)
    stages = experiments.scenario_stages(sandbox=sandbox, pattern=pattern) if pattern else []
    scenario = None
    if pattern is not None and pattern.scenario is not None and stages:
        done = [s for s in stages if s.run is not None]
        following = next((s for s in stages if s.run is None), None)
        # The scenario's stages in its order, then the pattern's other experiments.
        order = {s.experiment.id: s.number for s in stages}
        cards.sort(key=lambda c: order.get(c.experiment.id, len(stages) + 1))
        scenario = {
            "title": pattern.scenario.title,
            "intro": pattern.scenario.intro,
            "stages": stages,
            "score": sum(1 for s in done if s.run and s.run.correct),
            "done": len(done),
            "total": len(stages),
            "finished": following is None,
            "next": following.experiment.id if following else "",
            # The stage whose result came last stays open beside the next one.
            "latest": max(done, key=lambda s: s.run.started_at if s.run else 0).experiment.id
            if done
            else "",
            "locked": {
                s.experiment.id
                for s in stages
                if following is not None and s.number > following.number and s.run is None
            },
        }
    return {
        "sandbox": sandbox,
        "cards": cards,
        "scenario": scenario,
        "asked": asked,
        "asked_titles": [
            (ask, card.experiment.title) for card in cards if (ask := asked.get(card.experiment.id))
        ],
        "locked": scenario["locked"] if scenario else set(),
        "running": running,
        "is_owner": is_owner,
        "sandbox_running": sandbox.state == Sandbox.State.RUNNING,
        "can_start": is_owner and sandbox.state == Sandbox.State.RUNNING and running is None,
        "message": message,
    }


@require_safe
@login_required
def experiment_list(request: AuthedHttpRequest, sandbox_id: str) -> HttpResponse:
    sandbox = selectors.sandbox_get_for_user(user=request.user, sandbox_id=sandbox_id)
    context = experiments_context(user=request.user, sandbox=sandbox)
    return render(request, FRAGMENT if request.htmx else PAGE, context)


@require_POST
@login_required
def experiment_start(
    request: AuthedHttpRequest, sandbox_id: str, experiment_id: str
) -> HttpResponse:
    sandbox = selectors.sandbox_get_for_user(user=request.user, sandbox_id=sandbox_id)
    raw = request.POST.get("prediction", "")
    try:
        experiments.experiment_start(
            user=request.user,
            sandbox_id=sandbox.hex,
            experiment_id=experiment_id,
            prediction=raw,
        )
    except experiments.ExperimentNotFound as exc:
        raise Http404(str(exc)) from None
    except experiments.ExperimentError as exc:
        sandbox.refresh_from_db()
        context = experiments_context(
            user=request.user, sandbox=sandbox, form_for=experiment_id, value=raw, error=str(exc)
        )
        # htmx only swaps 2xx answers; a form posted without JavaScript gets 422.
        if request.htmx:
            return render(request, FRAGMENT, context)
        return render(request, PAGE, context, status=422)
    if not request.htmx:
        return redirect("labs:experiments", sandbox_id=sandbox.hex)
    return render(request, FRAGMENT, experiments_context(user=request.user, sandbox=sandbox))


@require_POST
@login_required
def experiment_cancel(request: AuthedHttpRequest, sandbox_id: str) -> HttpResponse:
    sandbox = selectors.sandbox_get_for_user(user=request.user, sandbox_id=sandbox_id)
    message = ""
    try:
        experiments.experiment_cancel(user=request.user, sandbox_id=sandbox.hex)
    except experiments.ExperimentError as exc:
        message = str(exc)
    if not request.htmx:
        return redirect("labs:experiments", sandbox_id=sandbox.hex)
    context = experiments_context(user=request.user, sandbox=sandbox, message=message)
    return render(request, FRAGMENT, context)
