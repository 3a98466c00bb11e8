"""Chapter 6, "Try it in the sandbox": leases, a registry watch and a DNS cache, step by
step through the platform's services, asserting what the lab shows against the chapter's
text; then the pattern's two experiments on the same sandbox.

Tolerances: a lease runs out 4 to 6 s after a crash (6 s lease, heartbeats every 2 s); a
DNS answer is kept 10 s; a second or more is allowed on either side for a loaded machine
and for the engine's own delays (a Docker kill or pause takes a moment).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import pytest
from celery import Celery

from apps.accounts.models import User
from tests.walkthroughs.lab import Lab, Window

pytestmark = pytest.mark.django_db(transaction=True)
LEASE_S, TTL_S = 6, 10


def test_chapter_6_walkthrough_and_experiments(
    walk_engine: str, learner: User, embedded_celery: Celery
) -> None:
    with Lab(learner, "service-discovery") as lab:
        walk(lab)
        experiments(lab)


def between(lab: Lab, start: float, end: float) -> Window:
    """The lab's history for the whole seconds from ``start`` to ``end`` (both past)."""
    first, last = math.ceil(start), math.floor(end)
    deadline = time.monotonic() + 10
    while True:
        snapshot = lab.snapshot()
        history = snapshot.get("history") or []
        if history and history[-1]["ts"] >= last:
            break
        assert time.monotonic() < deadline, "the lab's history did not reach the window"
        time.sleep(0.2)
    points = [p for p in history if first <= p["ts"] <= last]
    events = [e for e in snapshot.get("events") or [] if start <= e["ts"] <= end]
    return Window(points, events)


def wait_list(lab: Lab, since: float, timeout: float, **fields: Any) -> Mapping[str, Any]:
    """The first ``list_updated`` of the client since ``since`` whose data match."""
    deadline = time.monotonic() + timeout
    while True:
        for event in lab.snapshot().get("events") or []:
            data = event.get("data") or {}
            matches = all(str(v) in str(data.get(k)) for k, v in fields.items())
            if event.get("kind") == "list_updated" and event["ts"] >= since and matches:
                return event
        assert time.monotonic() < deadline, f"no list_updated with {fields} in {timeout:g} s"
        time.sleep(0.2)


