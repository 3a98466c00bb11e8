"""The replicated-lb pattern end to end: traffic → balancer → replicas, as local processes.

One sandbox serves the whole module; after each test everything is put back (nodes
restarted, faults cleared, settings reset, every replica back in rotation).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from apps.labs.patterns import Pattern
from sandboxes.runtime.testing import LocalCluster
from tests.sandboxes.helpers import (
    PATTERN,
    assert_quiet,
    assert_well_formed,
    configure,
    fault,
    get,
    served,
)

REPLICAS = ["replica-1", "replica-2", "replica-3"]
NODES = [*REPLICAS, "lb", "traffic"]
INTERVAL_S = 1.0  # the spec's health-check interval
RISE = 2  # and healthy threshold


def in_rotation(cluster: LocalCluster) -> dict[str, bool]:
    backends = cluster.ctl("lb", {"op": "state"})["status"]["backends"]
    return {name: b["in_rotation"] for name, b in backends.items()}


def wait_all_in_rotation(cluster: LocalCluster, names: list[str] = REPLICAS) -> None:
    expected = dict.fromkeys(names, True)
    cluster.wait_for(lambda: in_rotation(cluster) == expected, 8, "every replica in rotation")


@pytest.fixture(scope="module")
def sandbox(pattern: Pattern) -> Iterator[LocalCluster]:
    with LocalCluster(PATTERN, pattern.expand()) as cluster:
        cluster.wait_started()
        wait_all_in_rotation(cluster)
        yield cluster


@pytest.fixture
def cluster(sandbox: LocalCluster, pattern: Pattern) -> Iterator[LocalCluster]:
    yield sandbox
    for name in [n for n in sandbox.nodes if n not in NODES]:
        sandbox.remove(name)
    for name in NODES:
        if not sandbox.nodes[name].running:
            sandbox.restart(name)
    for name in NODES:
        sandbox.ctl(name, {"op": "peers", "set": sandbox.peers()})
        sandbox.ctl(name, {"op": "clear"})
    sandbox.ctl("lb", {"op": "config", "set": {"policy": "round-robin", "health_checks": True}})
    sandbox.ctl("traffic", {"op": "config", "set": {"rps": 20}})
    wait_all_in_rotation(sandbox)
    assert_quiet(sandbox)


def calls(cluster: LocalCluster, name: str, since: float, route: str = "/") -> list[dict[str, Any]]:
    return [c for c in cluster.events(name, "call", since) if c["route"] == route]


def measure(cluster: LocalCluster, count: int) -> Counter[str]:
    """Successful forwards per replica over the next ``count`` calls of the balancer, in a
    window where the set of replicas in rotation stayed the same (on a busy machine a
    health check can time out; then the window is measured again)."""
    for _ in range(3):
        start = cluster.mark() + 0.2
        window = wait_calls(cluster, "lb", start, count)
        changes = [
            e
            for e in cluster.events("lb", "state", start)
            if e["event"] in ("ejected", "readmitted", "admitted") and e["ts"] <= window[-1]["ts"]
        ]
        if not changes:
            return served(window)
    raise AssertionError(f"replicas kept changing: {changes}")


def wait_calls(
    cluster: LocalCluster, name: str, since: float, count: int, timeout: float = 10
) -> list[dict[str, Any]]:
    """Wait until ``name`` has made ``count`` calls on ``/`` since ``since``."""

    def enough() -> list[dict[str, Any]] | None:
        made = calls(cluster, name, since)
        return made if len(made) >= count else None

    return cluster.wait_for(enough, timeout, f"{count} calls from {name}")[:count]


# ---- the happy path ----------------------------------------------------------------------


def test_traffic_reaches_every_replica_through_the_balancer(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    cluster.wait_for(
        lambda: all(served(calls(cluster, "lb", mark))[r] >= 3 for r in REPLICAS),
        5,
        "traffic on every replica",
    )
    client = calls(cluster, "traffic", mark)
    assert client and all(c["dst"] == "lb" and c["status"] == 200 for c in client)
    assert cluster.find("lb", "request", mark, src="traffic", route="/", status=200)
    assert cluster.find("replica-1", "request", mark, src="lb", route="/", status=200)

    answer = get(cluster.nodes["lb"].address, "/?key=k1")  # every response says who served it
    assert answer.status == 200
    assert answer.headers["X-Distlab-Node"] == "lb"
    assert json.loads(answer.body)["replica"] == answer.headers["X-Distlab-Served-By"]


def test_round_robin_takes_turns(cluster: LocalCluster) -> None:
    configure(cluster, "traffic", rps=150)
    counts = measure(cluster, 300)
    assert set(counts) == set(REPLICAS)
    assert max(counts.values()) - min(counts.values()) <= 6, counts


def test_random_spreads_requests_roughly_evenly(cluster: LocalCluster) -> None:
    configure(cluster, "traffic", rps=150)
    mark = cluster.mark()
    configure(cluster, "lb", policy="random")
    event = cluster.wait_event("lb", "state", mark, event="config", key="policy")
    assert (event["value"], event["previous"]) == ("random", "round-robin")
    counts = measure(cluster, 300)
    assert all(55 <= counts[r] <= 145 for r in REPLICAS), counts  # 100 ± over 5 sigma


def test_least_connections_sends_less_to_a_slow_replica(cluster: LocalCluster) -> None:
    fault(cluster, "replica-3", kind="latency", ms=100)
    configure(cluster, "traffic", rps=150)
    round_robin = measure(cluster, 240)
    configure(cluster, "lb", policy="least-connections")
    least = measure(cluster, 240)
    share_rr = round_robin["replica-3"] / sum(round_robin.values())
    share_lc = least["replica-3"] / sum(least.values())
    assert share_rr > 0.25, round_robin
    assert share_lc < 0.6 * share_rr, (round_robin, least)


# ---- health checks -----------------------------------------------------------------------


def test_a_killed_replica_is_ejected_then_readmitted(cluster: LocalCluster) -> None:
    configure(cluster, "traffic", rps=100)
    wait_calls(cluster, "traffic", cluster.mark(), 20)
    killed_at = cluster.mark()
    cluster.kill("replica-2")

    ejected = cluster.wait_event("lb", "state", killed_at, timeout=5, event="ejected")
    assert ejected["target"] == "replica-2"
    assert "connect" in ejected["reason"]
    assert ejected["ts"] - killed_at <= INTERVAL_S + 1

    # Once ejected (and the requests already on their way have failed), nothing fails.
    after = wait_calls(cluster, "traffic", ejected["ts"] + 0.2, 200)
    failed = [c for c in after if c["status"] != 200]
    assert len(failed) / len(after) < 0.01, failed
    assert served(after) == {"lb": len(after) - len(failed)}
    assert "replica-2" not in served(calls(cluster, "lb", ejected["ts"] + 0.2))

    restarted_at = cluster.mark()
    cluster.restart("replica-2")
    readmitted = cluster.wait_event(
        "lb", "state", restarted_at, timeout=INTERVAL_S * RISE + 2, event="readmitted"
    )
    assert readmitted["target"] == "replica-2"
    cluster.wait_for(
        lambda: served(calls(cluster, "lb", readmitted["ts"]))["replica-2"] >= 5,
        3,
        "traffic on replica-2 again",
    )


def test_without_health_checks_a_dead_replica_keeps_failing(cluster: LocalCluster) -> None:
    configure(cluster, "traffic", rps=100)
    configure(cluster, "lb", health_checks=False)
    killed_at = cluster.mark()
    cluster.kill("replica-1")
    client = wait_calls(cluster, "traffic", killed_at + 0.1, 150)
    errors = [c for c in client if c["status"] != 200]
    assert 0.2 < len(errors) / len(client) < 0.5  # about a third, for as long as it lasts
    assert {c["status"] for c in errors} == {502}
    lost = [c for c in calls(cluster, "lb", killed_at) if c["dst"] == "replica-1"]
    # Refused, or (for requests in flight at the kill, or on a kept-alive connection) cut.
    assert lost and all(c["status"] == 0 for c in lost)
    assert {c["error"] for c in lost} <= {"connect", "disconnected"}
    assert cluster.find("lb", "state", killed_at, event="ejected") is None


def test_with_no_healthy_replica_the_balancer_answers_503(cluster: LocalCluster) -> None:
    configure(cluster, "traffic", rps=50)
    mark = cluster.mark()
    fault(cluster, "lb", kind="partition", peers=REPLICAS)  # its calls to them fail at once
    for replica in REPLICAS:
        cluster.wait_event("lb", "state", mark, event="ejected", target=replica)
    cut = cluster.wait_event("lb", "call", mark, route="/health")
    assert (cut["status"], cut["error"], cut["fault"]) == (0, "partitioned", "partition")
    answer = cluster.wait_event("traffic", "call", mark, status=503)
    assert answer["dst"] == "lb"
    cluster.ctl("lb", {"op": "clear"})
    wait_all_in_rotation(cluster)


# ---- scaling -----------------------------------------------------------------------------


def test_scaling_adds_a_replica_then_removes_it_without_errors(
    cluster: LocalCluster, pattern: Pattern
) -> None:
    configure(cluster, "traffic", rps=100)
    cluster.add(*pattern.node("replica-4"))
    mark = cluster.mark()
    for name in NODES:
        cluster.ctl(name, {"op": "peers", "set": cluster.peers()})
    admitted = cluster.wait_event("lb", "state", mark, timeout=4, event="admitted")
    assert admitted["target"] == "replica-4"
    cluster.wait_for(
        lambda: served(calls(cluster, "lb", admitted["ts"]))["replica-4"] >= 5,
        3,
        "traffic on replica-4",
    )

    removing = cluster.mark()
    shrunk = [p for p in cluster.peers() if p["name"] != "replica-4"]
    for name in NODES:  # first the balancer forgets it, then it stops
        cluster.ctl(name, {"op": "peers", "set": shrunk})
    cluster.wait_event("lb", "state", removing, event="peers")
    cluster.remove("replica-4")
    client = wait_calls(cluster, "traffic", removing, 100)
    assert all(c["status"] == 200 for c in client)
    assert in_rotation(cluster) == dict.fromkeys(REPLICAS, True)


# ---- faults on the balancer --------------------------------------------------------------


def test_latency_on_the_balancer_slows_both_directions(cluster: LocalCluster) -> None:
    fault(cluster, "lb", kind="latency", ms=150)
    mark = cluster.mark()
    client = wait_calls(cluster, "traffic", mark + 0.4, 5)
    assert all(c["status"] == 200 and c["ms"] >= 300 for c in client)  # in 150, out 150
    forwarded = wait_calls(cluster, "lb", mark + 0.4, 5)
    assert all(c["fault"] == "latency" and c["ms"] >= 150 for c in forwarded)


def test_drop_on_the_balancer_loses_calls_both_ways(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    fault(cluster, "lb", kind="drop", rate=1.0)
    probe = cluster.wait_event("lb", "call", mark, route="/health", fault="drop")
    assert (probe["status"], probe["error"]) == (0, "timeout")
    assert probe["ms"] >= 450  # the health check's 0.5 s timeout
    lost = cluster.wait_event("traffic", "call", mark, timeout=5, status=0)
    assert lost["error"] == "timeout" and lost["ms"] >= 1900  # the client's 2 s timeout
    cluster.ctl("lb", {"op": "clear"})


# ---- the spec and the telemetry ----------------------------------------------------------


def test_every_telemetry_line_parses_and_carries_the_schema(cluster: LocalCluster) -> None:
    cluster.wait_event("traffic", "traffic", cluster.mark())
    assert_well_formed(cluster)
