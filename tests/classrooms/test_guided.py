"""Guided class experiments: an instructor asks the class to run one of a chapter's
experiments; each learner's panel marks it; the results count each learner's first
prediction against what their sandbox measured."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.exceptions import PermissionDenied
from django.urls import reverse
from django.utils import timezone

from apps.accounts.models import User
from apps.classrooms.guided import (
    ClassExperimentError,
    class_experiment_close,
    class_experiment_results,
    class_experiment_start,
)
from apps.classrooms.models import ClassExperiment, Classroom, Membership
from apps.labs.models import ExperimentRun, Sandbox
from apps.labs.supervisor import group_name
from tests.classrooms.test_drills import running_sandbox
from tests.conftest import client_for, make_user

pytestmark = pytest.mark.django_db

PATTERN, EXPERIMENT = "replicated-lb", "kill-replica"


def ask(classroom: Classroom, by: User, **changes: Any) -> ClassExperiment:
    fields = {"pattern": PATTERN, "experiment": EXPERIMENT, "minutes": 10} | changes
    return class_experiment_start(classroom=classroom, by=by, **fields)[0]


def run(user: User, prediction: str, *, ago_s: float = 0, **fields: Any) -> ExperimentRun:
    return ExperimentRun.objects.create(
        user=user, pattern=PATTERN, experiment=EXPERIMENT, prediction=prediction,
        started_at=timezone.now() - timedelta(seconds=ago_s), **fields,
    )  # fmt: skip


def checked(errors: float, error_s: float) -> dict[str, Any]:
    measured = {"errors": errors, "error_s": error_s, "calls": 100, "error_pct": errors,
                "ongoing": 0}  # fmt: skip
    return {"state": ExperimentRun.State.CHECKED, "measured": measured}


def test_only_the_class_instructors_may_ask_and_bad_asks_are_refused(
    classroom: Classroom, instructor: User, other_instructor: User, learner: User, staff: User
) -> None:
    for who in (other_instructor, learner, staff):
        with pytest.raises(PermissionDenied):
            ask(classroom, who)
    with pytest.raises(ClassExperimentError, match="replicated-lb has no experiment 'nope'"):
        ask(classroom, instructor, experiment="nope")
    with pytest.raises(ClassExperimentError, match="No sandbox pattern 'nope'"):
        ask(classroom, instructor, pattern="nope")
    with pytest.raises(ClassExperimentError, match="from 1 to 60"):
        ask(classroom, instructor, minutes=0)
    assert not ClassExperiment.objects.exists()


def test_the_ask_reaches_each_running_sandbox_of_the_class_and_its_panel(
    classroom: Classroom, other_classroom: Classroom, instructor: User, learner: User,
    other_learner: User,
) -> None:  # fmt: skip
    mine, theirs = running_sandbox(learner), running_sandbox(other_learner)
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(group_name(mine.hex), channel)
    ask(classroom, instructor)
    told = async_to_sync(layer.receive)(channel)["data"]
    assert told["kind"] == "class-experiment"
    assert "carol asks the class to run “Kill a replica" in told["text"]

    panel = client_for(learner).get(reverse("labs:experiments", args=[mine.hex])).content.decode()
    assert 'data-testid="class-ask-kill-replica"' in panel and "asked by your class" in panel
    assert "asks Class A to run" in panel
    # Another class's learner is not asked; nor is this one once it is closed.
    other = client_for(other_learner).get(reverse("labs:experiments", args=[theirs.hex]))
    assert "asked by your class" not in other.content.decode()
    class_experiment_close(ask=ClassExperiment.objects.get(), by=instructor)
    panel = client_for(learner).get(reverse("labs:experiments", args=[mine.hex])).content.decode()
    assert "asked by your class" not in panel


def test_results_count_each_learners_first_prediction_against_their_sandbox(
    classroom: Classroom, instructor: User, learner: User
) -> None:
    carl, dana, erin = (make_user(n) for n in ("carl", "dana", "erin"))
    for user in (carl, dana, erin):
        Membership.objects.create(classroom=classroom, user=user)
    run(learner, "3-8s", ago_s=60, **checked(0, 0))  # before the ask: not counted
    the_ask = ask(classroom, instructor)
    run(learner, "under-3s", correct=True, **checked(5, 1.2))
    run(learner, "none", correct=True, **checked(0, 0))  # a second try: not counted
    run(carl, "none", correct=False, **checked(5, 2.0))
    run(dana, "none", state=ExperimentRun.State.CANCELLED)  # cancelled: her next run counts
    run(dana, "3-8s")  # still running

    r = class_experiment_results(ask=the_ask)
    assert (r.predicted, r.checked, r.right, r.pending) == (3, 2, 1, 1)
    counts = {o.label: (o.predicted, o.right, o.happened) for o in r.options}
    assert counts == {
        "Not at all: the balancer hides the crash": (1, 0, 0),
        "Less than 3 seconds": (1, 1, 2),  # both checked sandboxes saw under 3 s of errors
        "From 3 to 8 seconds": (1, 0, 0),
        "Until replica-2 is back (8 seconds or more)": (0, 0, 0),
    }
    rows = {row.learner.username: row for row in r.learners}
    assert rows["erin"].run is None
    assert (rows["carl"].prediction, rows["carl"].measured, rows["carl"].correct) == (
        "Not at all: the balancer hides the crash", "Less than 3 seconds", False,
    )  # fmt: skip

    page = client_for(instructor).get(
        reverse("classrooms:class_experiment", args=[classroom.pk, the_ask.pk])
    )
    html = page.content.decode()
    assert page.status_code == 200
    assert "<strong>3</strong> of 4 learners predicted, 1 still running" in html
    assert "1 predicted · 1 right · happened in 2 sandboxes" in html
    assert 'hx-trigger="every 2s"' in html  # open: it keeps itself up to date


def test_a_new_ask_closes_the_open_one_of_the_same_chapter(
    classroom: Classroom, instructor: User
) -> None:
    first = ask(classroom, instructor)
    second = ask(classroom, instructor, experiment="slow-replica-policy")
    first.refresh_from_db()
    assert not first.is_open and second.is_open


def test_the_pages_are_the_class_instructors_and_the_form_explains_refusals(
    classroom: Classroom, instructor: User, other_instructor: User, learner: User, staff: User
) -> None:
    url = reverse("classrooms:class_experiments", args=[classroom.pk])
    for who, status in ((learner, 404), (other_instructor, 404), (staff, 200), (instructor, 200)):
        assert client_for(who).get(url).status_code == status, who
    assert client_for(staff).post(url, {"experiment": f"{PATTERN}:{EXPERIMENT}",
                                        "minutes": "5"}).status_code == 403  # fmt: skip
    bad = client_for(instructor).post(
        url, {"experiment": f"{PATTERN}:{EXPERIMENT}", "minutes": "x"}
    )
    assert bad.status_code == 422 and "must be a whole number" in bad.content.decode()
    teacher = client_for(instructor)
    ok = teacher.post(url, {"experiment": f"{PATTERN}:{EXPERIMENT}", "minutes": "5"})
    the_ask = ClassExperiment.objects.get()
    assert ok.status_code == 302 and ok["Location"].endswith(f"/experiments/{the_ask.pk}/")
    said = teacher.get(ok["Location"]).content.decode()
    assert "Asked the class to run “Kill a replica" in said  # its title, as learners read it
    detail = reverse("classrooms:class_experiment", args=[classroom.pk, the_ask.pk])
    assert client_for(other_instructor).get(detail).status_code == 404
    close = reverse("classrooms:class_experiment_close", args=[classroom.pk, the_ask.pk])
    assert client_for(learner).post(close).status_code == 404
    assert client_for(instructor).post(close).status_code == 302
    the_ask.refresh_from_db()
    assert not the_ask.is_open
    page = client_for(instructor).get(url).content.decode()
    assert "Kill a replica" in page and "closed" in page
    assert Sandbox.objects.count() == 0