def expired(lab: Lab, since: float, target: str, timeout: float = 12) -> Mapping[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for event in lab.snapshot().get("events") or []:
            mine = (event.get("data") or {}).get("target") == target
            if event.get("kind") == "lease_expired" and event["ts"] >= since and mine:
                return event
        assert time.monotonic() < deadline, f"the lease of {target} did not expire"
        time.sleep(0.2)


def registered(lab: Lab, since: float, target: str, timeout: float = 30) -> Mapping[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for event in lab.snapshot().get("events") or []:
            mine = (event.get("data") or {}).get("target") == target
            if event.get("kind") == "registered" and event["ts"] >= since and mine:
                return event
        assert time.monotonic() < deadline, f"{target} did not register"
        time.sleep(0.2)


def walk(lab: Lab) -> None:
    # 1. Requests spread evenly over three instances, in watch mode (once the client has
    # its first list: the registry answers 3 s after it starts).
    deadline = time.monotonic() + 30
    while lab.watch(1, settle=0).users().rps < 15:
        assert time.monotonic() < deadline, "the client's requests did not start"
    calm = lab.watch(2, settle=0)
    assert calm.users().errors == 0 and calm.users().rps >= 15, calm.users()
    spread = [calm.link("client", f"api-{n}").n for n in (1, 2, 3)]
    assert min(spread) >= 0.25 * sum(spread), spread

    # 2. Kill api-2: errors on its link until its lease expires 4-6 s later, then none;
    # restarted, it registers again at once and gets requests.
    crashed = time.time()
    kill = lab.fault("api-2", "kill", duration=30)
    gone = expired(lab, crashed, "api-2")
    assert LEASE_S - 2 - 1 <= gone["ts"] - crashed <= LEASE_S + 1.5, gone["ts"] - crashed
    before = between(lab, crashed, gone["ts"])
    assert before.link("client", "api-2").errors >= 10, before.link("client", "api-2")
    back = time.time()
    lab.revert(kill)
    registered(lab, back, "api-2")
    returned = wait_list(lab, back, 5, change="+api-2")
    # Between the expiry (and the last requests' 1 s timeout) and its return: no errors.
    after = between(lab, gone["ts"] + 1.2, returned["ts"])
    assert after.link("client", "api-2").n == 0 and after.users().errors == 0, after.users()

    # 3. dns-cache, kill api-3: errors go on after its lease expires, until the cached
    # answer is 10 s old.
    # 4. (Done while step 3's cached answer is still young, to save a TTL of waiting.)
    # Scale up in dns-cache mode: api-4 and api-5 register and are in DNS at once, but get
    # nothing until the client's cache expires.
    switched = time.time()
    lab.control("mode", "dns-cache")
    kill = lab.fault("api-3", "kill", duration=30)
    lab.control("instances", 5)
    joined = registered(lab, switched, "api-5", timeout=TTL_S)
    registered(lab, switched, "api-4", timeout=5)
    deadline = time.monotonic() + 5
    while not any("api-5" in str(row) for row in lab.table_rows("records")):
        assert time.monotonic() < deadline, lab.table_rows("records")
        time.sleep(0.2)
    gone = expired(lab, switched, "api-3")
    refreshed = wait_list(lab, switched, TTL_S + 4, source="DNS", change="-api-3")
    assert refreshed["ts"] - gone["ts"] >= 2, (refreshed["ts"], gone["ts"])
    assert TTL_S - 1 <= refreshed["ts"] - switched <= TTL_S + 3, refreshed["ts"] - switched
    stale = between(lab, gone["ts"] + 1, refreshed["ts"] - 0.5)
    assert stale.link("client", "api-3").error_pct >= 90, stale.link("client", "api-3")
    assert "+api-5" in refreshed["data"]["change"], refreshed["data"]
    unknown = between(lab, joined["ts"] + 0.5, refreshed["ts"] - 0.5)
    assert unknown.link("client", "api-5").n == 0  # registered, in DNS, and not called
    lab.revert(kill)

    # 5. Watch mode; the registry killed: no errors, the list ages; restarted empty, it
    # waits for the heartbeats. Then 500 ms of latency on it: requests are not slowed.
    lab.control("mode", "watch")
    deadline = time.monotonic() + 8
    while True:  # the client's watch is open: its list age reads 0
        client = ((lab.snapshot().get("frame") or {}).get("nodes") or {}).get("client") or {}
        watching = (client.get("states") or {}).get("discovery") == "watch"
        if watching and (client.get("gauges") or {}).get("list_age_s") == 0:
            break
        assert time.monotonic() < deadline, client
        time.sleep(0.2)
    outage_at = time.time()
    kill = lab.fault("registry", "kill", duration=10)
    outage = lab.watch(2, settle=1)
    assert outage.users().errors == 0 and outage.users().rps >= 15, outage.users()
    assert outage.link("client", "api-5").n > 0  # the new instances are in the list now
    assert max(outage.gauge("client", "list_age_s")) >= 2, outage.gauge("client", "list_age_s")
    lab.revert(kill)
    for n in (1, 2, 3, 4, 5):
        registered(lab, outage_at, f"api-{n}", timeout=20)
    assert between(lab, outage_at, time.time() - 1).users().errors == 0
    slow = lab.fault("registry", "latency", ms=500)
    slowed = lab.watch(2, settle=0.5)
    assert slowed.users().errors == 0 and (slowed.users().p99_ms or 0) < 200, slowed.users()
    lab.revert(slow)

    # 6. 2000 ms of latency: heartbeats give up, every lease expires, the client applies
    # the empty list and every request fails until the latency ends.
    slowed_at = time.time()
    slow = lab.fault("registry", "latency", ms=2000, duration=20)
    empty = wait_list(lab, slowed_at, LEASE_S + 6, count=0)
    expiries = between(lab, slowed_at, empty["ts"]).texts("lease_expired")
    assert len(expiries) == 5, expiries
    failing = lab.watch(1.5, settle=0.5)
    assert failing.users().error_pct >= 95, failing.users()
    healed = time.time()
    lab.revert(slow)
    wait_list(lab, healed, 8, count=5)

    # 7. Pause api-1 past its lease: its requests hang to the 1 s timeout (p99 ~1 s, its
    # share of the requests fails) until the lease expires; resumed, it comes back.
    paused_at = time.time()
    pause = lab.fault("api-1", "pause", duration=10)
    gone = expired(lab, paused_at, "api-1")
    hung = between(lab, paused_at + 1, gone["ts"])
    users = hung.users()
    assert 900 <= (users.p99_ms or 0) <= 1500, users
    assert 10 <= users.error_pct <= 35, users  # one in five instances
    back = time.time()
    lab.revert(pause)
    returned = registered(lab, back, "api-1", timeout=10)
    dropped = between(lab, gone["ts"] + 1.2, max(returned["ts"], gone["ts"] + 2.5))
    assert dropped.users().errors == 0, dropped.users()


def experiments(lab: Lab) -> None:
    run = lab.experiment("crash-watch-vs-cache", "same")
    measured = run.measured
    assert measured["cache_error_pct"] >= 1.25 * measured["watch_error_pct"] > 0, measured
    verdicts = lab.verdicts(run)
    assert verdicts["cache"].correct and not verdicts["same"].correct
    assert run.correct is False and f"{measured['cache_error_pct']:.0f}%" in run.explanation

    run = lab.experiment("registry-outage", "nothing")
    assert run.correct is True and run.measured["outage_error_pct"] < 2, run.measured
    assert not lab.verdicts(run)["all-fail"].correct
