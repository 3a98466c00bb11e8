from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import socket
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from apps.accounts.models import User
from apps.labs import services
from apps.labs.engine.base import Engine, EngineError, EngineUnavailable
from apps.labs.models import Fault, Node, Sandbox
from apps.labs.patterns import Control, load_pattern
from tests.conftest import queued, require
from tests.labs.engine.test_contract import wait_for

pytestmark = pytest.mark.django_db


def launch(user: User) -> Sandbox:
    sandbox = services.sandbox_launch(user=user, pattern_id="replicated-lb", enqueue=False)
    return services.sandbox_start(sandbox_id=sandbox.hex)


def node_state(engine: Engine, sandbox: Sandbox, name: str) -> dict:  # type: ignore[type-arg]
    return engine.control(sandbox.hex, name, {"op": "state"})


def answers(engine: Engine, sandbox: Sandbox, name: str) -> bool:
    try:
        return bool(node_state(engine, sandbox, name).get("ok"))
    except EngineError:
        return False


def test_launch_records_and_queues_then_starts(
    learner: User, local_engine: Engine, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    with django_capture_on_commit_callbacks() as callbacks:
        sandbox = services.sandbox_launch(user=learner, pattern_id="replicated-lb")
    assert sandbox.state == Sandbox.State.REQUESTED
    assert len(queued(callbacks)) == 1  # the launch task, queued once the row is committed

    sandbox = services.sandbox_start(sandbox_id=sandbox.hex)
    assert sandbox.state == Sandbox.State.RUNNING
    assert sandbox.engine == "local" and sandbox.launch_seconds is not None
    names = list(sandbox.nodes.values_list("name", flat=True))
    assert sorted(names) == ["lb", "replica-1", "replica-2", "replica-3", "traffic"]
    assert {s.state for s in local_engine.status(sandbox.hex)} == {"running"}

    # A redelivered launch changes nothing.
    again = services.sandbox_start(sandbox_id=sandbox.hex)
    assert again.state == Sandbox.State.RUNNING
    assert len(local_engine.status(sandbox.hex)) == 5


def test_a_learner_gets_one_sandbox_an_instructor_more(
    learner: User, instructor: User, local_engine: Engine, settings
) -> None:  # type: ignore[no-untyped-def]
    services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    with pytest.raises(services.QuotaExceeded, match="Stop one to launch another"):
        services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    for _ in range(settings.SANDBOX_PER_INSTRUCTOR):
        services.sandbox_launch(user=instructor, pattern_id="replicated-lb", enqueue=False)
    assert Sandbox.objects.filter(owner=instructor).count() == settings.SANDBOX_PER_INSTRUCTOR
    assert Sandbox.objects.filter(owner=learner).count() == 1


def test_the_global_cap_gives_an_estimate(learner: User, other_learner: User, settings) -> None:  # type: ignore[no-untyped-def]
    settings.SANDBOX_MAX_TOTAL = 1
    first = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    Sandbox.objects.filter(pk=first.pk).update(expires_at=timezone.now() + timedelta(minutes=7))
    with pytest.raises(services.QuotaExceeded) as excinfo:
        services.sandbox_launch(user=other_learner, pattern_id="replicated-lb", enqueue=False)
    assert "All 1 sandboxes" in str(excinfo.value) and "about 7 minute" in str(excinfo.value)
    assert Sandbox.objects.count() == 1


def test_an_unknown_pattern_is_refused(learner: User) -> None:
    with pytest.raises(services.SandboxError, match="no-such-pattern"):
        services.sandbox_launch(user=learner, pattern_id="no-such-pattern", enqueue=False)
    assert not Sandbox.objects.exists()


def test_transitions_are_enforced(learner: User) -> None:
    sandbox = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    with pytest.raises(services.InvalidTransition):
        services.sandbox_transition(sandbox=sandbox, to=Sandbox.State.RUNNING)
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.REQUESTED


@pytest.mark.parametrize(
    ("node", "kind", "duration", "params", "message"),
    [
        ("replica-9", "latency", 10, {}, "no node named 'replica-9'"),
        ("replica-1", "explode", 10, {}, "does not support the fault 'explode'"),
        ("replica-1", "latency", 10, {"ms": 999999}, "ms must be from 1 to 10000"),
        ("replica-1", "latency", 10, {"ms": "lots"}, "ms must be a number"),
        ("replica-1", "errors", 10, {"rate": 2}, "rate must be from 0.01 to 1.0"),
        ("replica-1", "errors", 10, {"status": 502}, "status must be 500 or 503"),
        ("replica-1", "latency", 10, {"colour": 1}, "takes no parameter 'colour'"),
        ("replica-1", "kill", 0, {}, "from 1 to 600"),
        ("replica-1", "kill", 3600, {}, "from 1 to 600"),
    ],
)
def test_bad_faults_are_refused_and_change_nothing(
    learner: User,
    local_engine: Engine,
    node: str,
    kind: str,
    duration: int,
    params: dict,
    message: str,  # type: ignore[type-arg]
) -> None:
    sandbox = launch(learner)
    with pytest.raises(services.SandboxError, match=message):
        services.fault_inject(
            sandbox=sandbox, node_name=node, kind=kind, duration=duration, params=params
        )
    assert not Fault.objects.exists()
    assert {s.state for s in local_engine.status(sandbox.hex)} == {"running"}
    assert node_state(local_engine, sandbox, "replica-1")["faults"] == {}


def test_faults_on_a_stopped_sandbox_are_refused(learner: User, local_engine: Engine) -> None:
    sandbox = launch(learner)
    services.sandbox_stop(sandbox=sandbox, enqueue=False)
    sandbox = services.sandbox_teardown(sandbox_id=sandbox.hex)
    with pytest.raises(services.SandboxError, match="stopped, not running"):
        services.fault_inject(sandbox=sandbox, node_name="lb", kind="kill", duration=5)
    assert not Fault.objects.exists()


def test_a_runtime_fault_is_applied_recorded_and_reverted(
    learner: User, local_engine: Engine, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    sandbox = launch(learner)
    with django_capture_on_commit_callbacks() as callbacks:
        fault = services.fault_inject(
            sandbox=sandbox, node_name="replica-1", kind="latency", duration=20, params={"ms": 250}
        )
    assert len(queued(callbacks)) == 1  # the revert, scheduled for when the duration is up
    assert fault.params == {"ms": 250, "jitter_ms": 0, "duration": 20}
    assert fault.expires_at is not None and fault.reverted_at is None
    assert "latency" in node_state(local_engine, sandbox, "replica-1")["faults"]

    services.fault_revert(fault_id=fault.pk)
    fault.refresh_from_db()
    assert fault.reverted_at is not None
    assert node_state(local_engine, sandbox, "replica-1")["faults"] == {}
    services.fault_revert(fault_id=fault.pk)  # twice: fine


def test_a_revert_the_engine_refuses_keeps_the_fault_active_until_a_retry_succeeds(
    learner: User, local_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed revert was once recorded as done: a node stayed partitioned with no fault
    shown. Now the fault stays active (listed, the node still cut off) until the engine
    has undone it; housekeeping retries it."""
    sandbox = launch(learner)
    fault = services.fault_inject(
        sandbox=sandbox, node_name="replica-1", kind="partition", duration=60, enqueue=False
    )
    heal = type(local_engine).heal

    def unavailable(self: Engine, sandbox_id: str, name: str) -> None:
        raise EngineUnavailable("The sandbox engine is not answering.")

    monkeypatch.setattr(type(local_engine), "heal", unavailable)
    with pytest.raises(EngineUnavailable):
        services.fault_revert(fault_id=fault.pk)
    fault.refresh_from_db()
    assert fault.reverted_at is None
    assert "partition" in node_state(local_engine, sandbox, "replica-1")["faults"]
    Fault.objects.filter(pk=fault.pk).update(expires_at=timezone.now())
    assert services.fault_revert_due() == []  # still refused: left for the next run

    monkeypatch.setattr(type(local_engine), "heal", heal)
    assert services.fault_revert_due() == [fault.pk]
    fault.refresh_from_db()
    assert fault.reverted_at is not None
    assert node_state(local_engine, sandbox, "replica-1")["faults"] == {}


def test_overlapping_faults_of_one_kind_revert_one_at_a_time(
    learner: User, local_engine: Engine
) -> None:
    """Two latency faults on one node: ending the newer one puts the older one's latency
    back (not none); two partitions: the node stays cut off until the last one ends."""
    sandbox = launch(learner)
    inject = functools.partial(services.fault_inject, sandbox=sandbox, enqueue=False)
    slow = inject(node_name="replica-1", kind="latency", duration=60, params={"ms": 100})
    slower = inject(node_name="replica-1", kind="latency", duration=30, params={"ms": 400})
    assert node_state(local_engine, sandbox, "replica-1")["faults"]["latency"]["ms"] == 400
    services.fault_revert(fault_id=slower.pk)
    assert node_state(local_engine, sandbox, "replica-1")["faults"]["latency"]["ms"] == 100
    services.fault_revert(fault_id=slow.pk)
    assert "latency" not in node_state(local_engine, sandbox, "replica-1")["faults"]

    first = inject(node_name="replica-2", kind="partition", duration=60)
    second = inject(node_name="replica-2", kind="partition", duration=30)
    services.fault_revert(fault_id=first.pk)
    assert "partition" in node_state(local_engine, sandbox, "replica-2")["faults"]
    services.fault_revert(fault_id=second.pk)
    assert "partition" not in node_state(local_engine, sandbox, "replica-2")["faults"]


def test_kill_is_reverted_by_a_restart(learner: User, local_engine: Engine) -> None:
    sandbox = launch(learner)
    fault = services.fault_inject(sandbox=sandbox, node_name="replica-2", kind="kill", duration=5)
    assert {s.name: s.state for s in local_engine.status(sandbox.hex)}["replica-2"] == "exited"
    Fault.objects.filter(pk=fault.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert services.fault_revert_due() == [fault.pk]
    wait_for(lambda: answers(local_engine, sandbox, "replica-2"), what="replica-2 restarted")


def test_stop_removes_every_node(
    learner: User, local_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apps.labs.services")
    sandbox = launch(learner)
    services.sandbox_stop(sandbox=sandbox, enqueue=False)
    sandbox = services.sandbox_teardown(sandbox_id=sandbox.hex)
    assert sandbox.state == Sandbox.State.STOPPED and sandbox.ended_at is not None
    assert local_engine.status(sandbox.hex) == []
    assert local_engine.list_sandboxes() == []
    # The console of `make run` says it, one line each.
    lines = [r.getMessage() for r in caplog.records if r.name == "apps.labs.services"]
    short = sandbox.hex[:8]
    assert any(f"sandbox {short} ({sandbox.pattern}, alice) running after" in t for t in lines)
    assert f"sandbox {short} ({sandbox.pattern}) stopped: {sandbox.stop_reason}" in lines


def test_expiry_and_idle_expiry_clean_up_fully(
    learner: User, instructor: User, local_engine: Engine
) -> None:
    old = launch(learner)
    idle = launch(instructor)
    Sandbox.objects.filter(pk=old.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    Sandbox.objects.filter(pk=idle.pk).update(last_seen_at=timezone.now() - timedelta(hours=1))
    report = services.sandbox_reap(enqueue=False)
    assert report.expired == (old.hex,) and report.idle == (idle.hex,)
    for sandbox in (old, idle):
        assert services.sandbox_teardown(sandbox_id=sandbox.hex).state == Sandbox.State.EXPIRED
    assert local_engine.list_sandboxes() == []


def test_reconcile_removes_orphans_and_fails_vanished_sandboxes(
    learner: User, instructor: User, local_engine: Engine
) -> None:
    orphan = launch(learner)
    Sandbox.objects.filter(pk=orphan.pk).delete()  # the platform forgot it (crash)
    vanished = launch(instructor)
    local_engine.destroy(vanished.hex)  # its nodes disappeared behind our back

    report = services.sandbox_reap(enqueue=False)

    assert orphan.hex in report.orphans_removed
    assert local_engine.list_sandboxes() == []
    vanished.refresh_from_db()
    assert vanished.state == Sandbox.State.FAILED and "disappeared" in vanished.error


@pytest.mark.django_db(transaction=True)
def test_two_users_launching_at_once_cannot_pass_the_global_quota(
    learner: User, other_learner: User, settings, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Both launches wait for each other just before counting (a barrier): without one
    lock for every launch both counted 0 of 1 and both got a sandbox."""
    require(connection.vendor == "postgresql", "PostgreSQL (row and advisory locks)")
    settings.SANDBOX_MAX_TOTAL = 1
    barrier = threading.Barrier(2, timeout=2)
    quota_for = services._quota_for

    def meeting(user: User) -> int:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()  # the other launch is held at the lock, if there is one
        return quota_for(user)

    monkeypatch.setattr(services, "_quota_for", meeting)
    outcomes: list[str] = []

    def launch_as(user: User) -> None:
        try:
            services.sandbox_launch(user=user, pattern_id="replicated-lb", enqueue=False)
            outcomes.append("launched")
        except services.QuotaExceeded:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=launch_as, args=(u,)) for u in (learner, other_learner)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["launched", "refused"]
    assert Sandbox.objects.count() == 1


def test_a_stop_whose_task_was_lost_is_finished_by_housekeeping(
    learner: User, instructor: User, local_engine: Engine
) -> None:
    """The stop task was lost after the nodes were removed: the sandbox said "stopping"
    forever and held the learner's quota. Housekeeping finishes it once it is overdue,
    and leaves a stop that is still under way to its task."""
    lost = launch(learner)
    services.sandbox_stop(sandbox=lost, enqueue=False)  # its task never runs
    local_engine.destroy(lost.hex)
    Sandbox.objects.filter(pk=lost.pk).update(
        stop_requested_at=timezone.now() - timedelta(minutes=10)
    )
    recent = launch(instructor)
    services.sandbox_stop(sandbox=recent, enqueue=False)
    local_engine.destroy(recent.hex)

    report = services.sandbox_reap(enqueue=False)
    assert report.stops_finished == (lost.hex,)
    lost.refresh_from_db()
    recent.refresh_from_db()
    assert lost.state == Sandbox.State.STOPPED and lost.ended_at is not None
    assert recent.state == Sandbox.State.STOPPING
    assert services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)


def test_a_launch_interrupted_after_the_engine_started_is_adopted(
    learner: User, local_engine: Engine, settings
) -> None:  # type: ignore[no-untyped-def]
    sandbox = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    # The worker got as far as creating the nodes, then died before recording them.
    services.sandbox_transition(sandbox=sandbox, to=Sandbox.State.STARTING)
    local_engine.create(services.sandbox_spec(sandbox=sandbox))
    Sandbox.objects.filter(pk=sandbox.pk).update(created_at=timezone.now() - timedelta(hours=1))

    report = services.sandbox_reap(enqueue=False)
    assert report.relaunched == (sandbox.hex,)
    sandbox = services.sandbox_start(sandbox_id=sandbox.hex)  # what the re-queued task runs
    assert sandbox.state == Sandbox.State.RUNNING
    assert len(local_engine.status(sandbox.hex)) == 5
    assert [i.sandbox_id for i in local_engine.list_sandboxes()] == [sandbox.hex]
    assert Node.objects.filter(sandbox=sandbox).count() == 5


def test_live_controls_and_scaling(learner: User, local_engine: Engine) -> None:
    sandbox = launch(learner)
    services.sandbox_control(sandbox=sandbox, control_id="policy", value="least-connections")
    assert node_state(local_engine, sandbox, "lb")["config"]["policy"] == "least-connections"
    with pytest.raises(services.SandboxError, match="policy"):
        services.sandbox_control(sandbox=sandbox, control_id="policy", value="fastest")
    with pytest.raises(services.SandboxError, match="no live control 'colour'"):
        services.sandbox_control(sandbox=sandbox, control_id="colour", value=1)

    services.sandbox_control(sandbox=sandbox, control_id="replicas", value=5)
    assert sandbox.nodes.filter(role="replica").count() == 5
    peers = node_state(local_engine, sandbox, "lb")["peers"]
    assert {p["name"] for p in peers if p["role"] == "replica"} == {
        f"replica-{i}" for i in range(1, 6)
    }
    services.sandbox_control(sandbox=sandbox, control_id="replicas", value=2)
    assert sorted(sandbox.nodes.filter(role="replica").values_list("name", flat=True)) == [
        "replica-1",
        "replica-2",
    ]
    assert len(local_engine.status(sandbox.hex)) == 4
    with pytest.raises(services.SandboxError, match="from 1 to 6"):
        services.sandbox_control(sandbox=sandbox, control_id="replicas", value=9)


def test_a_control_on_a_role_reaches_every_instance_new_and_restarted_ones_too(
    learner: User, local_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A control that names a replicated role sets its key on every instance; an instance
    that is down meanwhile, and one started later by scaling, get it when they come up."""
    real = load_pattern("replicated-lb")
    work = Control("work", "Replica work (ms)", "number", node="replica", key="work_ms",
                   min=0, max=10_000, default=5.0, replicated=True)  # fmt: skip
    pattern = dataclasses.replace(real, controls=(*real.controls, work))
    monkeypatch.setattr(services, "load_pattern", lambda _id: pattern)
    sandbox = launch(learner)
    services.fault_inject(sandbox=sandbox, node_name="replica-2", kind="kill", enqueue=False)

    services.sandbox_control(sandbox=sandbox, control_id="work", value=40)
    assert [
        node_state(local_engine, sandbox, f"replica-{i}")["config"]["work_ms"] for i in (1, 3)
    ] == [
        40,
        40,
    ]
    assert node_state(local_engine, sandbox, "lb")["config"].get("work_ms") is None
    services.fault_revert(fault_id=sandbox.faults.get().pk)
    assert node_state(local_engine, sandbox, "replica-2")["config"]["work_ms"] == 40
    services.sandbox_control(sandbox=sandbox, control_id="replicas", value=4)
    assert node_state(local_engine, sandbox, "replica-4")["config"]["work_ms"] == 40


def test_scaling_while_a_replica_is_killed_waits_only_for_the_new_ones(
    learner: User, local_engine: Engine
) -> None:
    sandbox = launch(learner)
    services.fault_inject(sandbox=sandbox, node_name="replica-1", kind="kill", enqueue=False)
    started = time.monotonic()
    services.sandbox_control(sandbox=sandbox, control_id="replicas", value=4)
    assert time.monotonic() - started < 15  # not the launch timeout (60 s)
    assert sandbox.nodes.filter(role="replica").count() == 4


def test_a_node_that_dies_at_start_fails_the_launch_at_once(
    learner: User, local_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """replica-3 is given a port something else already listens on: it cannot bind and
    exits, and the launch says so within seconds instead of waiting out the timeout."""
    from apps.labs.engine import local

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        draws = iter(range(100))
        real = local._free_port
        port = taken.getsockname()[1]
        monkeypatch.setattr(local, "_free_port", lambda: port if next(draws) == 2 else real())
        created = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
        started = time.monotonic()
        with pytest.raises(EngineError, match="node replica-3 stopped while starting"):
            services.sandbox_start(sandbox_id=created.hex)
    assert time.monotonic() - started < 15
    created.refresh_from_db()
    assert created.state == Sandbox.State.FAILED
    assert "replica-3 stopped while starting" in created.error
    assert local_engine.list_sandboxes() == []


def test_extend_adds_time_up_to_the_maximum(learner: User, local_engine: Engine, settings) -> None:  # type: ignore[no-untyped-def]
    sandbox = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    before = sandbox.expires_at
    sandbox = services.sandbox_extend(sandbox=sandbox)
    assert sandbox.expires_at == before + timedelta(minutes=settings.SANDBOX_EXTEND_MINUTES)
    for _ in range(20):
        sandbox = services.sandbox_extend(sandbox=sandbox)
    assert sandbox.expires_at == sandbox.created_at + timedelta(
        minutes=settings.SANDBOX_MAX_LIFETIME_MINUTES
    )
