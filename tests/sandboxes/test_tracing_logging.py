"""The tracing-logging pattern: client → gateway → orders → inventory, payments, each
shipping spans and log lines to the collector, as local processes. One test per idea of
chapter 9's "Try it in the sandbox": a checkout is one trace of four services joined by
``traceparent``, with a log line per service carrying its trace id; a slow or failing
service shows in its spans and in its caller's log; head sampling keeps a share of traces
and misses rare failures, tail sampling keeps every failure; without propagation the trace
falls apart; a dead collector costs users nothing and its backlog arrives later. One
sandbox serves the module; after each test everything is put back.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from apps.labs.patterns import Pattern, load_pattern
from sandboxes.runtime.testing import LocalCluster
from tests.sandboxes.helpers import assert_quiet, configure, fault, put_back

PATTERN = "tracing-logging"
SERVICES = ["inventory", "payments", "orders", "gateway"]
NODES = ["collector", *SERVICES, "client"]
RPS = 20.0


def load_service() -> ModuleType:
    path = Path(__file__).parents[2] / "sandboxes/patterns/tracing-logging/service.py"
    spec = importlib.util.spec_from_file_location("tracing_service", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_traceparent_is_read_and_written_as_the_w3c_says() -> None:
    service = load_service()
    header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert service.parse_traceparent(header) == (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
        True,
    )
    assert service.parse_traceparent(header[:-2] + "00")[2] is False
    for bad in (None, "", "01-" + header[3:], header[:-3], "00-xyz-00f067aa0ba902b7-01"):
        assert service.parse_traceparent(bad) is None, bad
    assert service.traceparent("a" * 32, "b" * 16, True) == f"00-{'a' * 32}-{'b' * 16}-01"


@pytest.fixture(scope="module")
def pattern() -> Pattern:
    return load_pattern(PATTERN)


@pytest.fixture(scope="module")
def sandbox(pattern: Pattern) -> Iterator[LocalCluster]:
    with LocalCluster(PATTERN, pattern.expand()) as cluster:
        cluster.wait_started()
        cluster.wait_for(lambda: traces(cluster, 0), 10, "a first trace")
        yield cluster


@pytest.fixture
def cluster(sandbox: LocalCluster) -> Iterator[LocalCluster]:
    yield sandbox
    put_back(sandbox, NODES)
    configure(sandbox, "gateway", sampling="head 100%")
    configure(sandbox, "orders", propagate=True)
    configure(sandbox, "client", rps=RPS)
    assert_quiet(sandbox)


def traces(cluster: LocalCluster, since: float) -> list[dict[str, Any]]:
    """Whole traces the collector reported, of requests begun since ``since``."""
    return [t for t in cluster.events("collector", "trace") if t["started"] >= since]


def logs(cluster: LocalCluster, since: float) -> list[dict[str, Any]]:
    return [
        line
        for batch in cluster.events("collector", "logs")
        for line in batch["lines"]
        if line["ts"] >= since
    ]


def wait_traces(
    cluster: LocalCluster, since: float, count: int, timeout: float = 10
) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        found = traces(cluster, since)
        return found if len(found) >= count else None

    return cluster.wait_for(enough, timeout, f"{count} traces")


def gauge(cluster: LocalCluster, node: str, name: str) -> float:
    return float(cluster.ctl(node, {"op": "state"})["observed"]["gauges"].get(name, 0))


# ---- step 1: a checkout's trace and its log lines -----------------------------------------


def test_a_checkout_is_one_trace_of_four_services_and_its_log_lines_share_its_id(
    cluster: LocalCluster,
) -> None:
    mark = cluster.mark()
    trace = wait_traces(cluster, mark, 5)[-1]
    spans = trace["spans"]
    assert [s["name"] for s in spans] == [
        "gateway /checkout", "call orders", "orders /checkout", "call inventory",
        "inventory /checkout", "call payments", "payments /checkout",
    ]  # fmt: skip
    by_id = {s["span_id"]: s for s in spans}
    assert spans[0]["parent_id"] is None and trace["root"] == "gateway /checkout"
    for span in spans[1:]:  # every other span's parent is in the trace: one tree
        assert span["parent_id"] in by_id, span
        assert span["trace_id"] == trace["trace_id"]
    assert by_id[spans[2]["parent_id"]]["name"] == "call orders"  # the callee under the call
    assert trace["status"] == "ok" and all(s["status"] == "ok" for s in spans)
    cluster.wait_for(
        lambda: (
            {e["service"] for e in logs(cluster, mark) if e["trace_id"] == trace["trace_id"]}
            == set(SERVICES)
        ),
        5,
        "a log line of each service with the trace's id",
    )


def test_every_hop_of_a_checkout_tells_the_lab_its_trace(cluster: LocalCluster) -> None:
    """The runtime puts the W3C trace id on each request and call line (from the
    ``traceparent`` sent, or the ``traceresponse`` answered): the lab's moving dots and p99
    points open the trace the collector put together."""
    mark = cluster.mark()
    trace_id = wait_traces(cluster, mark, 5)[-1]["trace_id"]
    lines = [
        (e["type"], e["src"], e["dst"])
        for name in ["client", *SERVICES]
        for e in cluster.events(name, since=mark)
        if e["type"] in ("request", "call") and e.get("trace") == trace_id
    ]
    assert ("call", "client", "gateway") in lines  # from the gateway's traceresponse
    assert ("request", "client", "gateway") in lines
    for caller, callee in (("gateway", "orders"), ("orders", "inventory"), ("orders", "payments")):
        assert ("call", caller, callee) in lines and ("request", caller, callee) in lines


# ---- steps 2 and 3: a slow or failing service in the trace -------------------------------


def test_a_dropped_payment_shows_as_a_one_second_call_that_failed(cluster: LocalCluster) -> None:
    fault(cluster, "payments", kind="drop", rate=1.0)
    mark = cluster.mark()
    failed = cluster.wait_for(
        lambda: [t for t in traces(cluster, mark) if t["status"] == "error"], 10, "a failed trace"
    )[0]
    call = next(s for s in failed["spans"] if s["name"] == "call payments")
    assert call["status"] == "error" and 950 <= call["ms"] <= 1300, call
    assert "payments /checkout" not in [s["name"] for s in failed["spans"]]
    assert 1000 <= failed["ms"] <= 1400

    def explained() -> list[dict[str, Any]]:
        return [
            line for line in logs(cluster, mark)
            if line["trace_id"] == failed["trace_id"] and line["service"] == "orders"
            and line["level"] == "error" and "payments failed after" in line["msg"]
            and "timeout" in line["msg"]
        ]  # fmt: skip

    cluster.wait_for(explained, 5, "orders' log line that explains it")


def test_a_slow_way_to_inventory_grows_every_span_above_it(cluster: LocalCluster) -> None:
    fault(cluster, "inventory", kind="latency", ms=200)  # before its program sees a request
    mark = cluster.mark() + 0.5
    trace = wait_traces(cluster, mark, 3)[-1]
    ms = {s["name"]: s["ms"] for s in trace["spans"]}
    for name in ("call inventory", "orders /checkout", "call orders", "gateway /checkout"):
        assert ms[name] >= 200, (name, ms)
    # inventory's own work did not grow: the time went on the way to it (the gap between
    # orders' call and inventory's span), and payments' spans only start later.
    assert ms["inventory /checkout"] < 100, ms
    assert ms["payments /checkout"] < 100 and ms["call payments"] < 100, ms


# ---- step 4: sampling --------------------------------------------------------------------


def test_head_sampling_misses_rare_failures_and_tail_sampling_keeps_them(
    cluster: LocalCluster,
) -> None:
    configure(cluster, "client", rps=50)
    fault(cluster, "payments", kind="errors", rate=0.1, status=503)
    configure(cluster, "gateway", sampling="head 10%")
    head = cluster.mark() + 0.5
    cluster.wait_for(lambda: cluster.mark() > head + 6, 7)
    failed = [c for c in cluster.events("client", "call", head) if c["status"] != 200]
    kept = traces(cluster, head)
    made = [c for c in cluster.events("client", "call", head)]
    assert 0.03 <= len(kept) / len(made) <= 0.2, (len(kept), len(made))  # about 10%
    assert len([t for t in kept if t["status"] == "error"]) < len(failed) / 3
    configure(cluster, "gateway", sampling="tail")
    tail = cluster.mark() + 0.5
    cluster.wait_for(lambda: cluster.mark() > tail + 4, 5)
    until = cluster.mark() - 0.5
    failed = [
        c for c in cluster.events("client", "call", tail)
        if c["status"] != 200 and c["ts"] <= until
    ]  # fmt: skip
    cluster.wait_for(lambda: cluster.mark() > until + 3, 4)  # the traces are whole by then
    kept_failed = [t for t in traces(cluster, tail) if t["status"] == "error"]
    assert failed and len(kept_failed) >= len(failed), (len(kept_failed), len(failed))
    assert len(traces(cluster, tail)) < len(cluster.events("client", "call", tail)) / 3
    failed_trace = kept_failed[0]
    call = next(s for s in failed_trace["spans"] if s["name"] == "call payments")
    assert call["status"] == "error"


# ---- step 5: propagation off --------------------------------------------------------------


def test_without_propagation_the_callees_start_traces_of_their_own(cluster: LocalCluster) -> None:
    configure(cluster, "orders", propagate=False)
    mark = cluster.mark() + 0.3
    found = wait_traces(cluster, mark, 12)
    roots = {t["root"] for t in found}
    assert roots == {"gateway /checkout", "inventory /checkout", "payments /checkout"}, roots
    gateway_trace = next(t for t in found if t["root"] == "gateway /checkout")
    assert {s["service"] for s in gateway_trace["spans"]} == {"gateway", "orders"}


# ---- step 6: the collector dies --------------------------------------------------------


def test_a_dead_collector_costs_users_nothing_and_the_backlog_arrives_later(
    cluster: LocalCluster,
) -> None:
    cluster.kill("collector")
    killed = cluster.mark()
    cluster.wait_for(lambda: gauge(cluster, "gateway", "buffered") >= 80, 5, "a backlog")
    made = cluster.events("client", "call", killed)
    assert made and all(c["status"] == 200 for c in made)
    cluster.restart("collector")
    back = cluster.mark()
    # Half a second's worth (about 30 items) is always waiting for the next shipment.
    cluster.wait_for(lambda: gauge(cluster, "gateway", "buffered") <= 40, 6, "the backlog shipped")
    late = cluster.wait_for(
        lambda: [t for t in traces(cluster, killed) if t["started"] < back - 0.5], 6, "late traces"
    )
    assert late[0]["status"] == "ok"
    assert gauge(cluster, "orders", "dropped") == 0  # a few seconds fit in the buffer


# ---- the spec ----------------------------------------------------------------------------


def test_the_spec_holds_the_numbers_the_chapter_uses(pattern: Pattern) -> None:
    assert [n.name for n in pattern.expand()] == NODES
    assert dict(pattern.params) == {
        "work_ms": 5,
        "buffer_max": 2000,
        "trace_wait_s": 2.0,
        "tail_slow_ms": 500,
    }
    (profile,) = pattern.traffic
    assert (profile.node, profile.target, profile.rps) == ("client", "gateway", 20)
    assert [(m.method, m.path) for m in profile.mix] == [("POST", "/checkout")]
    env = {n.name: n.env for n in pattern.expand()}
    assert env["gateway"]["DISTLAB_CALL_TIMEOUT_S"] == "2.0"
    assert env["orders"]["DISTLAB_CALL_TIMEOUT_S"] == "1.0"
    assert pattern.observe.traces == pattern.observe.logs == "collector"
    sampling = pattern.control("sampling")
    assert sampling is not None
    assert sampling.choices == ("head 100%", "head 10%", "head 1%", "tail")
    assert sampling.default == "head 100%"
