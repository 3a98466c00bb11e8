"""Chapter 5, "Try it in the sandbox": the replicated load-balanced service, step by step,
through the platform's services, asserting what the lab shows against the chapter's text."""

from __future__ import annotations

import time

import pytest

from apps.accounts.models import User
from tests.walkthroughs.lab import Lab

pytestmark = pytest.mark.django_db(transaction=True)
REPLICAS = ["replica-1", "replica-2", "replica-3"]


def test_chapter_5_walkthrough(walk_engine: str, learner: User) -> None:
    with Lab(learner, "replicated-lb") as lab:
        walk(lab)


def walk(lab: Lab) -> None:
    # 1. Launch; round robin gives each replica about a third of the traffic.
    calm = lab.watch(4)
    traffic = calm.node("traffic").rps
    assert 15 <= traffic <= 25, traffic  # the spec's 20 requests/s
    for name in REPLICAS:
        share = calm.node(name).rps / traffic
        assert 0.25 <= share <= 0.42, (name, share)  # "about a third"

    # 2. Kill replica-2: errors on traffic → lb rise, then fall back to zero; the ejection
    # comes within one interval + the check's timeout (1 + 0.5 s) of the kill.
    killed_at = time.time()
    kill = lab.fault("replica-2", "kill")
    ejected = lab.wait_event("ejected", killed_at, timeout=5)
    assert "replica-2" in ejected["text"]
    assert ejected["ts"] - killed_at <= 2.5, ejected["ts"] - killed_at
    after = lab.watch(3)
    assert after.link("traffic", "lb").errors == 0  # back to zero once ejected

    # 3. The revert brings it back (re-admitted); a pause instead shows as latency first.
    revert_at = time.time()
    lab.revert(kill)
    readmitted = lab.wait_event("readmitted", revert_at, timeout=20)
    assert "replica-2" in readmitted["text"]
    pause = lab.fault("replica-2", "pause")
    paused = lab.watch(2, settle=0)
    assert (paused.users().p99_ms or 0) >= 900, paused.users()  # the balancer's 1 s timeout
    lab.revert(pause)
    lab.wait_event("readmitted", time.time() - 1, timeout=20)

    # 4. Latency on replica-3: round robin's p99 climbs and replica-3's in-flight grows;
    # least-connections sends it half as much or less, yet p99 stays slow (more than 1 % of
    # the requests still go to replica-3).
    slow = lab.fault("replica-3", "latency", ms=300)
    rr = lab.watch(5)
    assert (rr.users().p99_ms or 0) >= 300, rr.users()
    assert (rr.node("replica-3").in_flight or 0) >= 1.0, rr.node("replica-3")
    lab.control("policy", "least-connections")
    lc = lab.watch(5)
    assert lc.node("replica-3").rps <= 0.5 * rr.node("replica-3").rps, (
        lc.node("replica-3"), rr.node("replica-3"))  # fmt: skip
    assert (lc.users().p99_ms or 0) >= 300, lc.users()
    lab.control("policy", "round-robin")
    lab.revert(slow)

    # 5. Scale to 6: the new replicas take their share; a kill now costs a sixth, not a
    # third, of the requests while it lasts.
    lab.control("replicas", 6)
    six = lab.watch(4, settle=4)  # the new replicas pass two checks first
    assert all(six.node(f"replica-{i}").rps > 0 for i in range(4, 7)), six.points[-1]["nodes"]
    assert calm.node("replica-1").rps > 1.5 * six.node("replica-1").rps
