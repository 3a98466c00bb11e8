"""The aggregator's arithmetic, from synthetic telemetry lines (no sandbox, no sleeps)."""

from __future__ import annotations

from typing import Any

from apps.labs.patterns import load_pattern
from apps.labs.telemetry import (
    MAX_FRESH_CALLS,
    MAX_RECORDS,
    Aggregator,
    NodeView,
    latency_bucket,
    parse_line,
)

T0 = 1_800_000_000.0
NODES = [
    NodeView("replica-1", "replica", "running"),
    NodeView("replica-2", "replica", "running"),
    NodeView("lb", "balancer", "running"),
    NodeView("traffic", "client", "running"),
]


def call(src: str, dst: str, ts: float, status: int = 200, ms: float = 10.0, route: str = "/"):  # type: ignore[no-untyped-def]
    return {"v": 1, "ts": ts, "node": src, "type": "call", "src": src, "dst": dst,
            "method": "GET", "route": route, "status": status, "ms": ms,
            "error": None if status else "connect"}  # fmt: skip


def request(src: str, dst: str, ts: float, status: int = 200, ms: float = 5.0, route: str = "/"):  # type: ignore[no-untyped-def]
    return {"v": 1, "ts": ts, "node": dst, "type": "request", "src": src, "dst": dst,
            "method": "GET", "route": route, "status": status, "ms": ms}  # fmt: skip


def state(node: str, ts: float, event: str, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "ts": ts, "node": node, "type": "state", "event": event, **fields}


# The replicated-lb pattern's declarations: traffic's calls are what users see, the
# balancer's calls on /health are probes, and its `ejected` events mark replicas.
SPEC = load_pattern("replicated-lb").telemetry_spec()


def aggregator() -> Aggregator:
    agg = Aggregator(SPEC, window=1.0, lag=0.0)
    agg.update_status(nodes=NODES, faults=[], now=T0)
    return agg


def test_it_computes_rates_errors_and_percentiles() -> None:
    agg = aggregator()
    # 100 traffic calls in the second before T0+10: 10 failed, latencies 1..100 ms.
    lines = []
    for i in range(100):
        ts = T0 + 9 + (i + 0.5) / 100
        status = 502 if i % 10 == 0 else 200
        lines.append(call("traffic", "lb", ts, status=status, ms=float(i + 1)))
        lines.append(request("traffic", "lb", ts, status=status, ms=float(i + 1)))
        replica = "replica-1" if i % 2 else "replica-2"
        if status == 200:
            lines.append(call("lb", replica, ts, ms=2.0))
            lines.append(request("lb", replica, ts, ms=1.0))
    lines.append(call("lb", "replica-1", T0 + 9.5, route="/health", status=0, ms=0.5))
    lines.append(request("lb", "replica-1", T0 + 9.6, route="/health"))
    lines.append(call("traffic", "lb", T0 + 5))  # outside the window
    agg.ingest_many(lines)
    frame = agg.frame(T0 + 10)

    assert frame["type"] == "frame" and frame["v"] == 1 and frame["seq"] == 1
    traffic = frame["nodes"]["traffic"]
    assert traffic["rps"] == 100.0 and traffic["error_pct"] == 10.0
    assert traffic["p50_ms"] == 50.0 and traffic["p99_ms"] == 99.0
    assert frame["nodes"]["lb"]["rps"] == 100.0
    assert frame["nodes"]["replica-1"]["rps"] == 50.0  # health checks are not traffic
    assert frame["nodes"]["replica-2"]["rps"] == 40.0  # the failures were its turns
    assert frame["totals"] == {"rps": 100.0, "error_pct": 10.0, "p50_ms": 50.0, "p99_ms": 99.0}
    # Little's law: 100 requests of 50.5 ms on average in one second.
    assert frame["nodes"]["lb"]["in_flight"] == 5.05

    link = frame["links"]["lb>replica-1"]
    assert link["rps"] == 50.0 and link["error_pct"] == 0.0 and link["p99_ms"] == 2.0
    assert link["probe_rps"] == 1.0 and link["probe_error_pct"] == 100.0
    assert frame["links"]["traffic>lb"]["error_pct"] == 10.0
    assert all(n["state"] == "up" for n in frame["nodes"].values())


