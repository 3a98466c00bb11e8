"""Class-wide chaos drills: who may run one, what is refused and why, and a drill on
three learners' real sandboxes (local engine): every one gets the fault, every one
recovers, and the record holds what each sandbox's telemetry measured."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery import Celery
from django.core.exceptions import PermissionDenied
from django.urls import reverse
from django.utils import timezone

from apps.accounts.models import User
from apps.classrooms import drills
from apps.classrooms.drills import DrillError, drill_start
from apps.classrooms.models import Classroom, Drill, DrillTarget, Membership
from apps.labs import services
from apps.labs.engine.base import Engine
from apps.labs.models import Fault, Sandbox
from apps.labs.supervisor import Supervisor
from tests.conftest import client_for, make_user, require
from tests.labs.engine.test_contract import wait_for
from tests.labs.test_experiments import history_points, supervised, unlocked  # noqa: F401 (supervised: a fixture)


def running_sandbox(owner: User, pattern: str = "replicated-lb") -> Sandbox:
    """A sandbox record in the running state (no processes: for the checks)."""
    now = timezone.now()
    return Sandbox.objects.create(
        owner=owner, pattern=pattern, state=Sandbox.State.RUNNING,
        expires_at=now + timedelta(minutes=30), last_seen_at=now,
    )  # fmt: skip


def start(classroom: Classroom, by: User, **changes: object) -> Drill:
    fields: dict[str, object] = {"pattern": "replicated-lb", "node": "replica-2", "kind": "kill",
                                 "duration": 30, "enqueue": False} | changes  # fmt: skip
    return drill_start(classroom=classroom, by=by, **fields)  # type: ignore[arg-type]


@pytest.mark.django_db
def test_only_the_class_instructors_may_run_one(
    classroom: Classroom, instructor: User, other_instructor: User, learner: User, staff: User
) -> None:
    running_sandbox(learner)
    for who in (other_instructor, learner, staff):
        with pytest.raises(PermissionDenied):
            start(classroom, who)
    drill = start(classroom, instructor)
    assert [t.learner for t in drill.targets.all()] == [learner]


@pytest.mark.django_db
def test_it_touches_only_this_class_running_sandboxes_of_the_pattern(
    classroom: Classroom, other_classroom: Classroom, instructor: User, learner: User,
    other_learner: User,
) -> None:  # fmt: skip
    carl = make_user("carl")
    Membership.objects.create(classroom=classroom, user=carl)
    mine = running_sandbox(learner)
    running_sandbox(other_learner)  # another class's
    running_sandbox(carl, "sharded-kv")  # another pattern
    stopped = running_sandbox(carl)
    stopped.state = Sandbox.State.STOPPED
    stopped.save()
    drill = start(classroom, instructor)
    assert [t.sandbox for t in drill.targets.all()] == [mine]
    # Selected learners only: carl has no running replicated-lb sandbox.
    with pytest.raises(DrillError, match="No learner of this classroom you chose has a running"):
        start(classroom, instructor, learner_ids=[carl.pk])


@pytest.mark.django_db
def test_bad_drills_are_refused_with_a_reason(
    classroom: Classroom, instructor: User, learner: User
) -> None:
    running_sandbox(learner)
    cases = {
        "replicated-lb has no node 'replica-9'; it has replica-1, replica-2, replica-3, lb": {
            "node": "replica-9"
        },
        "No sandbox pattern 'nope'": {"pattern": "nope"},
        "does not support 'fire' faults": {"kind": "fire"},
        "The duration must be a whole number of seconds from 1 to 600": {"duration": 0},
        "ms must be from 1 to 10000": {"kind": "latency", "params": {"ms": 99999}},
    }
    for message, changes in cases.items():
        with pytest.raises(DrillError, match=message):
            start(classroom, instructor, **changes)
    assert not Drill.objects.exists()


@pytest.mark.django_db
def test_at_most_a_few_drills_a_minute(
    classroom: Classroom, instructor: User, learner: User
) -> None:
    running_sandbox(learner)
    for _ in range(drills.DRILLS_PER_MINUTE):
        start(classroom, instructor)
    with pytest.raises(DrillError, match="At most 3 drills a minute"):
        start(classroom, instructor)
    Drill.objects.update(created_at=timezone.now() - timedelta(minutes=2))
    start(classroom, instructor)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("level", "get", "post"),
    [("anonymous", 302, 302), ("learner", 404, 404), ("class instructor", 200, 302),
     ("other instructor", 404, 404), ("staff", 200, 403)],
)  # fmt: skip
def test_the_drills_page_answers_by_permission_level(
    level: str, get: int, post: int, request: pytest.FixtureRequest, classroom: Classroom,
    other_classroom: Classroom, learner: User,
) -> None:  # fmt: skip
    from tests.classrooms.test_views import _level_client

    running_sandbox(learner)
    client = _level_client(level, request)
    url = reverse("classrooms:drills", args=[classroom.pk])
    assert client.get(url).status_code == get
    form = {"target": "replicated-lb:replica-2", "kind": "kill", "duration": "30"}
    assert client.post(url, form).status_code == post
    assert Drill.objects.count() == (1 if level == "class instructor" else 0)


@pytest.mark.django_db
def test_the_form_explains_bad_data_and_keeps_it(
    classroom: Classroom, instructor: User, learner: User, course: list[object]
) -> None:
    url = reverse("classrooms:drills", args=[classroom.pk])
    client = client_for(instructor)
    response = client.post(
        url, {"target": "replicated-lb:replica-2", "kind": "kill", "duration": "soon"}
    )
    assert response.status_code == 422
    assert "The duration must be a whole number, got &#x27;soon&#x27;." in response.content.decode()
    response = client.post(
        url, {"target": "replicated-lb:replica-2", "kind": "kill", "duration": "30"}
    )
    assert response.status_code == 422  # nobody has that sandbox running
    html = response.content.decode()
    assert "has a running replicated-lb sandbox" in html
    assert '<option value="replicated-lb:replica-2" selected>' in html


# ---- on real sandboxes ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_drill_breaks_every_learners_sandbox_and_each_recovers(
    instructor: User, local_engine: Engine, embedded_celery: Celery, supervised: Supervisor,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from django.db import connection

    from apps.classrooms.services import classroom_create

    # Eight injecting threads and the worker's write at once: SQLite's shared in-memory
    # test database refuses concurrent writers outright ("table is locked"); PostgreSQL,
    # what a classroom server runs, takes them.
    require(connection.vendor == "postgresql", "PostgreSQL (concurrent writers)")
    monkeypatch.setattr(drills, "SETTLE_S", 2)
    classroom = classroom_create(owner=instructor, name="Drill class")
    sandboxes = []
    for name in ("ana", "ben", "cat"):
        user = make_user(name)
        Membership.objects.create(classroom=classroom, user=user)
        created = services.sandbox_launch(user=user, pattern_id="replicated-lb", enqueue=False)
        sandboxes.append(services.sandbox_start(sandbox_id=created.hex))
    for sandbox in sandboxes:
        wait_for(
            lambda s=sandbox: sum(p["totals"].get("n", 0) for p in history_points(s)[-3:]) > 20,
            timeout=20,
            what="traffic in the stored telemetry history",
        )

    drill = drill_start(classroom=classroom, by=instructor, pattern="replicated-lb",
                        node="replica-2", kind="kill", duration=3)  # fmt: skip
    injected = wait_for(
        unlocked(lambda: Fault.objects.filter(kind="kill").count() == 3), timeout=10,
        what="the kill in all three sandboxes",
    )  # fmt: skip
    assert injected
    for sandbox in sandboxes:
        states = {s.name: s.state for s in local_engine.status(sandbox.hex)}
        assert states["replica-2"] != "running", states  # killed in every one

    measured = wait_for(
        unlocked(lambda: Drill.objects.get(pk=drill.pk).measured_at), timeout=40,
        what="the drill's measurements",
    )  # fmt: skip
    assert measured
    assert wait_for(  # reverted on its own
        unlocked(lambda: not Fault.objects.filter(reverted_at__isnull=True).exists()),
        timeout=20, what="every fault reverted",
    )  # fmt: skip
    for target in DrillTarget.objects.filter(drill=drill):
        assert target.fault is not None and target.error == "", target.error
        assert target.measured["calls"] > 50, target.measured  # 20 requests/s over 5 s
        assert 0 <= target.measured["error_s"] < 3, target.measured  # ejected quickly
        assert target.measured["error_pct"] < 20, target.measured
    for sandbox in sandboxes:  # all recover
        wait_for(lambda s=sandbox: all(n.state == "running" for n in local_engine.status(s.hex)),
                 timeout=20, what="replica-2 back")  # fmt: skip
