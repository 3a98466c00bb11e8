"""Chapter 9, "Try it in the sandbox": a checkout's trace is a waterfall of four services
whose log lines share its id; a dropped payment call puts p99 at about a second while p50
stays, and the slowest trace shows the 1-s call that failed; 200 ms on the way to
inventory raise p50 and p99 and show in every span above it; head sampling at 1% keeps
almost none of the failed traces, tail sampling all of them, and orders' log line explains
each; without propagation the trace falls apart; a dead collector costs users nothing and
its backlog arrives later. Then the pattern's three experiments.

Shortened for CI: faults of a few seconds, 10% of payments dropped or failing instead of
2% or 5%, at 40 checkouts a second in step 4. Tolerances: latencies as orders of
magnitude, shares of traces within a factor.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest
from celery import Celery

from apps.accounts.models import User
from apps.labs.inspect_views import log_lines, trace_list, waterfall
from sandboxes.runtime.testing import wait_for
from tests.walkthroughs.lab import Lab

pytestmark = pytest.mark.django_db(transaction=True)

SERVICES = {"gateway", "orders", "inventory", "payments"}


def test_chapter_9_walkthrough_and_experiments(
    walk_engine: str, learner: User, embedded_celery: Celery
) -> None:
    with Lab(learner, "tracing-logging") as lab:
        walk(lab)
        experiments(lab)


def traces_since(lab: Lab, since: float) -> list[Mapping[str, Any]]:
    return [t for t in lab.collected().get("traces") or [] if t["started"] >= since]


def wait_traces(lab: Lab, since: float, ok: Any, timeout: float = 15) -> list[Mapping[str, Any]]:
    def found() -> list[Mapping[str, Any]] | None:
        chosen = [t for t in traces_since(lab, since) if ok(t)]
        return chosen or None

    return wait_for(found, timeout, what="traces")


def logs_of(lab: Lab, trace_id: str, service: str = "") -> list[Mapping[str, Any]]:
    lines = lab.collected().get("logs") or []
    return log_lines(lines, service=service, level="", trace=trace_id, text="")


def walk(lab: Lab) -> None:
    # 1. Any trace: a waterfall of four services; inventory's log line found by trace id.
    start = time.time()
    trace = wait_traces(lab, start, lambda t: len(t["spans"]) == 7)[0]
    rows = waterfall(trace)
    assert {r["service"] for r in rows} == SERVICES
    assert [r["depth"] for r in rows] == [0, 1, 2, 3, 4, 3, 4]  # call → callee, nested
    assert rows[0]["left"] == 0 and rows[0]["width"] >= 95  # the root spans the trace
    wait_for(lambda: logs_of(lab, trace["trace_id"], "inventory"), 5, what="inventory's line")
    assert {line["service"] for line in logs_of(lab, trace["trace_id"])} == SERVICES

    # 2. Payments drops 10% of its calls: p99 about a second, p50 as before; the slowest
    # trace holds a 1-s call to payments that failed.
    dropped = time.time()
    drop = lab.fault("payments", "drop", duration=30, rate=0.1)
    users = lab.watch(5, settle=1).users()
    assert (users.p99_ms or 0) >= 900 and (users.p50_ms or 0) < 100, users
    slowest = wait_traces(lab, dropped, lambda t: t["status"] == "error")
    slowest = trace_list(slowest, "slow")[0]
    call = next(s for s in slowest["spans"] if s["name"] == "call payments")
    assert call["status"] == "error" and 900 <= call["ms"] <= 1400, call
    lab.revert(drop)

    # 3. 200 ms on the way to inventory: p50 and p99 rise; in a trace, every span above
    # inventory grew, inventory's own did not.
    slow = lab.fault("inventory", "latency", duration=30, ms=200)
    slowed = time.time() + 0.5
    users = lab.watch(3, settle=1).users()
    assert (users.p50_ms or 0) >= 200 and (users.p99_ms or 0) >= 200, users
    trace = wait_traces(lab, slowed, lambda t: len(t["spans"]) == 7)[0]
    ms = {s["name"]: s["ms"] for s in trace["spans"]}
    assert ms["call inventory"] >= 200 and ms["gateway /checkout"] >= 200, ms
    assert ms["inventory /checkout"] < 100, ms
    lab.revert(slow)

    # 4. Head 1% and 10% of payments failing: the error % chart shows them, the trace list
    # almost none. Tail sampling: every failure, and orders' log line explains it.
    lab.control("rps", 40)
    lab.control("sampling", "head 1%")
    failing = lab.fault("payments", "errors", duration=60, rate=0.1, status=503)
    head = time.time()
    users = lab.watch(5, settle=0.5).users()
    assert 5 <= users.error_pct <= 16, users
    time.sleep(3)  # the last traces are complete
    kept = [t for t in traces_since(lab, head) if t["status"] == "error"]
    assert len(kept) <= 0.3 * users.errors, (len(kept), users.errors)
    lab.control("sampling", "tail")
    tail = time.time() + 0.5
    users = lab.watch(4, settle=0.5).users()
    time.sleep(3)
    kept = [t for t in traces_since(lab, tail) if t["status"] == "error"]
    assert len(kept) >= 0.7 * users.errors and users.errors > 0, (len(kept), users.errors)
    lines = wait_for(
        lambda: logs_of(lab, kept[0]["trace_id"], "orders"), 5, what="orders' log line"
    )
    assert lines[0]["level"] == "error" and "payments failed" in lines[0]["msg"], lines
    assert "status 503" in lines[0]["msg"]
    lab.revert(failing)
    lab.control("sampling", "head 100%")
    lab.control("rps", 20)

    # 5. Propagation off in orders: inventory and payments start traces of their own.
    lab.control("propagation", False)
    apart = time.time() + 0.5
    # Each part is complete 2 s after its own last span: the gateway's, which lasts
    # longest, may come after the others.
    apart_roots = {"gateway /checkout", "inventory /checkout", "payments /checkout"}
    wait_for(
        lambda: apart_roots <= {t["root"] for t in traces_since(lab, apart)},
        15,
        what="traces rooted at gateway, inventory and payments",
    )
    lab.control("propagation", True)

    # 6. The collector killed: users see nothing; the services' buffers grow, and what
    # they held arrives once it is back.
    killed = time.time()
    kill = lab.fault("collector", "kill", duration=6)
    down = lab.watch(4, settle=0.5)
    assert down.users().errors == 0, down.users()
    assert max(down.gauge("gateway", "buffered")) >= 100
    lab.revert(kill)
    lab.wait_until_up("collector")
    wait_traces(lab, killed + 1, lambda t: t["started"] <= killed + 3, timeout=15)


def experiments(lab: Lab) -> None:
    run = lab.experiment("slow-inventory", "inventory-only")
    m = run.measured
    assert run.correct is False and m["slow_p50_ms"] >= 200, m
    assert lab.verdicts(run)["path"].correct

    run = lab.experiment("rare-errors", "almost-none")
    m = run.measured
    assert run.correct is True and m["last"] <= 2, m
    assert not lab.verdicts(run)["all"].correct

    run = lab.experiment("collector-down", "carry-on")
    m = run.measured
    assert run.correct is True and m["down_error_pct"] == 0, m
    assert "a gap in the traces, never in the service" in run.explanation
