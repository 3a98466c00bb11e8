"""The blue-green-canary pattern: client → router → blue-1..3 (version 1) and green-1..3
(version 2), and the analysis node moving the router's weight, as local processes. One
test per idea of chapter 11's "Try it in the sandbox": everything goes to blue at first;
a switch moves every request and back; a weight splits them, sticky users stay put;
version 2's bugs; a healthy canary climbs to 100%, a failing or slow one is rolled back
at its first step; a killed green replica is ejected and its refused requests retried; a
paused one shows as latency, then timeouts; a cut-off analysis holds the weight; too few
requests make a step wait; version 2's schema change, expanded, leaves version 1 working,
and in place breaks it for the users version 2 served. One sandbox serves the module, with
2-second canary steps and 30 green requests per step to keep it fast; after each test
everything is put back.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from apps.labs.patterns import Pattern, load_pattern
from sandboxes.runtime.testing import LocalCluster
from tests.sandboxes.helpers import assert_quiet, configure, fault, get, put_back

PATTERN = "blue-green-canary"
BLUE = ["blue-1", "blue-2", "blue-3"]
GREEN = ["green-1", "green-2", "green-3"]
NODES = ["db", *BLUE, *GREEN, "router", "analysis", "client"]
ROUTER = {"green_weight": 0, "canary": False, "sticky": False}
RPS = 100.0
FAST = {"min_requests": 30}  # per step, instead of 50 (0.8 ** 30: a 20% bug shows)


@pytest.fixture(scope="module")
def pattern() -> Pattern:
    return load_pattern(PATTERN)


@pytest.fixture(scope="module")
def sandbox(pattern: Pattern) -> Iterator[LocalCluster]:
    nodes = []
    for node in pattern.expand():
        params = {**json.loads(node.env["DISTLAB_PARAMS"]), **FAST}
        nodes.append(node._replace(env={**node.env, "DISTLAB_PARAMS": json.dumps(params)}))
    with LocalCluster(PATTERN, nodes) as cluster:
        cluster.wait_started()
        configure(cluster, "client", rps=RPS)
        configure(cluster, "analysis", step_s=2)
        cluster.wait_for(lambda: calls(cluster, cluster.mark() - 1), 10, "traffic")
        yield cluster


@pytest.fixture
def cluster(sandbox: LocalCluster) -> Iterator[LocalCluster]:
    yield sandbox
    put_back(sandbox, NODES)
    configure(sandbox, "router", **ROUTER)
    configure(sandbox, "client", rps=RPS)
    configure(sandbox, "analysis", step_s=2)
    for name in GREEN:
        configure(sandbox, name, bug="none")
    assert_quiet(sandbox)


def calls(cluster: LocalCluster, since: float) -> list[dict[str, Any]]:
    """The client's requests that ended since ``since``."""
    return cluster.events("client", "call", since)


def wait_calls(cluster: LocalCluster, since: float, count: int) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        made = calls(cluster, since)
        return made if len(made) >= count else None

    return cluster.wait_for(enough, 10, f"{count} client calls")[:count]


def versions(cluster: LocalCluster, since: float) -> Counter[str]:
    """Which replicas the router's answered calls went to, by colour."""
    return Counter(
        c["dst"].rpartition("-")[0]
        for c in cluster.events("router", "call", since)
        if c["dst"] != "analysis" and c["status"]
    )


def analysis_events(cluster: LocalCluster, event: str, since: float) -> list[dict[str, Any]]:
    return [e for e in cluster.events("analysis", "state", since) if e["event"] == event]


def weight(cluster: LocalCluster) -> float:
    return float(cluster.ctl("router", {"op": "state"})["observed"]["gauges"]["green_weight"])


def ok(call: dict[str, Any]) -> bool:
    return bool(call["status"] == 200)


# ---- steps 1 and 2: all blue, then a switch to green and back -----------------------------


