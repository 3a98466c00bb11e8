"""Chapter 1, "Try it in the sandbox": your first faults on the smallest distributed
system, step by step through the platform's services, asserting what the lab shows
against the chapter's text; then the pattern's two experiments on the same sandbox."""

from __future__ import annotations

import time

import pytest
from celery import Celery

from apps.accounts.models import User
from tests.walkthroughs.lab import Lab

pytestmark = pytest.mark.django_db(transaction=True)


def test_chapter_1_walkthrough_and_experiments(
    walk_engine: str, learner: User, embedded_celery: Celery
) -> None:
    with Lab(learner, "hello-cluster") as lab:
        walk(lab, walk_engine)
        experiments(lab)


def walk(lab: Lab, walk_engine: str) -> None:
    # 1. About 20 requests/s on every link: front calls both for every request.
    calm = lab.watch(4)
    for src, dst in (("traffic", "front"), ("front", "profile"), ("front", "greeting")):
        assert 15 <= calm.link(src, dst).rps <= 25, (src, dst, calm.link(src, dst))
    base = calm.users()
    assert base.p50_ms is not None and base.p50_ms < 100, base

    # 2. 200 ms on profile: front's p50 and p99 rise by about 200 ms; greeting is not
    # affected. They fall back when the fault reverts.
    slow = lab.fault("profile", "latency", ms=200)
    slowed = lab.watch(4)
    rise = (slowed.users().p50_ms or 0) - base.p50_ms
    assert 170 <= rise <= 280, (slowed.users(), base)
    assert (slowed.users().p99_ms or 0) >= 200, slowed.users()
    greeting = slowed.link("front", "greeting").p50_ms or 0
    assert greeting <= (calm.link("front", "greeting").p50_ms or 0) + 20, slowed.link(
        "front", "greeting"
    )
    lab.revert(slow)
    assert (lab.watch(3).users().p50_ms or 0) < base.p50_ms + 50

    # 3. 10% errors on greeting: about 10% of front's requests fail; 10% on profile too:
    # about 19% (0.9 x 0.9 = 0.81 succeed). 50 requests/s, for enough samples.
    lab.control("rps", 50)
    one = lab.fault("greeting", "errors", rate=0.1, status=500)
    single = lab.watch(8)
    assert 5 <= single.users().error_pct <= 15, single.users()
    two = lab.fault("profile", "errors", rate=0.1, status=500)
    double = lab.watch(8)
    assert 13 <= double.users().error_pct <= 26, double.users()
    lab.revert(one)
    lab.revert(two)
    lab.control("rps", 20)

    # 4. Kill greeting: front runs, yet every request fails; the kill and the restart are
    # in the event log.
    killed_at = time.time()
    kill = lab.fault("greeting", "kill")
    assert lab.wait_event("down", killed_at, node="greeting")
    dead = lab.watch(3)
    assert dead.users().error_pct == 100 and dead.node("front").n > 0, dead.users()
    assert (dead.users().p99_ms or 0) < 300, dead.users()  # refused at once: fast errors
    back_at = time.time()
    lab.revert(kill)
    assert lab.wait_event("up", back_at, timeout=20, node="greeting")
    lab.wait_until_up("greeting")

    # 5. Pause profile: each request waits front's full second, p99 near 1 s, about 20
    # calls waiting on profile.
    pause = lab.fault("profile", "pause")
    frozen = lab.watch(4)
    assert frozen.users().error_pct >= 95, frozen.users()
    assert 900 <= (frozen.users().p50_ms or 0) <= 1300, frozen.users()
    assert 900 <= (frozen.users().p99_ms or 0) <= 1400, frozen.users()
    waiting = frozen.gauge("front", "profile_in_flight")
    assert 14 <= max(waiting) <= 26, waiting
    lab.revert(pause)
    lab.wait_until_up("profile")

    # 6. Partition greeting: every request fails (fast with local processes, whose cut
    # closes connections at once; after front's timeout on Docker, where the node is
    # disconnected). Then 50% drop on profile: about half fail, all slowly.
    cut = lab.fault("greeting", "partition")
    parted = lab.watch(3)
    assert parted.users().error_pct >= 95, parted.users()
    if walk_engine == "local":
        assert (parted.users().p50_ms or 0) < 300, parted.users()
    else:
        assert (parted.users().p50_ms or 0) >= 900, parted.users()
    lab.revert(cut)
    lab.wait_until_up("greeting")
    drop = lab.fault("profile", "drop", rate=0.5)
    dropped = lab.watch(8)
    assert 35 <= dropped.users().error_pct <= 65, dropped.users()
    assert (dropped.users().p99_ms or 0) >= 900, dropped.users()  # the failures are slow
    lab.revert(drop)


def experiments(lab: Lab) -> None:
    run = lab.experiment("slow-or-dead", "slow-succeeds")
    assert run.measured["slow_error_pct"] >= 90 and run.measured["dead_error_pct"] >= 90
    verdicts = lab.verdicts(run)
    assert verdicts["cannot-tell"].correct and not verdicts["slow-succeeds"].correct
    assert run.correct is False and "cannot know" in run.explanation

    run = lab.experiment("slow-minority", "tail")
    assert run.correct is True, run.measured
    assert run.measured["stuck_p50_ms"] < 100 <= 900 <= run.measured["stuck_p99_ms"]
    assert not lab.verdicts(run)["neither"].correct
