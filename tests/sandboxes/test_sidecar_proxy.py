"""The sidecar-proxy pattern end to end: traffic → sidecar → app, as local processes.

Each test follows one step of chapter 2's "Try it in the sandbox" and asserts the numbers
the chapter promises, from the nodes' own telemetry. One sandbox serves the whole module;
after each test everything is put back (nodes resumed or restarted, faults cleared,
settings reset, requests succeeding again).

Tolerances: a share of n independent requests has a standard deviation of
sqrt(p(1-p)/n); the windows below are sized so that each stated range is at least about
four standard deviations wide on either side.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from apps.labs.patterns import Pattern, load_pattern
from sandboxes.runtime.testing import LocalCluster
from tests.sandboxes.helpers import assert_quiet, configure, fault, get

PATTERN = "sidecar-proxy"
NODES = ["app", "sidecar", "traffic"]
SIDECAR_TIMEOUT_S = 1.0  # the sidecar's timeout for calls to the app, by default
CALLER_DEADLINE_S = 1.5  # the traffic generator gives up after this
RPS = 20  # the chapter's traffic
paused: set[str] = set()


@pytest.fixture(scope="module")
def pattern() -> Pattern:
    return load_pattern(PATTERN)


@pytest.fixture(scope="module")
def sandbox(pattern: Pattern) -> Iterator[LocalCluster]:
    with LocalCluster(PATTERN, pattern.expand()) as cluster:
        cluster.wait_started()
        wait_flowing(cluster)
        yield cluster
        for name in list(paused):
            resume(cluster, name)


@pytest.fixture
def cluster(sandbox: LocalCluster) -> Iterator[LocalCluster]:
    yield sandbox
    for name in list(paused):
        resume(sandbox, name)
    for name in NODES:
        if not sandbox.nodes[name].running:
            sandbox.restart(name)
    for name in NODES:
        sandbox.ctl(name, {"op": "clear"})
    configure(sandbox, "sidecar", timeout_s=SIDECAR_TIMEOUT_S, retries=False)
    configure(sandbox, "traffic", rps=RPS)
    wait_flowing(sandbox)
    assert_quiet(sandbox)


# ---- helpers -----------------------------------------------------------------------------


def pause(cluster: LocalCluster, name: str) -> float:
    """What the engine's pause does (SIGSTOP): the process freezes, its port stays open."""
    os.kill(cluster.nodes[name].pid, signal.SIGSTOP)
    paused.add(name)
    return cluster.mark()


def resume(cluster: LocalCluster, name: str) -> None:
    os.kill(cluster.nodes[name].pid, signal.SIGCONT)
    paused.discard(name)


def calls(
    cluster: LocalCluster, name: str, since: float, until: float = math.inf
) -> list[dict[str, Any]]:
    """``name``'s calls on ``/`` that ended in (since, until]."""
    return [
        c
        for c in cluster.events(name, "call", since)
        if c["route"] == "/" and c["ts"] > since and c["ts"] <= until
    ]


def wait_calls(
    cluster: LocalCluster, name: str, since: float, count: int, timeout: float = 10
) -> list[dict[str, Any]]:
    """The first ``count`` calls ``name`` finishes after ``since`` (waits for them)."""

    def enough() -> list[dict[str, Any]] | None:
        made = calls(cluster, name, since)
        return made if len(made) >= count else None

    return cluster.wait_for(enough, timeout, f"{count} calls from {name}")[:count]


def wait_flowing(cluster: LocalCluster) -> None:
    """Users get answers again, and the sidecar has nothing left over from before."""
    mark = cluster.mark()
    cluster.wait_for(
        lambda: sum(c["status"] == 200 for c in calls(cluster, "traffic", mark)) >= 5,
        10,
        "requests succeeding",
    )

    def settled() -> bool:
        gauges = cluster.ctl("sidecar", {"op": "state"})["observed"]["gauges"]
        leftovers = ("timeouts_per_s", "abandoned_per_s", "retries_per_s")
        return gauges.get("in_flight", 0) <= 2 and not any(gauges.get(g) for g in leftovers)

    cluster.wait_for(settled, 5, "a second with nothing left over from before")


def failed(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in calls if c["status"] == 0 or c["status"] >= 400]


def error_share(calls: list[dict[str, Any]]) -> float:
    return len(failed(calls)) / len(calls)


def percentile(calls: list[dict[str, Any]], q: float) -> float:
    ms = sorted(c["ms"] for c in calls)
    return ms[min(len(ms) - 1, int(q * len(ms)))]


def gauge_values(cluster: LocalCluster, gauge: str, since: float) -> list[float]:
    """The values the sidecar's ``gauge`` had from ``since`` on, in order: the one in force
    at ``since``, then each change (a gauge is written only when it changes)."""
    written = [e for e in cluster.events("sidecar", "gauges") if gauge in e["values"]]
    before = [e for e in written if e["ts"] < since]
    return [e["values"][gauge] for e in before[-1:] + written[len(before) :]]


