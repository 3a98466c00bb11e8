"""The pubsub-queue pattern: producer → broker (topic ``orders``: ``work`` and ``audit``)
← worker-1..3 and auditor, as local processes. One test per idea of chapter 7's "Try it in
the sandbox": the subscriptions keep up; a worker killed mid-order gets its order
redelivered after the visibility timeout (skipped by deduplication, or charged twice
without); a bounded queue pushes back on the producer; malformed orders are dead-lettered
after the maximum receives; a worker slower than the visibility timeout looks dead; an
acknowledgement before processing loses the order; a cut-off auditor backs up only
``audit``. One sandbox serves the module, with a 1-s visibility timeout to keep it fast;
after each test everything is put back.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from apps.labs.patterns import Pattern, load_pattern
from sandboxes.runtime.testing import LocalCluster
from tests.sandboxes.helpers import assert_quiet, configure, fault

PATTERN = "pubsub-queue"
WORKERS = ["worker-1", "worker-2", "worker-3"]
NODES = ["broker", *WORKERS, "auditor", "producer"]
BROKER = {"visibility_s": 1.0, "max_receives": 3, "max_depth": 10000}
WORKER = {"work_ms": 100.0, "ack": "after processing", "dedupe": True}
PRODUCER = {"rps": 20.0, "malformed_pct": 0.0}


@pytest.fixture(scope="module")
def pattern() -> Pattern:
    return load_pattern(PATTERN)


@pytest.fixture(scope="module")
def sandbox(pattern: Pattern) -> Iterator[LocalCluster]:
    with LocalCluster(PATTERN, pattern.expand()) as cluster:
        cluster.wait_started()
        configure(cluster, "broker", **BROKER)
        configure(cluster, "producer", **PRODUCER)
        yield cluster


@pytest.fixture
def cluster(sandbox: LocalCluster) -> Iterator[LocalCluster]:
    yield sandbox
    for name in NODES:
        node = sandbox.nodes[name]
        if node.running:
            os.kill(node.pid, signal.SIGCONT)
        else:
            sandbox.restart(name)
        sandbox.ctl(name, {"op": "clear"})
    configure(sandbox, "broker", **BROKER)
    configure(sandbox, "producer", **PRODUCER)
    for name in WORKERS:
        configure(sandbox, name, **WORKER)
    sandbox.wait_for(
        lambda: (
            gauge(sandbox, "broker", "work_depth") <= 5
            and gauge(sandbox, "broker", "work_in_flight") <= 3
        ),
        10,
        "work drained",
    )
    sandbox.wait_for(lambda: gauge(sandbox, "broker", "audit_depth") <= 5, 10, "audit drained")
    assert_quiet(sandbox)


def gauge(cluster: LocalCluster, node: str, name: str) -> float:
    return float(cluster.ctl(node, {"op": "state"})["observed"]["gauges"].get(name, 0))


def events(cluster: LocalCluster, node: str, kind: str, since: float) -> list[dict[str, Any]]:
    return [e for e in cluster.events(node, "state", since) if e["event"] == kind]


def workers(cluster: LocalCluster, kind: str, since: float) -> list[dict[str, Any]]:
    return [e for name in WORKERS for e in events(cluster, name, kind, since)]


def publishes(cluster: LocalCluster, since: float) -> list[dict[str, Any]]:
    return [c for c in cluster.events("producer", "call", since) if c["route"] == "/topics/orders"]


def holding_worker(cluster: LocalCluster) -> str:
    """A worker in the middle of an order taken with the settings just made (600 ms of
    work): its last call, under 0.3 s ago, charged it, so it has 0.3 s of work left."""
    configured = cluster.mark() + 0.8  # orders taken before are done by then

    def busy() -> str | None:
        for name in WORKERS:
            calls = cluster.events(name, "call", max(configured, cluster.mark() - 0.3))
            if calls and calls[-1]["route"] == "/orders/{order}/effect":
                return name
        return None

    return cluster.wait_for(busy, 5, "a worker holding an order")


# ---- step 1: everything keeps up ---------------------------------------------------------


def test_every_order_is_completed_once_and_audited(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    cluster.wait_for(lambda: len(publishes(cluster, mark)) >= 30, 5, "30 publishes")
    assert all(c["status"] == 200 for c in publishes(cluster, mark))
    assert gauge(cluster, "broker", "work_depth") <= 5
    assert gauge(cluster, "broker", "audit_depth") <= 20  # the auditor takes 20 at a time
    receives = [
        c for name in WORKERS for c in cluster.events(name, "call", mark)
        if c["route"] == "/subs/work/receive"
    ]  # fmt: skip
    assert {c["src"] for c in receives} == set(WORKERS)  # competing consumers share the work
    assert gauge(cluster, "broker", "duplicate_effects") == 0
    assert events(cluster, "broker", "redelivered", mark) == []
    completed = gauge(cluster, "broker", "orders_completed")
    assert completed > 0
    # the auditor pulls in batches and reports each second: within a few seconds it has
    # recorded every order the workers had completed
    cluster.wait_for(
        lambda: gauge(cluster, "auditor", "audited") >= completed, 4, "the auditor to catch up"
    )


# ---- step 2: a worker dies mid-order ----------------------------------------------------


@pytest.mark.parametrize("dedupe", [True, False])
def test_a_killed_workers_order_comes_back_after_the_visibility_timeout(
    cluster: LocalCluster, dedupe: bool
) -> None:
    configure(cluster, "producer", rps=4.0)  # 3 workers at 600 ms keep up with 4 a second
    for name in WORKERS:
        configure(cluster, name, work_ms=600.0, dedupe=dedupe)
    victim = holding_worker(cluster)
    killed = cluster.mark()
    cluster.kill(victim)
    again = cluster.wait_event("broker", "state", killed, timeout=5, event="redelivered")
    assert again["previous"].startswith(f"{victim} (not acknowledged in time)"), again
    assert again["consumer"] != victim and again["receives"] == 2
    assert 0.9 <= again["after_s"] <= 2.5, again  # the 1-s timeout, from the receive
    order = again["order"]
    if dedupe:  # found in the orders table: skipped
        skipped = cluster.wait_for(
            lambda: [
                e for e in workers(cluster, "duplicate_skipped", killed) if e["order"] == order
            ],
            5,
            "the duplicate skipped",
        )
        assert skipped and workers(cluster, "duplicate_effect", killed) == []
    else:  # charged a second time
        effect = cluster.wait_for(
            lambda: [
                e for e in workers(cluster, "duplicate_effect", killed) if e["order"] == order
            ],
            5,
            "a duplicate effect",
        )
        assert effect[0]["times"] == 2


# ---- step 3 and 4: a backlog, then back-pressure ----------------------------------------


def test_a_full_queue_refuses_publishes_and_work_alone_grows(cluster: LocalCluster) -> None:
    configure(cluster, "broker", max_depth=20)
    for name in WORKERS:
        os.kill(cluster.nodes[name].pid, signal.SIGSTOP)
    mark = cluster.mark()
    cluster.wait_for(lambda: gauge(cluster, "broker", "work_depth") >= 20, 5, "a full queue")
    assert gauge(cluster, "broker", "audit_depth") <= 20  # the auditor keeps up
    refused = cluster.wait_for(
        lambda: [c for c in publishes(cluster, mark) if c["status"] == 503], 3, "a refusal"
    )
    assert refused[0]["ms"] < 100  # at once: no extra latency, an error
    accepted = [c for c in publishes(cluster, mark) if c["status"] == 200]
    assert 15 <= len(accepted) <= 26, len(accepted)  # 20 (+ the 3 the workers took)


# ---- step 6: poison messages -------------------------------------------------------------


def test_malformed_orders_are_dead_lettered_after_the_maximum_receives(
    cluster: LocalCluster,
) -> None:
    mark = cluster.mark()
    configure(cluster, "producer", malformed_pct=20.0)
    dead = cluster.wait_event("broker", "state", mark, timeout=5, event="dead_lettered")
    assert dead["receives"] == 3 and dead["subscription"] == "work"
    cluster.wait_for(
        lambda: gauge(cluster, "broker", "dead_letter_depth") >= 1, 2, "a dead letter counted"
    )
    assert all(c["status"] == 200 for c in publishes(cluster, mark))  # everything else flows
    cluster.wait_for(
        lambda: sum(gauge(cluster, name, "malformed") for name in WORKERS) >= 3, 2, "give-backs"
    )


# ---- step 7: slow looks like dead --------------------------------------------------------


def test_a_worker_slower_than_the_visibility_timeout_gets_redeliveries(
    cluster: LocalCluster,
) -> None:
    configure(cluster, "producer", rps=2.0)
    mark = cluster.mark()
    for name in WORKERS:
        configure(cluster, name, work_ms=1500.0)
    again = cluster.wait_event("broker", "state", mark, timeout=5, event="redelivered")
    assert "not acknowledged in time" in again["previous"]
    cluster.wait_for(lambda: workers(cluster, "duplicate_skipped", mark), 5, "a duplicate")
    cluster.wait_for(
        lambda: sum(gauge(cluster, name, "late_acks") for name in WORKERS) >= 1, 5, "a late ack"
    )
    assert all(n.running for n in cluster.nodes.values())  # no fault at all


# ---- step 8: acknowledging first loses the order -----------------------------------------


def test_acknowledging_before_processing_loses_a_killed_workers_order(
    cluster: LocalCluster,
) -> None:
    configure(cluster, "producer", rps=4.0)
    for name in WORKERS:
        configure(cluster, name, work_ms=600.0, ack="before processing")
    victim = holding_worker(cluster)
    killed = cluster.mark()
    cluster.kill(victim)
    cluster.wait_for(lambda: cluster.mark() > killed + 2.5, 5, "two visibility timeouts")
    came_back = [
        e for e in events(cluster, "broker", "redelivered", killed)
        if e["previous"].startswith(victim)
    ]  # fmt: skip
    assert came_back == [], came_back
    lost = gauge(cluster, "auditor", "audited") - gauge(cluster, "broker", "orders_completed")
    assert lost >= 1  # audited, never completed, never coming back


# ---- step 5: one subscription stuck ------------------------------------------------------


def test_a_cut_off_auditor_backs_up_audit_only(cluster: LocalCluster) -> None:
    fault(cluster, "auditor", kind="partition", peers=["broker"])
    mark = cluster.mark()
    cluster.wait_for(lambda: gauge(cluster, "broker", "audit_depth") >= 30, 5, "audit backing up")
    assert gauge(cluster, "broker", "work_depth") <= 5
    assert all(c["status"] == 200 for c in publishes(cluster, mark))
    cluster.ctl("auditor", {"op": "clear"})
    cluster.wait_for(lambda: gauge(cluster, "broker", "audit_depth") <= 20, 5, "audit drained")


# ---- the spec ----------------------------------------------------------------------------


def test_the_spec_holds_the_numbers_the_chapter_uses(pattern: Pattern) -> None:
    assert [n.name for n in pattern.expand()] == NODES
    assert dict(pattern.params) == {
        "visibility_s": 5,
        "max_receives": 3,
        "max_depth": 10000,
        "work_ms": 100,
    }
    (profile,) = pattern.traffic
    assert (profile.node, profile.target, profile.rps) == ("producer", "broker", 10)
    assert pattern.users == ("producer",)
    defaults = {c.key: c.default for c in pattern.controls if c.node == "worker"}
    assert defaults == WORKER
    assert {c.key: c.default for c in pattern.controls if c.node == "broker"} == {
        "visibility_s": 5,
        "max_receives": 3,
        "max_depth": 10000,
    }
    scale = pattern.control("workers")
    assert scale is not None and scale.kind == "scale"
