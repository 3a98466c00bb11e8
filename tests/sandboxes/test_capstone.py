"""The capstone pattern: traffic → lb → api-1..3 → shard-a..d, the recommender and the
queue (consumed by consumer-1..2), every API replica shipping spans and log lines to the
collector; 14 local processes. One test per step of chapter 12's "Try it in the sandbox":
the steady state and a trace; a killed API replica; a slow recommender with the bulkhead on
and off, its breaker opening and trying again; a partitioned shard under per-shard breakers
and one shared breaker; paused consumers and the queue's depth; a failing shard with 1 and 3
attempts; the collector dropping everything; a restarted balancer. One sandbox serves the
module; after each test everything is put back.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apps.labs.patterns import Pattern, load_pattern
from sandboxes.runtime.testing import LocalCluster
from tests.sandboxes.helpers import assert_quiet, configure, fault, put_back

PATTERN = "capstone"
SHARDS = ["shard-a", "shard-b", "shard-c", "shard-d"]
APIS = ["api-1", "api-2", "api-3"]
CONSUMERS = ["consumer-1", "consumer-2"]
NODES = ["collector", *SHARDS, "recommender", "queue", *CONSUMERS, *APIS, "lb", "traffic"]
API = {"breakers": "per shard", "bulkhead": True, "attempts": 1}
CHAPTER = Path(__file__).parents[2] / "content/12-conclusion.md"


@pytest.fixture(scope="module")
def pattern() -> Pattern:
    return load_pattern(PATTERN)


@pytest.fixture(scope="module")
def sandbox(pattern: Pattern) -> Iterator[LocalCluster]:
    with LocalCluster(PATTERN, pattern.expand()) as cluster:
        cluster.wait_started()
        cluster.wait_for(lambda: len(calls(cluster, 0)) > 40, 15, "traffic")
        yield cluster


@pytest.fixture
def cluster(sandbox: LocalCluster) -> Iterator[LocalCluster]:
    yield sandbox
    put_back(sandbox, NODES)
    for name in APIS:
        configure(sandbox, name, **API)
    configure(sandbox, "traffic", rps=20.0, popularity="uniform")
    time.sleep(2)  # every breaker that opened meanwhile gets its trial call and closes
    assert_quiet(sandbox)


def calls(cluster: LocalCluster, since: float, route: str | None = None) -> list[dict[str, Any]]:
    """What users saw: the traffic generator's requests that ended since ``since``."""
    made = cluster.events("traffic", "call", since)
    return [c for c in made if route is None or c["route"] == route]


def error_pct(made: list[dict[str, Any]]) -> float:
    return 100 * sum(1 for c in made if c["status"] != 200) / max(1, len(made))


def p99(made: list[dict[str, Any]]) -> float:
    times = sorted(c["ms"] for c in made)
    return times[int(0.99 * (len(times) - 1))] if times else 0.0


def rate(cluster: LocalCluster, name: str, start: float, end: float) -> float:
    """Requests a second ``name`` received between ``start`` and ``end``."""
    got = [e for e in cluster.events(name, "request", start) if e["ts"] < end]
    return len([e for e in got if e["route"] != "/health"]) / (end - start)


def gauge(cluster: LocalCluster, name: str, gauge_id: str, since: float) -> list[float]:
    """The values ``name`` reported for ``gauge_id`` since ``since`` (a line per change)."""
    lines = cluster.events(name, "gauges", since)
    return [g["values"][gauge_id] for g in lines if gauge_id in g["values"]]


def events(cluster: LocalCluster, names: list[str], event: str, since: float) -> list[Any]:
    found = [e for n in names for e in cluster.events(n, "state", since) if e["event"] == event]
    return sorted(found, key=lambda e: e["ts"])


def traces(cluster: LocalCluster, since: float) -> list[dict[str, Any]]:
    return [t for t in cluster.events("collector", "trace") if t["started"] >= since]


# ---- step 1: the steady state, and one trace -----------------------------------------------