def test_traced_requests_carry_their_trace_to_the_dots_and_the_p99_points() -> None:
    """A call line's W3C trace id goes with its dot; each figure set names its slowest
    traced request, the one a click on a p99 point opens; a malformed id is dropped."""
    agg = aggregator()
    slow, fast = "a" * 32, "b" * 32
    agg.ingest_many([
        call("traffic", "lb", T0 + 0.2, ms=900.0) | {"trace": slow},
        call("traffic", "lb", T0 + 0.3, ms=5.0) | {"trace": fast},
        call("traffic", "lb", T0 + 0.4, ms=2000.0),  # slower, but not traced
        call("traffic", "lb", T0 + 0.5, ms=3000.0) | {"trace": "<script>" + "a" * 24},
        call("lb", "replica-1", T0 + 0.6) | {"trace": "B" * 32},  # not lowercase hex
    ])  # fmt: skip
    frame = agg.frame(T0 + 1)
    assert [s.get("trace") for s in frame["sample"]] == [slow, fast, None, None, None]
    assert frame["totals"]["slow_trace"] == slow
    assert frame["links"]["traffic>lb"]["slow_trace"] == slow
    assert "slow_trace" not in frame["links"]["lb>replica-1"]
    point = agg.snapshot(T0 + 2)["history"][-1]
    assert point["totals"]["slow_trace"] == slow


def test_the_sample_is_capped_fresh_and_excludes_health_checks() -> None:
    agg = aggregator()
    agg.ingest_many(call("traffic", "lb", T0 + i / 1000) for i in range(500))
    agg.ingest(call("lb", "replica-1", T0 + 0.6, route="/health"))
    first = agg.frame(T0 + 1)
    assert len(first["sample"]) == 40
    assert set(first["sample"][0]) == {"src", "dst", "status", "ms", "ts"}
    assert all(s["dst"] == "lb" for s in first["sample"])
    assert [s["ts"] for s in first["sample"]] == sorted(s["ts"] for s in first["sample"])
    agg.ingest(call("traffic", "lb", T0 + 1.1, status=0))
    assert [s["status"] for s in agg.frame(T0 + 1.2)["sample"]] == [0]
    assert agg.frame(T0 + 1.3)["sample"] == []


def test_the_history_has_a_point_per_second_and_is_bounded() -> None:
    agg = Aggregator(SPEC, window=1.0, lag=0.0, history_seconds=300)
    agg.update_status(nodes=NODES, faults=[], now=T0)
    for second in range(400):
        agg.ingest_many(call("traffic", "lb", T0 + second + i / 10 + 0.05) for i in range(10))
        agg.frame(T0 + second + 1.0)
    history = agg.snapshot(T0 + 401)["history"]
    assert len(history) == 300
    assert [p["ts"] for p in history] == list(range(int(T0) + 101, int(T0) + 401))
    assert history[-1]["totals"]["rps"] == 10.0
    assert history[-1]["nodes"]["traffic"]["rps"] == 10.0
    assert set(history[-1]["nodes"]) == {"replica-1", "replica-2", "lb", "traffic"}


def test_it_turns_state_lines_into_events_and_node_states() -> None:
    agg = aggregator()
    events = agg.ingest(
        state("lb", T0 + 1, "ejected", target="replica-2", reason="failed 1 health check")
    )
    assert [(e["type"], e["kind"], e["node"]) for e in events] == [("event", "ejected", "lb")]
    assert events[0]["text"] == "lb ejected replica-2 (failed 1 health check)"
    assert events[0]["data"]["target"] == "replica-2" and events[0]["ts"] == T0 + 1
    assert agg.frame(T0 + 2)["nodes"]["replica-2"]["state"] == "ejected"

    events = agg.ingest(state("lb", T0 + 3, "readmitted", target="replica-2", reason="ok"))
    assert events[0]["text"] == "lb re-admitted replica-2 (ok)"
    assert agg.frame(T0 + 3)["nodes"]["replica-2"]["state"] == "up"

    # An event the pattern does not declare is logged plainly, and counted.
    events = agg.ingest(state("lb", T0 + 4, "policy", policy="random", previous="round-robin"))
    assert events[0]["text"] == "lb: policy"
    assert agg.snapshot(T0 + 4)["undeclared"] == {"event policy": 1}
    events = agg.ingest(state("replica-1", T0 + 5, "fault", kind="latency", params={"ms": 300.0}))
    assert [e["kind"] for e in events] == ["fault"]
    assert events[0]["text"] == "latency fault on replica-1 (ms=300.0)"
    # The platform's record of the same fault announces nothing more.
    same = [{"node": "replica-1", "kind": "latency", "params": {"ms": 300, "duration": 30}}]
    assert agg.update_status(nodes=NODES, faults=same, now=T0 + 5.5) == []
    assert agg.update_status(nodes=NODES, faults=[], now=T0 + 6) == []  # runtime still has it
    events = agg.ingest(state("replica-1", T0 + 7, "fault_cleared", kind="latency"))
    assert events[0]["text"] == "latency fault on replica-1 cleared"
    assert agg.ingest({"v": 1, "ts": T0, "node": "x", "type": "state", "event": "peers"}) == []


