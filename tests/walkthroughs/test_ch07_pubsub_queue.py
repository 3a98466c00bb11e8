"""Chapter 7, "Try it in the sandbox": competing workers share the work queue while the
auditor gets a copy of every order; a worker killed mid-order gets its order redelivered
after the visibility timeout (a duplicate skipped, or charged twice without
deduplication); paused workers build a backlog that drains at the spare capacity; a
bounded queue pushes back on the producer; a cut-off auditor backs up only audit; poison
messages are dead-lettered; work slower than the visibility timeout looks like a dead
worker; acknowledging first loses the order. Then the pattern's three experiments.

Shortened for CI: faults last a few seconds instead of 30 or 60, the visibility timeout
is 3 s, the maximum depth 30 instead of 500 and the malformed share 20% instead of 5%, so
that each effect shows within seconds. Tolerances: rates and depths within a factor
that leaves room for a loaded machine; who gets what, exactly.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import Celery

from apps.accounts.models import User
from apps.labs.experiments import judge, pattern_values
from apps.labs.patterns import load_pattern
from tests.walkthroughs.lab import Lab

pytestmark = pytest.mark.django_db(transaction=True)

WORKERS = ("worker-1", "worker-2", "worker-3")


def test_chapter_7_walkthrough_and_experiments(
    walk_engine: str, learner: User, embedded_celery: Celery
) -> None:
    with Lab(learner, "pubsub-queue") as lab:
        walk(lab)
        experiments(lab)


def gauge_now(lab: Lab, node: str, gauge: str) -> float:
    """What the lab shows beside the node now."""
    nodes = (lab.snapshot().get("frame") or {}).get("nodes") or {}
    value = ((nodes.get(node) or {}).get("gauges") or {}).get(gauge)
    return float(value) if isinstance(value, int | float) else 0.0


def wait_gauge(lab: Lab, node: str, gauge: str, ok: Any, timeout: float = 10) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = gauge_now(lab, node, gauge)
        if ok(value):
            return value
        assert time.monotonic() < deadline, f"{node}'s {gauge} stayed at {value}"
        time.sleep(0.2)


def walk(lab: Lab) -> None:
    # 1. The depths of work and audit stay near zero while the workers share the orders.
    calm = lab.watch(3, settle=0.5)
    users = calm.users()
    assert 7 <= users.rps <= 13 and users.errors == 0, users
    assert max(calm.gauge("broker", "work_depth")) <= 5
    assert max(calm.gauge("broker", "audit_depth")) <= 20  # the auditor takes 20 at a time
    for worker in WORKERS:
        assert calm.link(worker, "broker").n > 0, worker  # every worker takes some

    # 2. worker-2 killed mid-order: after the visibility timeout another worker gets it
    # (and skips it: already charged). Deduplication off, worker-3 killed: charged twice.
    lab.control("visibility", 3)
    lab.control("work_ms", 1500)  # always mid-order: 3 a second for 2 a second of capacity
    lab.control("rps", 3)
    time.sleep(1.5)  # the workers are busy with orders taken at 1.5 s each
    killed = time.time()
    kill_2 = lab.fault("worker-2", "kill", duration=60)
    again = lab.wait_event("redelivered", killed, timeout=8, node="broker")
    assert again["data"]["previous"] == "worker-2 (not acknowledged in time)", again
    assert again["data"]["consumer"] != "worker-2"
    assert 2.5 <= again["data"]["after_s"] <= 6, again  # the 3-s timeout (+ a free worker)
    lab.wait_event("duplicate_skipped", killed, order=again["data"]["order"])
    lab.control("dedupe", False)
    killed = time.time()
    kill_3 = lab.fault("worker-3", "kill", duration=60)
    again = lab.wait_event("redelivered", killed, timeout=8, node="broker")
    assert again["data"]["previous"] == "worker-3 (not acknowledged in time)", again
    effect = lab.wait_event("duplicate_effect", killed, order=again["data"]["order"])
    assert "charged 2 times" in effect["text"]
    lab.revert(kill_2)
    lab.revert(kill_3)
    lab.control("dedupe", True)
    lab.control("work_ms", 100)
    lab.control("rps", 10)
    lab.control("visibility", 5)
    lab.wait_until_up("worker-2")
    lab.wait_until_up("worker-3")
    wait_gauge(lab, "broker", "work_depth", lambda d: d <= 5, timeout=15)

    # 3. All three paused: publishing goes on (no errors, no extra latency), audit stays
    # near zero, work climbs by about 10 a second.
    pauses = [lab.fault(worker, "pause") for worker in WORKERS]
    backlog = lab.watch(3, settle=0.5)
    users = backlog.users()
    assert users.errors == 0 and (users.p99_ms or 0) < 100, users
    assert max(backlog.gauge("broker", "audit_depth")) <= 20
    depth = backlog.gauge("broker", "work_depth")
    rise = (depth[-1] - depth[0]) / (len(depth) - 1)
    assert 7 <= rise <= 13, depth

    # 4. (Before they resume.) A maximum depth below the backlog: the producer's publishes
    # fail at once (503): back-pressure.
    lab.control("max_depth", 30)
    wait_gauge(lab, "broker", "work_depth", lambda d: d >= 30)
    full = lab.watch(1, settle=0.3)
    publish = full.link("producer", "broker")
    assert publish.error_pct >= 80 and (publish.p50_ms or 0) < 100, publish

    # 3, continued: the workers resume and the backlog drains at the spare capacity:
    # about 30 served a second, 10 arriving.
    lab.control("max_depth", 10000)
    for pause in pauses:
        lab.revert(pause)
    resumed, left = time.monotonic(), gauge_now(lab, "broker", "work_depth")
    wait_gauge(lab, "broker", "work_depth", lambda d: d <= 5, timeout=15)
    drained = time.monotonic() - resumed
    assert drained <= 3 * left / 20 + 2, (left, drained)  # backlog / (30 - 10), roughly

    # 5. The auditor partitioned: only audit backs up; the workers carry on.
    cut_at = time.time()
    cut = lab.fault("auditor", "partition")
    wait_gauge(lab, "broker", "audit_depth", lambda d: d >= 25)  # 10 a second pile up
    stuck = lab.between(cut_at, time.time())
    assert max(stuck.gauge("broker", "work_depth")) <= 5
    assert stuck.users().errors == 0
    lab.revert(cut)

    # 6. Malformed orders: each comes back until the maximum receives (3), then lands in
    # the dead-letter queue; everything else flows.
    mark = time.time()
    lab.control("malformed_pct", 20)
    dead = lab.wait_event("dead_lettered", mark, node="broker")
    assert dead["data"]["receives"] == 3 and dead["data"]["subscription"] == "work"
    poisoned = lab.watch(1, settle=0)
    assert poisoned.users().errors == 0
    assert max(poisoned.gauge("broker", "dead_letter_depth")) >= 1
    assert max(poisoned.gauge("broker", "work_depth")) <= 5
    lab.control("malformed_pct", 0)

    # 7. work_ms above the visibility timeout: redeliveries with no fault at all.
    lab.control("visibility", 2)
    lab.control("rps", 2)
    mark = time.time()
    lab.control("work_ms", 2500)
    slow = lab.wait_event("redelivered", mark, timeout=8, node="broker")
    assert "not acknowledged in time" in slow["data"]["previous"]
    lab.wait_event("duplicate_skipped", mark)  # the first worker had charged it
    lab.control("work_ms", 100)
    lab.control("visibility", 5)

    # 8. Acknowledge before processing, kill a worker mid-order: no redelivery, and the
    # audit count ends ahead of the orders the workers completed.
    lab.control("ack", "before processing")
    lab.control("work_ms", 2000)
    lab.control("rps", 1)
    time.sleep(2.5)  # orders taken before the switch are done
    wait_gauge(lab, "worker-1", "holding", lambda h: h == 1)
    killed = time.time()
    kill_1 = lab.fault("worker-1", "kill", duration=60)
    lab.control("rps", 0)
    wait_gauge(lab, "broker", "work_in_flight", lambda n: n == 0, timeout=12)
    settled = lab.between(killed, time.time())
    back = [t for t in settled.texts("redelivered") if "worker-1" in t]
    assert back == [], back
    audited = wait_gauge(lab, "auditor", "audited", lambda n: n > 0)
    completed = gauge_now(lab, "broker", "orders_completed")
    assert audited - completed >= 1, (audited, completed)
    lab.revert(kill_1)
    lab.control("ack", "after processing")
    lab.control("work_ms", 100)
    lab.control("rps", 10)
    lab.wait_until_up("worker-1")


def experiments(lab: Lab) -> None:
    # The killed worker's order comes back after the visibility timeout, to another worker.
    run = lab.experiment("kill-mid-message", "lost")
    assert run.correct is False, run.measured
    assert 2.5 <= run.measured["first"] <= 7, run.measured
    verdicts = lab.verdicts(run)
    assert verdicts["after-timeout"].correct and not verdicts["at-once"].correct

    # The backlog drains at the spare capacity: seconds, not the pause's length again.
    run = lab.experiment("backlog-drain", 60)
    assert run.correct is False, run.measured
    assert run.measured["reached"] == 1 and run.measured["until_s"] <= 7, run.measured
    experiment = load_pattern("pubsub-queue").experiment("backlog-drain")
    assert experiment is not None
    values = pattern_values("pubsub-queue")
    measured = run.measured["until_s"]
    assert judge(experiment, round(measured) + 2, run.measured, values).correct  # close
    assert not judge(experiment, measured + 4, run.measured, values).correct

    # A paused auditor backs up audit only: work's depth stays near zero.
    run = lab.experiment("slow-subscriber", "both")
    assert run.correct is False and run.measured["max"] < 15, run.measured
    verdicts = lab.verdicts(run)
    assert verdicts["audit-only"].correct
    assert f"stayed at {run.measured['max']:.0f} or below" in run.explanation