def test_everything_goes_to_blue_at_first(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    made = wait_calls(cluster, mark, 100)
    assert all(map(ok, made))
    assert set(versions(cluster, mark)) == {"blue"}  # green runs idle
    answer = get(cluster.nodes["router"].address, "/account/k7")
    assert answer.headers["X-Distlab-Version"] == "1"
    assert json.loads(answer.body)["balance"].count(".") == 1  # euros, as version 1 says


def requests_needed(cluster: LocalCluster) -> float:
    gauges = cluster.ctl("analysis", {"op": "state"})["observed"]["gauges"]
    return float(gauges.get("requests_needed", 0))


def test_the_analysis_says_how_many_requests_a_one_point_rise_takes_to_see(
    cluster: LocalCluster,
) -> None:
    # Blue fails nothing: (1.96 + 0.84)^2 * 0.99% / (1%)^2 = 777 requests per version.
    cluster.wait_for(lambda: requests_needed(cluster) == 777, 5, "777 at rest")
    for name in BLUE:  # 5% for 6 s of the last 20 s
        fault(cluster, name, kind="errors", rate=0.05, status=500)
    time.sleep(6)
    for name in BLUE:
        cluster.ctl(name, {"op": "clear"})
    # The same sample size worked out here from blue's figures at the router.
    since = time.time() - 20
    stats = json.loads(get(cluster.nodes["router"].address, f"/stats?since={since}").body)
    p1 = stats["blue"]["error_pct"] / 100
    p2 = p1 + 0.01
    expected = (1.96 + 0.84) ** 2 * (p1 * (1 - p1) + p2 * (1 - p2)) / 0.01**2
    assert p1 > 0 and expected > 1000, stats  # errors on blue: more requests needed
    cluster.wait_for(
        lambda: abs(requests_needed(cluster) - expected) <= 0.15 * expected, 3, f"{expected:.0f}"
    )


def test_a_switch_moves_every_request_and_back(cluster: LocalCluster) -> None:
    configure(cluster, "router", green_weight=100)
    mark = cluster.mark() + 0.3  # requests sent before the switch have come back
    made = wait_calls(cluster, mark, 100)
    assert all(map(ok, made))  # nobody notices
    assert set(versions(cluster, mark)) == {"green"}
    body = json.loads(get(cluster.nodes["router"].address, "/account/k7").body)
    assert body["version"] == 2 and body["currency"] == "EUR"
    configure(cluster, "router", green_weight=0)
    back = cluster.mark() + 0.3
    assert all(map(ok, wait_calls(cluster, back, 100)))
    assert set(versions(cluster, back)) == {"blue"}


def test_a_weight_splits_requests_and_sticky_users_stay_on_one_version(
    cluster: LocalCluster,
) -> None:
    configure(cluster, "router", green_weight=25)
    mark = cluster.mark() + 0.3
    wait_calls(cluster, mark, 400)
    split = versions(cluster, mark)
    assert 0.17 <= split["green"] / sum(split.values()) <= 0.33, split
    address = cluster.nodes["router"].address
    seen = {get(address, "/account/k42").headers["X-Distlab-Version"] for _ in range(30)}
    assert seen == {"1", "2"}  # weighed request by request, one user sees both
    configure(cluster, "router", sticky=True)
    for user in ("k1", "k2", "k3", "k42"):
        seen = {get(address, f"/account/{user}").headers["X-Distlab-Version"] for _ in range(10)}
        assert len(seen) == 1, (user, seen)


# ---- version 2's bug --------------------------------------------------------------------


def test_version_2_has_the_bug_the_learner_switches_on(cluster: LocalCluster) -> None:
    green = cluster.nodes["green-1"].address
    right = json.loads(get(green, "/v2/account/k9").body)["balance_cents"]
    configure(cluster, "green-1", bug="errors")
    statuses = Counter(get(green, "/v2/account/k9").status for _ in range(200))
    assert set(statuses) == {200, 500} and 20 <= statuses[500] <= 60, statuses  # 1 in 5
    configure(cluster, "green-1", bug="wrong answer")
    wrong = get(green, "/v2/account/k9")
    assert wrong.status == 200 and json.loads(wrong.body)["balance_cents"] == right // 100
    configure(cluster, "green-1", bug="slow")
    started = time.monotonic()
    assert get(green, "/v2/account/k9").status == 200
    assert time.monotonic() - started >= 0.3
    reply = cluster.ctl("blue-1", {"op": "config", "set": {"bug": "errors"}})
    assert not reply["ok"]  # version 1 has no bug to switch on


# ---- step 3 and 4: the canary ----------------------------------------------------------


def test_a_canary_that_looks_healthy_climbs_step_by_step_to_green(
    cluster: LocalCluster,
) -> None:
    for name in GREEN:  # a wrong answer with status 200: nothing the analysis measures
        configure(cluster, name, bug="wrong answer")
    mark = cluster.mark()
    configure(cluster, "router", canary=True)
    promoted = cluster.wait_event("analysis", "state", mark, timeout=30, event="promoted")
    steps = [e["weight"] for e in analysis_events(cluster, "step", mark)]
    assert steps == [5, 25, 50, 100]
    weights = [
        e["weight"] for e in cluster.events("router", "state", mark) if e["event"] == "weight"
    ]
    assert weights == [5, 25, 50, 100]
    assert len(analysis_events(cluster, "passed", mark)) == 4
    assert promoted["after_s"] >= 4 * 2  # four steps of 2 s at least
    assert weight(cluster) == 100
    rows = cluster.ctl("analysis", {"op": "state"})["observed"]["tables"]["steps"]
    assert [r["verdict"] for r in rows] == ["passed"] * 4
    assert all(r["green_requests"] >= 30 for r in rows)
    # The canary switched off: the learner's weight again (0), and the analysis idles.
    configure(cluster, "router", canary=False)
    assert weight(cluster) == 0


def test_a_failing_canary_is_rolled_back_at_its_first_step(cluster: LocalCluster) -> None:
    for name in GREEN:
        configure(cluster, name, bug="errors")
    mark = cluster.mark()
    configure(cluster, "router", canary=True)
    rollback = cluster.wait_event("analysis", "state", mark, timeout=15, event="rollback")
    assert rollback["weight"] == 5
    assert (
        rollback["reason"].startswith("canary errors ") and "vs baseline 0.0%" in rollback["reason"]
    )
    cluster.wait_for(lambda: weight(cluster) == 0, 2, "green weight 0")
    after = cluster.mark() + 0.3
    wait_calls(cluster, after, 100)
    assert set(versions(cluster, after)) == {"blue"}
    state = cluster.ctl("analysis", {"op": "state"})["observed"]
    assert state["gauges"]["rollbacks"] == 1 and state["states"]["verdict"] == "rolled-back"


def test_a_slow_canary_is_rolled_back_on_its_p99(cluster: LocalCluster) -> None:
    fault(cluster, "green-1", kind="latency", ms=300)  # one replica of three
    mark = cluster.mark()
    configure(cluster, "router", canary=True)
    rollback = cluster.wait_event("analysis", "state", mark, timeout=15, event="rollback")
    assert rollback["reason"].startswith("canary p99 "), rollback
    # The median did not move: two green requests in three were as fast as blue's.
    green = [c for c in cluster.events("router", "call", mark) if c["dst"] in GREEN]
    fast = sorted(c["ms"] for c in green)[len(green) // 2]
    assert fast < 100, fast


def test_too_few_requests_make_a_step_wait(cluster: LocalCluster) -> None:
    configure(cluster, "client", rps=2)
    mark = cluster.mark()
    configure(cluster, "router", canary=True)
    waiting = cluster.wait_event("analysis", "state", mark, timeout=8, event="too_few")
    assert waiting["weight"] == 5 and waiting["requests"] < 30 and waiting["needed"] == 30
    assert weight(cluster) == 5  # held: neither on nor back


# ---- step 5 and 6: replicas that die or freeze, an analysis cut off ---------------------


def test_a_killed_green_replica_is_ejected_and_its_requests_go_elsewhere(
    cluster: LocalCluster,
) -> None:
    configure(cluster, "router", green_weight=100)
    wait_calls(cluster, cluster.mark() + 0.3, 20)
    killed = cluster.mark()  # before: the router may eject it while kill() waits for the exit
    cluster.kill("green-2")
    ejected = cluster.wait_event("router", "state", killed, timeout=3, event="ejected")
    # Dead, not slow: its connections are refused, or cut if one was in flight at the kill.
    assert ejected["target"] == "green-2" and ejected["reason"] in {"connect", "disconnected"}
    made = wait_calls(cluster, killed, 200)
    assert all(map(ok, made))  # refused requests were tried again on another replica


def test_a_paused_replica_shows_as_latency_then_timeouts(cluster: LocalCluster) -> None:
    configure(cluster, "router", green_weight=100)
    wait_calls(cluster, cluster.mark() + 0.3, 20)
    paused = cluster.mark()
    os.kill(cluster.nodes["green-3"].pid, signal.SIGSTOP)
    ejected = cluster.wait_event("router", "state", paused, timeout=3, event="ejected")
    assert ejected["target"] == "green-3" and ejected["reason"] == "timeout"
    made = wait_calls(cluster, paused, 150)
    slow = [c for c in made if c["status"] == 504]
    assert slow and all(c["ms"] >= 900 for c in slow)  # the router's 1-s timeout, each


def test_a_cut_off_analysis_holds_the_weight(cluster: LocalCluster) -> None:
    configure(cluster, "analysis", step_s=30)
    mark = cluster.mark()
    configure(cluster, "router", canary=True)
    cluster.wait_event("analysis", "state", mark, timeout=3, event="step", weight=5)
    fault(cluster, "analysis", kind="partition", peers=["router"])
    cut = cluster.mark()
    holding = cluster.wait_event("analysis", "state", cut, timeout=3, event="holding")
    assert holding["weight"] == 5 and holding["reason"] == "partitioned"
    configure(cluster, "analysis", step_s=2)  # it would move on now, if it could
    cluster.wait_for(lambda: cluster.mark() > cut + 3, 4)
    assert weight(cluster) == 5
    assert not analysis_events(cluster, "passed", mark)


# ---- the spec ----------------------------------------------------------------------------


def blue_statuses(cluster: LocalCluster, since: float) -> Counter[int]:
    return Counter(r["status"] for name in BLUE for r in cluster.events(name, "request", since))


def test_an_expanded_schema_keeps_version_1_working_and_one_changed_in_place_breaks_it(
    cluster: LocalCluster,
) -> None:
    try:
        for how in ("expand", "in place"):
            cluster.restart("db")  # every row back in version 1's shape
            for name in GREEN:
                configure(cluster, name, migration=how)
            configure(cluster, "router", green_weight=100)
            time.sleep(2)  # about 200 requests: version 2 migrates the rows it reads
            configure(cluster, "router", green_weight=0)
            time.sleep(0.5)
            since = cluster.mark()
            time.sleep(2)
            statuses = blue_statuses(cluster, since)
            rows = {r["shape"]: r["rows"] for r in table(cluster, "db", "rows")}
            if how == "expand":
                assert set(statuses) == {200}, statuses
                assert rows["balance and balance_cents (expanded)"] >= 100, rows
                assert rows["balance_cents only (version 2's)"] == 0, rows
                continue
            # One user in five or six was served by version 2: version 1 fails them now.
            failed = statuses[500] / sum(statuses.values())
            assert set(statuses) == {200, 500} and 0.08 <= failed <= 0.35, statuses
            assert rows["balance_cents only (version 2's)"] >= 100, rows
    finally:
        cluster.restart("db")
        for name in GREEN:
            configure(cluster, name, migration="expand")


def table(cluster: LocalCluster, node: str, table_id: str) -> list[dict[str, Any]]:
    cluster.wait_for(
        lambda: table_id in cluster.ctl(node, {"op": "state"})["observed"]["tables"], 3, table_id
    )
    rows: list[dict[str, Any]] = cluster.ctl(node, {"op": "state"})["observed"]["tables"][table_id]
    return rows


def test_the_spec_holds_the_numbers_the_chapter_uses(pattern: Pattern) -> None:
    assert [n.name for n in pattern.expand()] == NODES
    assert dict(pattern.params) == {
        "work_ms": 5,
        "router_timeout_s": 1.0,
        "eject_s": 5,
        "min_requests": 50,
        "max_error_increase_pct": 1.0,
        "max_p99_increase_ms": 100,
    }
    (profile,) = pattern.traffic
    assert (profile.node, profile.target, profile.rps) == ("client", "router", 40)
    defaults = {c.id: c.default for c in pattern.controls}
    assert defaults == {
        "green_weight": 0,
        "canary": False,
        "step_s": 30,
        "sticky": False,
        "bug": "none",
        "migration": "expand",
        "rps": 40,
    }