def test_engine_status_and_platform_faults_give_states_and_events() -> None:
    agg = aggregator()
    killed = [
        NodeView("replica-1", "replica", "running"),
        NodeView("replica-2", "replica", "exited", exit_code=-9),
        NodeView("lb", "balancer", "paused"),
        NodeView("traffic", "client", "running"),
    ]
    faults = [
        {"node": "replica-2", "kind": "kill", "params": {"duration": 30}},
        {"node": "replica-1", "kind": "partition", "params": {"duration": 30}},
    ]
    events = agg.update_status(nodes=killed, faults=faults, now=T0 + 1)
    texts = {e["text"] for e in events}
    assert texts == {
        "replica-2 is down (exit code -9)",
        "lb is paused",
        "kill fault on replica-2 (for 30 s)",
        "partition fault on replica-1 (for 30 s)",
    }
    states = {name: node["state"] for name, node in agg.frame(T0 + 2)["nodes"].items()}
    assert states == {
        "replica-1": "partitioned",
        "replica-2": "killed",
        "lb": "paused",
        "traffic": "up",
    }
    assert agg.frame(T0 + 2)["faults"] == [
        {"node": "replica-1", "kind": "partition"},
        {"node": "replica-2", "kind": "kill"},
    ]
    back = [*NODES[:3], NodeView("replica-3", "replica", "running")]
    events = agg.update_status(nodes=back, faults=[], now=T0 + 3)
    assert {(e["node"], e["kind"]) for e in events} == {
        ("replica-2", "up"),
        ("lb", "resumed"),
        ("replica-3", "added"),
        ("traffic", "removed"),
        ("replica-1", "fault_cleared"),
        ("replica-2", "fault_cleared"),
    }
    assert "traffic" not in agg.frame(T0 + 4)["nodes"]


def test_the_snapshot_keeps_the_last_hundred_events_and_a_resume_does_not_repeat_them() -> None:
    agg = aggregator()
    for i in range(150):
        agg.ingest(state("lb", T0 + i, "ejected", target=f"replica-{i}", reason="x"))
    agg.frame(T0 + 151)
    snapshot = agg.snapshot(T0 + 151)
    assert snapshot["type"] == "snapshot" and len(snapshot["events"]) == 100
    assert snapshot["events"][-1]["data"]["target"] == "replica-149"
    assert snapshot["nodes"]["lb"] == {"role": "balancer", "state": "up"}
    assert snapshot["frame"]["seq"] == 1

    resumed = Aggregator(SPEC, window=1.0, lag=0.0)
    resumed.resume(snapshot)
    assert resumed.ingest(state("lb", T0 + 149, "ejected", target="replica-149")) == []
    assert len(resumed.ingest(state("lb", T0 + 152, "ejected", target="replica-1"))) == 1
    assert resumed.snapshot(T0 + 153)["history"] == snapshot["history"]
    # Faults the previous supervisor saw are not announced again; new ones are.
    kill = {"node": "replica-1", "kind": "kill", "params": {}}
    assert resumed.update_status(nodes=NODES, faults=[kill], now=T0 + 153) == []
    pause = {"node": "lb", "kind": "pause", "params": {}}
    events = resumed.update_status(nodes=NODES, faults=[kill, pause], now=T0 + 154)
    assert [(e["node"], e["kind"]) for e in events] == [("lb", "fault")]