# ---- step 1: the extra hop ---------------------------------------------------------------


def test_it_forwards_every_request_and_the_hop_costs_little(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    users = wait_calls(cluster, "traffic", mark, 60)  # three seconds at 20 requests/s
    forwarded = calls(cluster, "sidecar", mark, users[-1]["ts"])
    assert all(c["dst"] == "sidecar" and c["status"] == 200 for c in users)
    assert all(c["dst"] == "app" and c["status"] == 200 for c in forwarded)
    assert len(users) - 2 <= len(forwarded) <= len(users) + 2
    # The p50 into the sidecar minus the p50 from the sidecar to the app: one more hop on
    # loopback, typically about a millisecond; the app's own work (5 ms) is in both.
    hop_ms = percentile(users, 0.5) - percentile(forwarded, 0.5)
    assert 0 < hop_ms < 5, (percentile(users, 0.5), percentile(forwarded, 0.5))
    assert 5 <= percentile(forwarded, 0.5) < 20
    assert cluster.find("app", "request", mark, src="sidecar", route="/", status=200)


def test_it_answers_only_its_sidecar(cluster: LocalCluster) -> None:
    app = cluster.nodes["app"].address
    assert get(app, "/?id=1").status == 403  # a client going around the sidecar
    assert get(app, "/?id=1", caller="traffic").status == 403
    answer = get(app, "/?id=1", caller="sidecar")
    assert answer.status == 200 and answer.headers["X-Distlab-Node"] == "app"
    assert get(cluster.nodes["sidecar"].address, "/?id=2").status == 200


# ---- step 2: errors, then one retry ------------------------------------------------------


def test_it_passes_errors_on_and_one_retry_hides_most(cluster: LocalCluster) -> None:
    fault(cluster, "app", kind="errors", rate=0.3)
    configure(cluster, "traffic", rps=150)  # more requests, so the shares are precise

    # Retries off: about 30% on both links (n = 600: one standard deviation is 1.9%).
    start = cluster.mark() + 0.3
    users = wait_calls(cluster, "traffic", start, 600)
    forwarded = calls(cluster, "sidecar", start, users[-1]["ts"])
    assert 0.22 <= error_share(users) <= 0.38, error_share(users)
    assert 0.22 <= error_share(forwarded) <= 0.38, error_share(forwarded)
    assert {c["status"] for c in failed(users)} == {503}  # the app's answer, relayed
    assert 0.97 <= len(forwarded) / len(users) <= 1.03

    # Retries on: a request fails only if both attempts fail, 0.3 * 0.3 = 9% (one
    # standard deviation 1.2%), and the app gets 1.3 times the requests.
    configure(cluster, "sidecar", retries=True)
    start = cluster.mark() + 0.3
    users = wait_calls(cluster, "traffic", start, 600)
    forwarded = calls(cluster, "sidecar", start, users[-1]["ts"])
    assert 0.04 <= error_share(users) <= 0.14, error_share(users)
    assert 1.2 <= len(forwarded) / len(users) <= 1.4, (len(forwarded), len(users))
    assert 0.22 <= error_share(forwarded) <= 0.38  # each attempt still fails 30% of the time
    assert max(gauge_values(cluster, "retries_per_s", start)) > 0
    assert max(gauge_values(cluster, "rescued_per_s", start)) > 0

    # At the chapter's 20 requests/s the app's own rate is about 26 per second. Over five
    # seconds (100 requests, about 30 ± 4.6 retries) that is 26 ± 0.9 per second.
    configure(cluster, "traffic", rps=RPS)
    start = cluster.mark() + 1.6  # the 150/s requests are all over by then
    end = start + 5
    cluster.wait_for(lambda: calls(cluster, "traffic", end), 8, "five seconds of traffic")
    app_rate = sum(
        1 for r in cluster.events("app", "request", start) if r["route"] == "/" and r["ts"] <= end
    ) / (end - start)
    users_rate = len(calls(cluster, "traffic", start, end)) / (end - start)
    assert 18 <= users_rate <= 22, users_rate
    assert 22.5 <= app_rate <= 29.5, app_rate


# ---- step 3: a paused app, no retries ----------------------------------------------------


def test_a_paused_app_costs_each_request_the_sidecar_timeout(cluster: LocalCluster) -> None:
    paused_at = pause(cluster, "app")
    # Requests sent after the pause end one timeout later: skip the first second.
    steady = paused_at + SIDECAR_TIMEOUT_S + 0.1
    users = wait_calls(cluster, "traffic", steady, 40)  # two seconds at 20/s
    assert {(c["status"], c["error"]) for c in users} == {(504, None)}  # from the sidecar
    assert all(950 <= c["ms"] <= 1200 for c in users), [c["ms"] for c in users]
    assert 950 <= percentile(users, 0.99) <= 1200
    forwarded = calls(cluster, "sidecar", steady, users[-1]["ts"])
    assert forwarded and {c["error"] for c in forwarded} == {"timeout"}
    # In flight from the sidecar to the app: 20 a second, each held for 1 s (Little's law).
    in_flight = gauge_values(cluster, "in_flight", steady)
    assert in_flight and all(15 <= n <= 25 for n in in_flight), in_flight
    unreachable = cluster.wait_event("sidecar", "state", paused_at, event="app_unreachable")
    assert (unreachable["target"], unreachable["reason"]) == ("app", "timeout")
    assert max(gauge_values(cluster, "timeouts_per_s", steady)) >= 15
    assert max(gauge_values(cluster, "abandoned_per_s", steady)) == 0  # answered in time

    resumed_at = cluster.mark()
    resume(cluster, "app")
    reachable = cluster.wait_event("sidecar", "state", resumed_at, event="app_reachable")
    assert reachable["calls"] >= 20


# ---- step 4: a paused app, with retries --------------------------------------------------


def test_a_retry_after_a_timeout_outlives_the_callers_deadline(cluster: LocalCluster) -> None:
    configure(cluster, "sidecar", retries=True)
    paused_at = pause(cluster, "app")
    # The sidecar would answer after two timeouts (2 s); the callers give up at 1.5 s.
    steady = paused_at + 2 * SIDECAR_TIMEOUT_S + 0.1  # both attempts of every request seen
    users = wait_calls(cluster, "traffic", steady, 40)
    assert {(c["status"], c["error"]) for c in users} == {(0, "timeout")}  # every one fails
    assert all(1450 <= c["ms"] <= 1700 for c in users), [c["ms"] for c in users]
    assert 1450 <= percentile(users, 0.99) <= 1700
    # Twice as many calls to the stuck app as requests from users, twice as many in flight.
    forwarded = calls(cluster, "sidecar", steady, users[-1]["ts"])
    window = calls(cluster, "traffic", steady, users[-1]["ts"])
    assert 1.8 <= len(forwarded) / len(window) <= 2.2, (len(forwarded), len(window))
    assert {c["error"] for c in forwarded} == {"timeout"}
    in_flight = gauge_values(cluster, "in_flight", steady)
    assert in_flight and all(33 <= n <= 47 for n in in_flight), in_flight
    # Every answer the sidecar finally gives (a 504 after 2 s) comes too late.
    abandoned = gauge_values(cluster, "abandoned_per_s", steady)
    assert abandoned and 15 <= max(abandoned) <= 25, abandoned
    assert max(gauge_values(cluster, "rescued_per_s", paused_at + 1)) == 0


def test_a_retry_that_fits_the_deadline_fails_faster(cluster: LocalCluster) -> None:
    # Two attempts of 0.6 s fit into the callers' 1.5 s: they get the sidecar's 504.
    configure(cluster, "sidecar", retries=True, timeout_s=0.6)
    paused_at = pause(cluster, "app")
    steady = paused_at + 1.3
    users = wait_calls(cluster, "traffic", steady, 30)
    assert {(c["status"], c["error"]) for c in users} == {(504, None)}
    assert all(1150 <= c["ms"] <= 1450 for c in users), [c["ms"] for c in users]
    assert max(gauge_values(cluster, "abandoned_per_s", steady)) == 0


# ---- step 5: the sidecar dies ------------------------------------------------------------


def test_a_dead_sidecar_fails_every_request_at_once(cluster: LocalCluster) -> None:
    cluster.kill("sidecar")  # returns once it is dead
    killed_at = cluster.mark()
    users = wait_calls(cluster, "traffic", killed_at + 0.1, 30)
    assert {(c["status"], c["error"]) for c in users} == {(0, "connect")}
    assert percentile(users, 0.99) < 50  # refused at once, no waiting
    arrived = [
        r
        for r in cluster.events("app", "request", killed_at)
        if r["route"] == "/" and r["ts"] - r["ms"] / 1000 > killed_at  # not one from before
    ]
    assert not arrived
    assert cluster.nodes["app"].running  # up, and idle

    cluster.restart("sidecar")  # returns once it serves again
    restarted_at = cluster.mark()
    cluster.wait_event("traffic", "call", restarted_at, status=200)


# ---- the spec ---------------------------------------------------------------------------
# (tests/sandboxes/test_conformance.py checks the controls and the declared gauges.)


def test_the_spec_holds_the_numbers_the_chapter_uses(pattern: Pattern) -> None:
    assert [n.name for n in pattern.expand()] == NODES
    assert pattern.params["sidecar_timeout_s"] == SIDECAR_TIMEOUT_S
    (profile,) = pattern.traffic
    assert (profile.node, profile.target) == ("traffic", "sidecar")
    assert (profile.rps, profile.timeout_s) == (RPS, CALLER_DEADLINE_S)
    defaults = {c.id: c.default for c in pattern.controls}
    assert defaults == {"timeout": SIDECAR_TIMEOUT_S, "retries": False, "rps": RPS}
    assert pattern.users == ("traffic",)
