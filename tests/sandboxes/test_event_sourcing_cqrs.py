"""The event-sourcing-cqrs pattern end to end, as local processes: client → commands →
event-store ← projector-balances, projector-history ← client.

Each test checks one step of chapter 4's "Try it in the sandbox" against the nodes' own
telemetry, at the spec's rates (20 commands/s, 10 queries/s to each read model) and
params (a projector applies an event in 10 ms, reads 10 at a time, polls every 0.25 s
when it has everything; a read model waits at most 1 s for a query's position).

One sandbox serves the whole module; after each test everything is put back (nodes
restarted and resumed, faults cleared, settings reset, both projectors caught up).
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
from sandboxes.runtime.testing import LocalCluster, wait_for
from tests.sandboxes.helpers import (
    assert_quiet,
    assert_well_formed,
    configure,
    fault,
    get,
    put_back,
)

PATTERN = "event-sourcing-cqrs"
PROJECTORS = ["projector-balances", "projector-history"]
NODES = ["event-store", "commands", *PROJECTORS, "client"]
ACCOUNTS = [f"acct-{n}" for n in range(1, 6)]
RPS = 20  # commands a second: with ~no refusals, events a second
CAPACITY = 100  # events a second a projector applies (apply_ms 10)
WAIT_LIMIT_S = 1.0  # rw_wait_s
BATCH = 10
DEPOSIT, WITHDRAW = "/accounts/{account}/deposit", "/accounts/{account}/withdraw"
BALANCE, STATEMENT = "/balances/{account}", "/statements/{account}"
COMMANDS = (DEPOSIT, WITHDRAW)
DEFAULTS: dict[str, dict[str, Any]] = {
    "client": {"rps": RPS, "query_rps": 10, "read_your_writes": "off", "writers": 1},
    "commands": {"check_version": True},
    "projector-balances": {"consuming": True, "apply_ms": 10},
    "projector-history": {"consuming": True, "apply_ms": 10},
}


@pytest.fixture(scope="module")
def pattern() -> Pattern:
    return load_pattern(PATTERN)


def status(cluster: LocalCluster, name: str) -> dict[str, Any]:
    return cluster.ctl(name, {"op": "state"})["status"]


def wait_caught_up(cluster: LocalCluster, timeout: float = 15) -> None:
    def caught_up() -> bool:
        states = [status(cluster, p) for p in PROJECTORS]
        return all(s["state"] == "caught-up" and s["lag"] <= 2 * BATCH for s in states)

    cluster.wait_for(caught_up, timeout, "both projectors caught up")


@pytest.fixture(scope="module")
def sandbox(pattern: Pattern) -> Iterator[LocalCluster]:
    with LocalCluster(PATTERN, pattern.expand()) as cluster:
        cluster.wait_started()
        cluster.wait_event("client", "call", timeout=10, route=STATEMENT, status=200)
        wait_caught_up(cluster)
        yield cluster


@pytest.fixture
def cluster(sandbox: LocalCluster) -> Iterator[LocalCluster]:
    yield sandbox
    put_back(sandbox, NODES)
    for name, settings in DEFAULTS.items():
        configure(sandbox, name, **settings)
    wait_caught_up(sandbox)
    assert_quiet(sandbox)


def calls(
    cluster: LocalCluster,
    name: str,
    since: float,
    until: float | None = None,
    routes: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """``name``'s calls on ``routes`` that started at or after ``since`` (and, with
    ``until``, ended before it)."""
    return [
        c
        for c in cluster.events(name, "call", since)
        if c["ts"] - c["ms"] / 1000 >= since
        and (until is None or c["ts"] <= until)
        and (routes is None or c["route"] in routes)
    ]


def window(cluster: LocalCluster, seconds: float) -> tuple[float, float]:
    """Let traffic run for ``seconds`` (measuring a fixed window, not waiting for
    something); return its start and end, once the telemetry of the window is in."""
    start = cluster.mark()
    time.sleep(seconds)
    end = cluster.mark()

    def arrived() -> bool:  # lines arrive up to ~0.1 s after the fact
        return all(cluster.events(name, since=end) for name in ("client", "commands"))

    cluster.wait_for(arrived, 2, "the window's telemetry")
    return start, end


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def statuses(made: list[dict[str, Any]]) -> Counter[int]:
    return Counter(c["status"] for c in made)


def assert_succeed(commands: list[dict[str, Any]]) -> None:
    """Every command answered; at most 3 % refused (422: a withdrawal the client based on a
    balance that another of its commands, still in flight, was about to change)."""
    counts = statuses(commands)
    assert commands and set(counts) <= {200, 422}, counts
    assert counts[422] <= 0.03 * len(commands), counts


def gauge(cluster: LocalCluster, name: str, key: str, since: float) -> list[tuple[float, float]]:
    """(ts, value) of a gauge from ``since`` on: the value it had then (a gauge is written
    only when it changes), then each change."""
    writes = [
        (e["ts"], e["values"][key]) for e in cluster.events(name, "gauges") if key in e["values"]
    ]
    before = [(since, v) for ts, v in writes if ts < since][-1:]
    return before + [(ts, v) for ts, v in writes if ts >= since]


def program_events(
    cluster: LocalCluster, name: str, event: str, since: float
) -> list[dict[str, Any]]:
    return [e for e in cluster.events(name, "state", since) if e["event"] == event]


def reads_per_s(cluster: LocalCluster, name: str, start: float, end: float) -> float:
    return len(calls(cluster, name, start, end, ("/events",))) / (end - start)


def span(caught_up: dict[str, Any]) -> tuple[float, float]:
    """When a catch-up (or rebuild) announced by a ``caught_up`` event ran."""
    return caught_up["ts"] - caught_up["seconds"], caught_up["ts"]


def head(cluster: LocalCluster) -> int:
    return int(json.loads(get(cluster.nodes["event-store"].address, "/head").body)["head"])


def quiet_log(cluster: LocalCluster) -> int:
    """Once commands stopped: the head, when no command is in flight and it stays put."""
    seen: list[int] = []

    def still() -> int | None:
        seen.append(head(cluster))
        idle = cluster.ctl("commands", {"op": "state"})["in_flight"] == 0
        return seen[-1] if idle and seen[-2:] == [seen[-1]] * 2 else None

    return wait_for(still, 5, interval=0.2, what="a quiet log")


# ---- 1. both read models stay a few events behind the log -----------------------------------


def test_it_flows_commands_into_the_log_and_both_read_models_follow(
    cluster: LocalCluster,
) -> None:
    start, end = window(cluster, 3)
    client = calls(cluster, "client", start, end)
    by_route = Counter(c["route"] for c in client)
    assert_succeed([c for c in client if c["route"] in COMMANDS])
    queries = [c for c in client if c["route"] not in COMMANDS]
    assert statuses(queries) == {200: len(queries)}
    assert 0.85 * RPS * 3 <= by_route[DEPOSIT] + by_route[WITHDRAW] <= 1.15 * RPS * 3, by_route
    assert by_route[BALANCE] >= 25 and by_route[STATEMENT] >= 25, by_route
    # Each command loads its stream, then appends to it.
    store = Counter(c["method"] for c in calls(cluster, "commands", start, end))
    sent = by_route[DEPOSIT] + by_route[WITHDRAW]
    assert store["GET"] >= sent and store["POST"] >= sent, (store, sent)
    for projector in PROJECTORS:
        # Polling every 0.25 s, plus the time to read and apply ~6 events: about 3 reads/s.
        assert 2 <= reads_per_s(cluster, projector, start, end) <= 4.5
        lags = [v for _, v in gauge(cluster, projector, "lag", start)]
        # 20 events/s for 0.25 s between polls: zero or a few events behind, never more.
        assert lags and max(lags) <= BATCH, (projector, lags)

    # With commands stopped, both read models agree with a replay of the store.
    configure(cluster, "client", rps=0)
    last = quiet_log(cluster)
    for account in ACCOUNTS:
        address = cluster.nodes["event-store"].address
        stream = json.loads(get(address, f"/streams/{account}").body)["events"]
        deposits = sum(e["data"]["amount"] for e in stream if e["type"] == "MoneyDeposited")
        withdrawals = sum(e["data"]["amount"] for e in stream if e["type"] == "MoneyWithdrawn")
        asked = f"{account}?min_position={last}"
        read = json.loads(
            get(cluster.nodes["projector-balances"].address, f"/balances/{asked}").body
        )
        assert read["balance"] == deposits - withdrawals
        lines = json.loads(
            get(cluster.nodes["projector-history"].address, f"/statements/{asked}").body
        )
        assert lines["entries"] == len(stream) - 1  # all but AccountOpened


# ---- 5. a killed projector rebuilds from position 1 ----------------------------------------
# (Early in the module, while the log is short: a rebuild takes log length / (100 - 20) s.)


def test_it_rebuilds_a_killed_projector_from_position_one(cluster: LocalCluster) -> None:
    # A log of 100 events or more to replay (a cluster just started has fewer).
    cluster.wait_for(lambda: head(cluster) >= 100, 30, "100 events in the log")
    idle = reads_per_s(cluster, "projector-history", *window(cluster, 2))
    cluster.kill("projector-history")
    restarted = cluster.mark()
    cluster.restart("projector-history")
    log = head(cluster)
    rebuilt = cluster.wait_event(
        "projector-history", "state", restarted, timeout=30, event="caught_up"
    )
    assert rebuilt["was"] == "rebuilding" and rebuilt["from_position"] == 1
    assert rebuilt["applied"] >= log >= 100  # the whole log, replayed
    states = [e["value"] for e in program_events(cluster, "projector-history", "set", restarted)]
    assert states[:2] == ["rebuilding", "caught-up"]
    # A rebuild reads batch after batch: the link to event-store carries 2-3x its idle reads.
    burst = reads_per_s(cluster, "projector-history", *span(rebuilt))
    assert burst >= 2 * idle, (burst, idle)
    assert 0.7 * CAPACITY <= rebuilt["rate"] <= 1.05 * CAPACITY, rebuilt  # 0.7: a busy machine
    expected_s = log / (CAPACITY - RPS)
    assert 0.6 * expected_s <= rebuilt["seconds"] <= 1.5 * expected_s, (rebuilt, expected_s)
    after = rebuilt["ts"] + 0.3
    lags = cluster.wait_for(
        lambda: [v for _, v in gauge(cluster, "projector-history", "lag", after)[1:]],
        2,
        "a lag reading after the rebuild",
    )
    assert max(lags) <= BATCH, lags


# ---- 2. a stopped projector falls behind steadily, then catches up ----------------------


def test_it_keeps_commands_going_while_history_stops_then_catches_up(
    cluster: LocalCluster,
) -> None:
    idle = reads_per_s(cluster, "projector-history", *window(cluster, 1.5))
    configure(cluster, "projector-history", consuming=False)
    start, end = window(cluster, 5)

    client = calls(cluster, "client", start, end)
    commands = [c for c in client if c["route"] in COMMANDS]
    assert_succeed(commands)  # commands never wait for a projector
    assert p([c["ms"] for c in commands], 0.5) < 30
    balances = [c for c in client if c["route"] == BALANCE]
    assert statuses(balances) == {200: len(balances)}  # balances stay current
    # Statements still answer, from a model that lacks the client's own latest writes.
    statements = [c for c in client if c["route"] == STATEMENT]
    assert statuses(statements) == {200: len(statements)}
    # Each a summary of the second before it: from 2 s on, of ~10 statement queries a second
    # nearly all miss the client's own last write to that account.
    stale = [v for _, v in gauge(cluster, "client", "stale_statement_reads", start + 2.2)]
    assert stale and min(stale) >= 7, stale
    statement = json.loads(
        get(cluster.nodes["projector-history"].address, "/statements/acct-1").body
    )
    assert statement["checkpoint"] <= head(cluster) - 0.85 * RPS * 5  # older and older

    # The lag climbs at the rate events are appended: 20 a second.
    lag = gauge(cluster, "projector-history", "lag", start + 0.5)[1:]  # the writes only
    slope = (lag[-1][1] - lag[0][1]) / (lag[-1][0] - lag[0][0])
    heads = gauge(cluster, "event-store", "head", start + 0.5)[1:]
    appended = (heads[-1][1] - heads[0][1]) / (heads[-1][0] - heads[0][0])
    assert 0.9 * appended <= slope <= 1.1 * appended, (slope, appended)
    assert 0.85 * RPS <= slope <= 1.1 * RPS, slope
    lags = [v for _, v in gauge(cluster, "projector-balances", "lag", start)]
    assert max(lags) <= BATCH, lags

    resumed = cluster.mark()
    configure(cluster, "projector-history", consuming=True)
    done = cluster.wait_event("projector-history", "state", resumed, timeout=10, event="caught_up")
    # About N / (c - a): 100 behind, gaining 100 - 20 = 80 events a second.
    expected_s = done["behind"] / (CAPACITY - RPS)
    assert done["behind"] >= 0.85 * RPS * 5, done
    assert 0.7 * expected_s <= done["seconds"] <= 1.5 * expected_s, (done, expected_s)
    burst = reads_per_s(cluster, "projector-history", *span(done))
    assert burst >= 2 * idle, (burst, idle)


# ---- 3. read-your-writes: wait for position --------------------------------------------


def test_it_makes_statements_wait_for_their_position_then_fail(cluster: LocalCluster) -> None:
    configure(cluster, "client", read_your_writes="wait-for-position")
    start, end = window(cluster, 2)
    before = calls(cluster, "client", start, end, (BALANCE, STATEMENT))
    assert statuses(before) == {200: len(before)}
    # Waiting for the next poll: up to 0.25 s, plus reading and applying the batch.
    assert p([c["ms"] for c in before], 0.99) < 500

    configure(cluster, "projector-history", consuming=False)
    start, end = window(cluster, 4)
    # From a second on, every account has a write the stopped projector lacks (an account
    # written to 4 times a second goes a second without a write 1.2 % of the time).
    made = calls(cluster, "client", start + 1, end)
    statements = [c for c in made if c["route"] == STATEMENT]
    assert len(statements) >= 15
    assert statuses(statements)[503] >= 0.9 * len(statements), statuses(statements)
    assert set(statuses(statements)) <= {200, 503}  # 503: "retry shortly"
    ms = [c["ms"] for c in statements if c["status"] == 503]
    assert 1000 * WAIT_LIMIT_S <= p(ms, 0.5) <= p(ms, 0.99) <= 1000 * WAIT_LIMIT_S + 200
    balances = [c for c in made if c["route"] == BALANCE]
    assert statuses(balances) == {200: len(balances)}
    assert p([c["ms"] for c in balances], 0.99) < 500  # unaffected
    commands = [c for c in made if c["route"] in COMMANDS]
    assert_succeed(commands)


# ---- 4. a paused projector: its queries time out, the rest carries on ------------------------


def test_it_times_out_balance_queries_while_projector_balances_is_paused(
    cluster: LocalCluster,
) -> None:
    pid = cluster.nodes["projector-balances"].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        start, end = window(cluster, 4)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = cluster.mark()
    made = calls(cluster, "client", start, end)
    asked = calls(cluster, "client", start, end, (BALANCE,))  # sent and timed out while paused
    assert len(asked) >= 15
    assert {(c["status"], c["error"]) for c in asked} == {(0, "timeout")}
    assert min(c["ms"] for c in asked) >= 1990  # the client's 2 s timeout
    others = [c for c in made if c["route"] != BALANCE]
    assert statuses(others) == {200: len(others)}

    done = cluster.wait_event("projector-balances", "state", resumed, timeout=10, event="caught_up")
    assert done["was"] == "catching-up" and done["behind"] >= 0.85 * RPS * 4
    # It carried on from its checkpoint, not from position 1.
    assert done["from_position"] > 1
    assert done["seconds"] <= 1.5 * done["behind"] / (CAPACITY - RPS)
    answered = cluster.wait_event("client", "call", done["ts"], route=BALANCE, status=200)
    assert answered["ms"] < 200


# ---- 6. the write side and the read side fail independently ---------------------------


def test_it_slows_commands_with_latency_on_the_store_while_queries_stay_fast(
    cluster: LocalCluster,
) -> None:
    fault(cluster, "event-store", kind="latency", ms=200)
    start, end = window(cluster, 3)
    made = calls(cluster, "client", start, end)
    commands = [c for c in made if c["route"] in COMMANDS]
    # Load the stream (200 ms), append (200 ms), more after a version conflict.
    assert p([c["ms"] for c in commands], 0.5) >= 400
    assert statuses(commands)[200] >= 0.7 * len(commands), statuses(commands)
    queries = [c for c in made if c["route"] in (BALANCE, STATEMENT)]
    assert statuses(queries) == {200: len(queries)}
    assert p([c["ms"] for c in queries], 0.99) < 100
    # Slow commands overlap: even one writer per account now races with itself.
    conflicts = program_events(cluster, "commands", "conflicts", start)
    assert sum(e["count"] for e in conflicts) >= 5, conflicts


def test_it_fails_commands_when_the_store_is_partitioned_from_them(cluster: LocalCluster) -> None:
    fault(cluster, "event-store", kind="partition", peers=["commands"])
    start, end = window(cluster, 2)
    made = calls(cluster, "client", start, end)
    commands = [c for c in made if c["route"] in COMMANDS]
    assert statuses(commands) == {503: len(commands)}
    assert p([c["ms"] for c in commands], 0.99) < 500  # refused at once, not the 1-s store timeout
    lost = calls(cluster, "commands", start, end)
    assert lost and {c["error"] for c in lost} <= {"disconnected", "connect"}
    queries = [c for c in made if c["route"] in (BALANCE, STATEMENT)]
    assert statuses(queries) == {200: len(queries)}
    polls = calls(cluster, "projector-history", start, end, ("/events",))
    assert polls and statuses(polls) == {200: len(polls)}  # the projectors still read the log


# ---- conflicts under concurrent writers -------------------------------------------------


def test_it_turns_concurrent_writers_into_conflicts_and_retries(cluster: LocalCluster) -> None:
    configure(cluster, "client", writers=4)
    start, end = window(cluster, 3)
    commands = calls(cluster, "client", start, end, COMMANDS)
    assert set(statuses(commands)) <= {200, 422, 409}, statuses(commands)  # 422: refused
    assert statuses(commands)[422] >= 1  # the race of the chapter: reload, refuse
    # One summary a second, each about the second before it.
    summaries = [
        e
        for e in program_events(cluster, "commands", "conflicts", start + 1)
        if e["ts"] <= end + 0.1
    ]
    assert len(summaries) >= 2, summaries
    # 5 groups of 4 a second: at least 3 of each group lose the first race (15 a second).
    conflicts = sum(e["count"] for e in summaries)
    assert conflicts / len(summaries) >= 0.7 * 3 * RPS / 4, summaries
    assert sum(e["retried"] for e in summaries) >= 0.4 * conflicts, summaries
    assert not program_events(cluster, "projector-balances", "overdrawn", start)

    # Without the expected version, the racing withdrawals all pass the check.
    mark = cluster.mark()
    configure(cluster, "commands", check_version=False)
    overdrawn = cluster.wait_event(
        "projector-balances", "state", mark, timeout=8, event="overdrawn"
    )
    assert overdrawn["balance"] < 0
    # (each summary is about the second before it)
    assert not program_events(cluster, "commands", "conflicts", mark + 1.1)


# ---- the spec and the telemetry ----------------------------------------------------------


def test_the_spec_controls_match_what_the_nodes_declare(
    cluster: LocalCluster, pattern: Pattern
) -> None:
    for control in pattern.controls:
        assert control.node is not None and control.key is not None
        state = cluster.ctl(control.node, {"op": "state"})
        schema = state["config_schema"][control.key]
        assert state["config"][control.key] == control.default, control.id
        if control.kind == "choice":
            assert schema["type"] == "choice" and tuple(schema["choices"]) == control.choices
        elif control.kind == "toggle":
            assert schema["type"] == "bool"
        else:
            assert (schema["min"], schema["max"]) == (control.min, control.max)


def test_every_declared_gauge_state_and_table_is_reported(
    cluster: LocalCluster, pattern: Pattern
) -> None:
    observed = {name: cluster.ctl(name, {"op": "state"})["observed"] for name in NODES}
    for g in pattern.observe.gauges:
        for name in g.nodes:
            assert g.id in observed[name]["gauges"], (g.id, name)
    for s in pattern.observe.states:
        for name in s.nodes:
            assert observed[name]["states"][s.id] in s.values, (s.id, name)
    for t in pattern.observe.tables:
        rows = observed[t.node]["tables"][t.id]
        assert [r[t.columns[0].id] for r in rows] == ACCOUNTS, (t.id, rows)
        assert all(set(r) == {c.id for c in t.columns} for r in rows), rows
    declared = {e.id for e in pattern.observe.events}
    written = {
        e["event"]
        for name in NODES
        for e in cluster.events(name, "state")
        if e["event"] not in {"started", "stopped", "fault", "fault_cleared", "config", "set"}
    }
    assert written <= declared, written - declared


def test_every_telemetry_line_parses_and_carries_the_schema(cluster: LocalCluster) -> None:
    cluster.wait_event("client", "traffic", cluster.mark())
    assert_well_formed(cluster)