def test_junk_lines_are_skipped() -> None:
    assert parse_line(b"not json") is None
    assert parse_line(b'{"v": 2, "ts": 1, "node": "a", "type": "request"}') is None
    assert parse_line(b"[1, 2]") is None
    assert parse_line(b'{"v": 1, "ts": 1.5, "node": "a", "type": "call"}') == {
        "v": 1, "ts": 1.5, "node": "a", "type": "call"}  # fmt: skip


def test_hostile_lines_are_refused_or_tamed() -> None:
    """A node's output is untrusted: none of these may raise or stop the aggregator's clock."""
    deep = b'{"v": 1, "ts": 1, "node": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert parse_line(deep) is None  # past the parser's depth: RecursionError before
    assert parse_line(b'{"v": 1, "ts": 1, "node": "a", "pad": "' + b"a" * 70_000 + b'"}') is None
    assert parse_line(b'{"v": 1, "ts": NaN, "node": "a"}') is None
    assert parse_line(b'{"v": 1, "ts": Infinity, "node": "a"}') is None
    assert parse_line(b'{"v": 1, "ts": true, "node": "a"}') is None
    assert parse_line(b"\xff\xfe") is None
    future = parse_line(b'{"v": 1, "ts": 1e20, "node": "a", "type": "call"}', now=T0)
    assert future is not None and future["ts"] == T0  # taken as now


def test_a_node_speaks_only_for_itself() -> None:
    """Calls a node reports are its own calls, requests its own requests, and its role is
    the engine's, whatever the line says."""
    agg = aggregator()
    agg.frame(T0)
    agg.ingest(state("traffic", T0 + 0.1, "started", role="<img src=x onerror=alert(1)>"))
    for i in range(20):  # the traffic node pretends the balancer failed 20 calls
        agg.ingest(call("lb", "replica-1", T0 + 0.2 + i / 100, status=500) | {"node": "traffic"})
        agg.ingest(request("traffic", "lb", T0 + 0.2 + i / 100, status=500) | {"node": "replica-2"})
    frame = agg.frame(T0 + 1.2)
    assert frame["nodes"]["traffic"]["role"] == "client"
    assert frame["nodes"]["lb"]["rps"] == 0 and frame["nodes"]["lb"]["error_pct"] == 0.0
    assert "lb>replica-1" not in frame["links"] and "traffic>replica-1" in frame["links"]
    assert frame["nodes"]["replica-2"]["rps"] >= 19  # its own (forged) requests: nobody else's
    assert frame["nodes"]["replica-2"]["error_pct"] == 100.0


# ---- what history points count, for the experiments' checks ------------------------------


def test_history_points_count_calls_errors_and_when_errors_happened() -> None:
    agg = aggregator()
    agg.frame(T0)  # the history starts here
    # Second T0+1 (lines in (T0, T0+1]): 10 user calls, 3 failed at known instants.
    failed_at = {2: T0 + 0.2345, 5: T0 + 0.55, 8: T0 + 0.8123}
    for i in range(10):
        ts = failed_at.get(i, T0 + 0.05 + i / 10)
        agg.ingest(call("traffic", "lb", ts, status=502 if i in failed_at else 200, ms=4.0))
        if i not in failed_at:
            agg.ingest(request("lb", "replica-1" if i % 2 else "replica-2", ts, ms=3.0))
    agg.ingest(call("lb", "replica-1", T0 + 0.5, route="/health", status=0))  # not a user call
    agg.ingest(request("lb", "replica-1", T0 + 0.6, status=500))
    # Second T0+2: nothing failed.
    agg.ingest(call("traffic", "lb", T0 + 1.5, ms=2.0))
    agg.frame(T0 + 2.0)
    first, second = [p for p in agg.snapshot(T0 + 2)["history"] if p["ts"] in (T0 + 1, T0 + 2)]

    totals = first["totals"]
    assert (totals["n"], totals["errors"]) == (10, 3)
    assert totals["first_error_ts"] == round(T0 + 0.2345, 4)
    assert totals["last_error_ts"] == round(T0 + 0.8123, 4)
    assert totals["ms_hist"] == [[latency_bucket(4.0), 10]]
    assert totals["rps"] == 10.0 and totals["error_pct"] == 30.0  # the existing fields stay
    replica = first["nodes"]["replica-1"]
    assert (replica["n"], replica["errors"]) == (5, 1)  # 4 served, 1 failed; no health checks
    assert (first["nodes"]["replica-2"]["n"], first["nodes"]["replica-2"]["errors"]) == (3, 0)
    assert first["nodes"]["traffic"]["n"] == 10 and first["nodes"]["traffic"]["errors"] == 3

    assert second["totals"]["n"] == 1 and second["totals"]["errors"] == 0
    assert second["totals"]["first_error_ts"] is None
    assert second["totals"]["last_error_ts"] is None
    assert second["totals"]["ms_hist"] == [[latency_bucket(2.0), 1]]