def test_every_request_succeeds_and_shows_its_hops_in_a_trace(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    time.sleep(5)
    made = calls(cluster, mark)
    assert len(made) >= 80 and error_pct(made) == 0  # 20 a second
    assert {c["route"] for c in made} == {"/product/{key}", "/order/{key}"}
    for shard in SHARDS:  # uniform keys: about a quarter each
        assert 3 <= rate(cluster, shard, mark, mark + 5) <= 7, shard
    assert max(gauge(cluster, "queue", "depth", mark)) <= 5  # consumers keep up
    found = cluster.wait_for(
        lambda: [t for t in traces(cluster, mark) if t["root"].startswith("POST")], 10, "a trace"
    )
    names = {s["name"] for s in found[0]["spans"]}
    assert "POST /order/{key}" in names and "call queue" in names
    assert any(n.startswith("call shard-") for n in names)
    read = next(t for t in traces(cluster, mark) if t["root"].startswith("GET"))
    assert "call recommender" in {s["name"] for s in read["spans"]}


# ---- step 2: kill api-2 -------------------------------------------------------------------


def test_a_killed_api_replica_costs_about_a_second_of_errors(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    cluster.kill("api-2")
    cluster.wait_event("lb", "state", mark, timeout=3, event="ejected", target="api-2")
    time.sleep(4)
    failed = [c for c in calls(cluster, mark) if c["status"] != 200]
    assert failed and len(failed) < 15  # its share of about one health-check interval
    assert max(c["ts"] for c in failed) - min(c["ts"] for c in failed) < 1.5
    later = calls(cluster, mark + 2)
    assert len(later) > 30 and error_pct(later) == 0


# ---- step 3: a slow recommender, with the bulkhead on and off -----------------------------


def test_a_slow_recommender_the_bulkhead_and_the_breaker(cluster: LocalCluster) -> None:
    isolated_p99 = 0.0  # orders' p99 with the bulkhead on (measured first)
    for bulkhead in (True, False):
        for name in APIS:
            configure(cluster, name, bulkhead=bulkhead)
        mark = cluster.mark()
        fault(cluster, "recommender", kind="latency", ms=3000)
        found = cluster.wait_for(
            lambda m=mark: events(cluster, APIS, "breaker_opened", m), 10, "a breaker opening"
        )
        opened = found[0]["ts"]
        assert opened - mark < 5  # 5 timeouts: 2 or more a second
        time.sleep(max(0.0, mark + 6 - time.time()))
        orders = [c for c in calls(cluster, mark, "/order/{key}") if c["ts"] < mark + 5]
        print(f"bulkhead {bulkhead}: orders' p99 {p99(orders):.0f} ms")
        if bulkhead:  # recommender calls wait in their compartment: orders never do
            assert p99(orders) < 200, orders
            isolated_p99 = p99(orders)
        else:  # they wait for workers held by recommender calls, until the breaker opens
            # (how long they wait moves with how soon it opens: 121 to 410 ms seen)
            assert p99(orders) > max(100, 3 * isolated_p99), (isolated_p99, orders)
        half = cluster.wait_for(
            lambda o=opened: events(cluster, APIS, "breaker_half_open", o), 8, "half-open"
        )
        assert 4.5 <= half[0]["ts"] - opened <= 6.5  # params.breaker_open_s
        reads = calls(cluster, opened + 0.5, "/product/{key}")
        assert reads and error_pct(reads) == 0  # a page without recommendations, not an error
        cluster.ctl("recommender", {"op": "clear"})
        time.sleep(9)  # a trial call fails once more, then the next one closes every breaker


# ---- step 4: partition shard-c, per-shard breakers vs one for the store -------------------


def test_one_shared_breaker_turns_one_shard_into_the_whole_store(cluster: LocalCluster) -> None:
    share = {}
    for scope in ("per shard", "one for the store"):
        for name in APIS:
            configure(cluster, name, breakers=scope)
        fault(cluster, "shard-c", kind="partition", peers=["*"])
        mark = cluster.mark()
        time.sleep(12)
        share[scope] = error_pct(calls(cluster, mark + 2))
        cluster.ctl("shard-c", {"op": "clear"})
        time.sleep(6)
    print("error % with shard-c partitioned:", share)
    assert 15 <= share["per shard"] <= 35  # shard-c's quarter of the keys
    assert share["one for the store"] >= 50  # the shared breaker fails every shard's keys


# ---- step 5: pause both consumers ---------------------------------------------------------


def test_paused_consumers_grow_the_queue_not_the_errors(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    for name in CONSUMERS:
        os.kill(cluster.nodes[name].pid, signal.SIGSTOP)
    time.sleep(10)
    depth = gauge(cluster, "queue", "depth", mark)[-1]
    print("queue depth after 10 s:", depth)
    assert 30 <= depth <= 70  # about 5 orders a second (a quarter of 20) for 10 s
    assert error_pct(calls(cluster, mark)) == 0
    resumed = cluster.mark()
    for name in CONSUMERS:
        os.kill(cluster.nodes[name].pid, signal.SIGCONT)
    cluster.wait_for(lambda: gauge(cluster, "queue", "depth", resumed)[-1:] == [0], 15, "drain")


# ---- step 6: errors on shard-a, 1 vs 3 attempts -------------------------------------------


def test_retries_multiply_the_calls_to_a_failing_shard(cluster: LocalCluster) -> None:
    calls_per_s = {}
    failing = {}
    for name in APIS:
        configure(cluster, name, breakers="off")
    fault(cluster, "shard-a", kind="errors", rate=0.5, status=503)
    for attempts in (1, 3):
        for name in APIS:
            configure(cluster, name, attempts=attempts)
        mark = cluster.mark() + 1
        time.sleep(9)
        calls_per_s[attempts] = rate(cluster, "shard-a", mark, mark + 8)
        failing[attempts] = error_pct(calls(cluster, mark))
    print("shard-a calls/s:", calls_per_s, "users' error %:", failing)
    assert 3.5 <= calls_per_s[1] <= 6.5  # a quarter of 20 requests a second
    # 1 + 0.5 + 0.25 = 1.75 times (8-s windows of random keys: about 15% either way)
    assert calls_per_s[3] >= 1.2 * calls_per_s[1]
    # 12.5% vs 50% of shard-a's quarter, in theory; an 8-s window holds about 40 of
    # shard-a's requests, so each figure moves by a few points (seen: 5.0% vs 10.0%).
    assert failing[3] < 0.75 * failing[1]


# ---- step 7: the collector drops everything -----------------------------------------------


def test_a_dropping_collector_costs_traces_not_requests(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    fault(cluster, "collector", kind="drop", rate=1.0)
    time.sleep(6)
    assert error_pct(calls(cluster, mark)) == 0
    assert not [t for t in traces(cluster, mark + 1)]  # nothing arrives
    cluster.ctl("collector", {"op": "clear"})
    cluster.wait_for(lambda: traces(cluster, mark + 1), 10, "the backlog shipped")


# ---- step 8: restart the balancer ---------------------------------------------------------


def test_a_restarted_balancer_fails_every_request_while_it_is_away(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    cluster.restart("lb")  # returns once it is up again
    time.sleep(4)
    made = calls(cluster, mark)
    failed = [c for c in made if c["status"] != 200]
    assert failed and all(c["error"] in ("connect", "disconnected") for c in failed)
    assert error_pct(calls(cluster, cluster.mark() - 2)) == 0


# ---- the numbers -------------------------------------------------------------------------


def test_the_spec_holds_the_numbers_the_chapter_uses(pattern: Pattern) -> None:
    assert [n.name for n in pattern.expand()] == NODES  # 14 nodes
    params = pattern.params
    assert (params["workers"], params["recommender_slots"]) == (4, 2)
    assert (params["breaker_failures"], params["breaker_window_s"]) == (5, 5)
    assert (params["breaker_open_s"], params["health_interval_s"]) == (5, 1.0)
    assert params["consume_ms"] == 100
    (profile,) = pattern.traffic
    assert (profile.target, profile.rps, profile.timeout_s) == ("lb", 20, 2.0)
    assert [m.weight for m in profile.mix] == [3, 1]  # a quarter of requests are orders
    defaults = {c.id: c.default for c in pattern.controls}
    assert defaults == {
        "rps": 20,
        "key_popularity": "uniform",
        "bulkhead": True,
        "breakers": "per shard",
        "attempts": 1,
        "api_replicas": 3,
        "consumers": 2,
    }
    text = CHAPTER.read_text(encoding="utf-8")
    section = text[text.index("## Try it in the sandbox") : text.index("## Key takeaways")]
    for phrase in ("shard-a", "shard-d", "14", "20 requests", "about 5 orders", "1.75"):
        assert phrase in section, phrase
    assert re.search(r"breaker.{0,80}5 failed calls", section, re.S)