def test_an_empty_second_has_zero_counts_and_an_empty_histogram() -> None:
    agg = aggregator()
    agg.frame(T0 + 1.0)
    point = agg.snapshot(T0 + 1)["history"][-1]
    assert point["totals"] | {} == {
        "rps": 0.0,
        "error_pct": 0.0,
        "p50_ms": None,
        "p99_ms": None,
        "n": 0,
        "errors": 0,
        "first_error_ts": None,
        "last_error_ts": None,
        "ms_hist": [],
    }
    assert point["nodes"]["lb"] | {} == {
        "rps": 0.0,
        "error_pct": 0.0,
        "p50_ms": None,
        "p99_ms": None,
        "n": 0,
        "errors": 0,
        "state": "up",
        "in_flight": 0.0,
    }


def test_the_latency_histogram_is_sorted_and_close_to_the_real_latencies() -> None:
    agg = aggregator()
    latencies = [1.0, 5.0, 5.2, 48.0, 300.0, 305.0, 1500.0, 0.01]
    for i, ms in enumerate(latencies):
        agg.ingest(call("traffic", "lb", T0 + 0.1 + i / 20, ms=ms))
    agg.frame(T0 + 1.0)
    histogram = agg.snapshot(T0 + 1)["history"][-1]["totals"]["ms_hist"]
    assert [ms for ms, _ in histogram] == sorted(ms for ms, _ in histogram)
    assert sum(count for _, count in histogram) == len(latencies)
    assert dict(histogram)[latency_bucket(300.0)] == 2  # 300 and 305 ms share a bucket
    for ms in latencies[:-1]:
        assert abs(latency_bucket(ms) - ms) <= 0.03 * ms, ms  # the middle is within 3 %
    assert latency_bucket(0.01) == latency_bucket(0.1)  # tiny latencies share the first bucket
    # 40 buckets to a decade: an exact power of ten is the top of its bucket.
    assert latency_bucket(10.0) < 10.0 < latency_bucket(10.01)


def test_a_resumed_history_keeps_its_points_as_they_were() -> None:
    agg = aggregator()
    agg.ingest(call("traffic", "lb", T0 + 0.5, status=503))
    agg.frame(T0 + 1.0)
    snapshot = agg.snapshot(T0 + 1)
    again = Aggregator(SPEC, window=1.0, lag=0.0)
    again.resume(snapshot)
    assert again.snapshot(T0 + 1)["history"] == snapshot["history"]
    assert again.snapshot(T0 + 1)["history"][-1]["totals"]["errors"] == 1


# ---- what a pattern declares: users, probes, events, marks, gauges, states, tables --------

KV_SPEC: dict[str, Any] = {
    "roles": ["shard"],
    "users": ["client"],
    "probes": [{"from": "router", "to": "shard", "route": "/ping"}],
    "observe": {
        "events": {
            "keys_moved": {"text": "{node} moved {moved} keys ({function})", "severity": "warning"},
            "lost": {"text": "{node} lost {target}", "severity": "error"},
            "found": {"text": "{node} found {target} again", "severity": "info"},
        },
        "marks": [{"id": "lost", "label": "lost", "set_by": ["lost"], "cleared_by": ["found"]}],
        "gauges": [{"id": "keys", "label": "Keys", "unit": "keys", "nodes": ["shard"]}],
        "states": [
            {"id": "mode", "label": "Mode", "values": ["ok", "degraded"], "nodes": ["router"]}
        ],
        "tables": [{"id": "shards", "label": "Shards", "node": "router", "columns": []}],
    },
}
KV_NODES = [
    NodeView("shard-1", "shard", "running"),
    NodeView("shard-2", "shard", "running"),
    NodeView("router", "router", "running"),
    NodeView("client", "client", "running"),
]


def kv() -> Aggregator:
    agg = Aggregator(KV_SPEC, window=1.0, lag=0.0)
    agg.update_status(nodes=KV_NODES, faults=[], now=T0)
    return agg


def test_users_and_probes_come_from_the_spec_not_from_names() -> None:
    agg = kv()
    for i in range(10):
        ts = T0 + 0.05 + i / 10
        agg.ingest(call("client", "router", ts, ms=20.0))
        agg.ingest(call("router", "shard-1", ts, ms=5.0, route="/ping"))  # a probe
        agg.ingest(request("router", "shard-1", ts, route="/ping"))
        agg.ingest(call("router", "shard-2", ts, ms=4.0, route="/health"))  # not declared
    frame = agg.frame(T0 + 1)
    assert frame["totals"]["rps"] == 10.0 and frame["totals"]["p50_ms"] == 20.0
    assert frame["nodes"]["client"]["rps"] == 10.0  # a user node: its calls
    assert frame["nodes"]["shard-1"]["rps"] == 0.0  # probes are not requests
    assert frame["links"]["router>shard-1"]["probe_rps"] == 10.0
    assert frame["links"]["router>shard-1"]["rps"] == 0.0
    assert frame["links"]["router>shard-2"]["rps"] == 10.0  # /health is no probe here
    assert frame["links"]["router>shard-2"]["p50_ms"] == 4.0


def test_declared_events_use_their_text_and_severity_and_marks_follow_them() -> None:
    agg = kv()
    [event] = agg.ingest(state("router", T0 + 1, "keys_moved", moved=75, function="modulo"))
    assert event["text"] == "router moved 75 keys (modulo)"
    assert event["severity"] == "warning"
    [event] = agg.ingest(state("router", T0 + 2, "lost", target="shard-2"))
    assert event["text"] == "router lost shard-2" and event["severity"] == "error"
    assert agg.frame(T0 + 2)["nodes"]["shard-2"]["state"] == "lost"
    [event] = agg.ingest(state("router", T0 + 3, "found"))  # no target: the text says "?"
    assert event["text"] == "router found ? again" and "severity" not in event
    assert agg.frame(T0 + 3)["nodes"]["shard-2"]["state"] == "lost"
    agg.ingest(state("router", T0 + 4, "found", target="shard-2"))
    assert agg.frame(T0 + 4)["nodes"]["shard-2"]["state"] == "up"
    agg.ingest(state("router", T0 + 5, "lost", target="shard-1"))
    agg.ingest(state("router", T0 + 6, "started", role="router"))  # a restart forgets
    assert agg.frame(T0 + 6)["nodes"]["shard-1"]["state"] == "up"


def test_gauges_states_and_tables_reach_frames_history_and_snapshots() -> None:
    agg = kv()
    agg.ingest({"v": 1, "ts": T0 + 0.5, "node": "shard-1", "type": "gauges",
                "values": {"keys": 120, "bogus": 1, "in_flight": 3}})  # fmt: skip
    agg.ingest({"v": 1, "ts": T0 + 0.5, "node": "router", "type": "table", "table": "shards",
                "rows": [{"shard": "shard-1", "keys": 120}, "not a row"]})  # fmt: skip
    [event] = agg.ingest(state("router", T0 + 0.6, "set", name="mode", value="degraded"))
    assert event["text"] == "router: Mode degraded"
    [event] = agg.ingest(state("router", T0 + 0.7, "set", name="mode", value="ok"))
    assert event["text"] == "router: Mode degraded → ok"
    assert agg.ingest(state("router", T0 + 0.8, "set", name="mode", value="exploded")) == []
    # Written again every few seconds for late readers: no event when nothing changed.
    assert (
        agg.ingest(state("router", T0 + 0.9, "set", name="mode", value="ok", previous="ok")) == []
    )
    frame = agg.frame(T0 + 1)
    assert frame["nodes"]["shard-1"]["gauges"] == {"keys": 120.0}
    assert frame["nodes"]["shard-1"]["in_flight"] == 3.0  # the node's own count
    assert frame["nodes"]["router"]["states"] == {"mode": "ok"}
    assert frame["tables"] == [
        {"id": "shards", "node": "router", "rows": [{"shard": "shard-1", "keys": 120}]}
    ]
    snapshot = agg.snapshot(T0 + 1)
    assert snapshot["history"][-1]["nodes"]["shard-1"]["gauges"] == {"keys": 120.0}
    assert snapshot["tables"] == frame["tables"]
    assert snapshot["undeclared"] == {"gauge bogus": 1, "state mode=exploded": 1}


def test_the_history_keeps_each_links_figures() -> None:
    agg = kv()
    agg.ingest_many(call("client", "router", T0 + 0.1 * i, ms=10.0 * i) for i in range(1, 10))
    agg.frame(T0 + 1)
    link = agg.snapshot(T0 + 1)["history"][-1]["links"]["client>router"]
    assert link["n"] == 9 and link["p50_ms"] == 50.0 and link["errors"] == 0


def test_series_split_a_nodes_calls_by_route_in_frames_and_history() -> None:
    spec = KV_SPEC | {
        "series": [
            {"id": "gets", "label": "client GET /kv", "node": "client", "route": "/kv/{key}"},
            {"id": "scans", "label": "scans", "node": "client", "route": "/scan"},
            {"id": "shard_scans", "label": "x", "node": "shard", "route": "/scan"},
        ]
    }
    agg = Aggregator(spec, window=1.0, lag=0.0)
    agg.update_status(nodes=KV_NODES, faults=[], now=T0)
    for i in range(10):
        ts = T0 + 0.05 + i / 10
        agg.ingest(call("client", "router", ts, ms=5.0, route="/kv/{key}"))
        if i % 2:
            agg.ingest(call("client", "router", ts, status=504, ms=900.0, route="/scan"))
        agg.ingest(request("client", "router", ts, route="/scan"))  # not a call
        agg.ingest(call("router", "shard-1", ts, route="/scan"))  # not the series' node
    frame = agg.frame(T0 + 1)
    assert frame["series"]["gets"] == {"rps": 10.0, "error_pct": 0.0, "p50_ms": 5.0, "p99_ms": 5.0}
    assert frame["series"]["scans"]["rps"] == 5.0 and frame["series"]["scans"]["error_pct"] == 100
    assert frame["series"]["shard_scans"]["rps"] == 0.0
    point = agg.snapshot(T0 + 1)["history"][-1]
    assert point["series"]["scans"]["n"] == 5 and point["series"]["scans"]["errors"] == 5
    assert point["series"]["gets"]["ms_hist"] == [[latency_bucket(5.0), 10]]
    # A pattern without series keeps its history points as they were.
    plain = kv()
    plain.ingest(call("client", "router", T0 + 0.5, route="/scan"))
    plain.frame(T0 + 1)
    assert "series" not in plain.snapshot(T0 + 1)["history"][-1]


def test_hostile_observations_are_bounded() -> None:
    agg = kv()
    rows = [{"shard": "x" * 500, "keys": i} for i in range(500)]
    agg.ingest({"v": 1, "ts": T0, "node": "router", "type": "table", "table": "shards",
                "rows": rows})  # fmt: skip
    agg.ingest({"v": 1, "ts": T0, "node": "shard-1", "type": "gauges",
                "values": {"keys": float("nan")}})  # fmt: skip
    agg.ingest({"v": 1, "ts": T0, "node": "shard-1", "type": "gauges", "values": [1, 2]})
    agg.ingest(state("router", T0, "keys_moved", moved="9" * 1000, function=None))
    frame = agg.frame(T0 + 1)
    [table] = frame["tables"]
    assert len(table["rows"]) == 50 and len(table["rows"][0]["shard"]) == 80
    assert "gauges" not in frame["nodes"]["shard-1"]
    for i in range(300):
        agg.ingest(state("router", T0, f"made_up_{i}"))
    assert len(agg.snapshot(T0 + 1)["undeclared"]) == 100


def test_a_flood_of_lines_is_bounded() -> None:
    """A node that writes 200,000 call lines in a second does not grow what is kept
    beyond the bounds, and the frame after it is still drawn."""
    agg = aggregator()
    agg.frame(T0)
    line = call("traffic", "lb", T0 + 0.5)
    agg.ingest_many(line for _ in range(200_000))
    assert len(agg._records) <= MAX_RECORDS and len(agg._fresh_calls) <= MAX_FRESH_CALLS
    frame = agg.frame(T0 + 1.2)
    assert len(frame["sample"]) <= 40 and frame["nodes"]["traffic"]["rps"] > 0
