"""The lab's Traces and Logs cards (apps/labs/inspect_views.py) and what the aggregator
keeps of a collector's reports: only the declared collector is heard, hostile values are
bounded, the waterfall nests calls and callees, the log search filters, and another
learner's sandbox stays a 404."""

from __future__ import annotations

import math
from typing import Any

import pytest
from django.core.cache import cache
from django.urls import reverse

from apps.accounts.models import User
from apps.labs import services
from apps.labs.inspect_views import log_lines, waterfall
from apps.labs.models import Sandbox
from apps.labs.patterns import load_pattern
from apps.labs.supervisor import inspect_cache_key
from apps.labs.telemetry import MAX_SPANS, Aggregator
from tests.conftest import client_for

pytestmark = pytest.mark.django_db

T0 = 1_800_000_000.0


def span(span_id: str, parent: str | None, service: str, name: str, start: float, ms: float,
         status: str = "ok", kind: str = "server") -> dict[str, Any]:  # fmt: skip
    return {"span_id": span_id, "parent_id": parent, "service": service, "name": name,
            "kind": kind, "start": T0 + start, "ms": ms, "status": status}  # fmt: skip


SPANS = [
    span("a", None, "gateway", "gateway /checkout", 0, 30),
    span("b", "a", "gateway", "call orders", 0.005, 24, kind="client"),
    span("c", "b", "orders", "orders /checkout", 0.006, 22),
    span("d", "c", "orders", "call payments", 0.015, 12, "error", "client"),
    span("e", "c", "orders", "call inventory", 0.008, 6, kind="client"),
    span("f", "e", "inventory", "inventory /checkout", 0.009, 5),
]


def trace_line(trace_id: str = "t1", **extra: Any) -> dict[str, Any]:
    return {"v": 1, "ts": T0 + 3, "node": "collector", "type": "trace", "trace_id": trace_id,
            "root": "gateway /checkout", "service": "gateway", "started": T0, "ms": 30.0,
            "status": "error", "spans": SPANS, **extra}  # fmt: skip


def aggregator() -> Aggregator:
    return Aggregator(load_pattern("tracing-logging").telemetry_spec())


def test_only_the_declared_collector_is_heard_and_values_are_bounded() -> None:
    agg = aggregator()
    agg.ingest(trace_line())
    agg.ingest({**trace_line("t2"), "node": "orders"})  # not the collector: ignored
    agg.ingest(trace_line("t3", started=math.inf))  # not a finite time
    agg.ingest(trace_line("t4", spans="many"))
    agg.ingest(trace_line("x" * 500, spans=[SPANS[0]] * 500, root="r" * 500))
    agg.ingest({"v": 1, "ts": T0, "node": "collector", "type": "logs", "lines": [
        {"ts": T0, "service": "orders", "level": "error", "msg": "failed", "trace_id": "t1"},
        {"ts": "late", "service": "orders"},
        {"ts": T0, "service": "orders", "level": "shouting", "msg": "m" * 10_000, "trace_id": "t1"},
        "not a line",
    ]})  # fmt: skip
    kept = agg.inspect()
    assert [t["trace_id"][:8] for t in kept["traces"]] == ["t1", "x" * 8]
    big = kept["traces"][1]
    assert len(big["trace_id"]) == 64 and len(big["spans"]) == MAX_SPANS and len(big["root"]) == 80
    assert [line["level"] for line in kept["logs"]] == ["error", "info"]
    assert len(kept["logs"][1]["msg"]) == 200
    assert "traces" not in agg.snapshot(T0 + 4)  # not sent to every viewer at connect


def test_the_waterfall_nests_each_callee_under_its_call_in_time_order() -> None:
    agg = aggregator()
    agg.ingest(trace_line())
    rows = waterfall(agg.inspect()["traces"][0])
    assert [(r["name"], r["depth"]) for r in rows] == [
        ("gateway /checkout", 0), ("call orders", 1), ("orders /checkout", 2),
        ("call inventory", 3), ("inventory /checkout", 4), ("call payments", 3),
    ]  # fmt: skip
    assert rows[0]["left"] == 0 and rows[0]["width"] == 100
    payments = rows[-1]
    assert payments["left"] == 50 and payments["width"] == 40 and payments["status"] == "error"


def test_the_log_search_filters_by_service_level_trace_and_text() -> None:
    lines = [
        {"ts": T0 + i, "service": s, "level": lvl, "msg": msg, "trace_id": t, "span_id": ""}
        for i, (s, lvl, msg, t) in enumerate([
            ("gateway", "info", "checkout step done", "aaaa1"),
            ("orders", "error", "payments failed after 1000 ms (timeout)", "aaaa1"),
            ("orders", "info", "checkout step done", "bbbb2"),
        ])
    ]  # fmt: skip
    every = log_lines(lines, service="", level="", trace="", text="")
    assert [line["trace_id"] for line in every] == ["bbbb2", "aaaa1", "aaaa1"]  # newest first
    assert len(log_lines(lines, service="orders", level="", trace="", text="")) == 2
    assert len(log_lines(lines, service="", level="error", trace="", text="")) == 1
    assert len(log_lines(lines, service="", level="", trace="aaaa", text="")) == 2
    assert len(log_lines(lines, service="", level="", trace="", text="TIMEOUT")) == 1


@pytest.fixture
def sandbox(learner: User) -> Sandbox:
    created = services.sandbox_launch(user=learner, pattern_id="tracing-logging", enqueue=False)
    agg = aggregator()
    agg.ingest(trace_line())
    agg.ingest({"v": 1, "ts": T0, "node": "collector", "type": "logs", "lines": [
        {"ts": T0, "service": "orders", "level": "error", "msg": "payments failed <b>",
         "trace_id": "t1"},
        {"ts": T0, "service": "gateway", "level": "info", "msg": "checkout step done",
         "trace_id": "t9"},
    ]})  # fmt: skip
    cache.set(inspect_cache_key(created.hex), agg.inspect())
    return created


def test_the_cards_show_the_trace_list_a_waterfall_and_the_filtered_log(
    sandbox: Sandbox, learner: User
) -> None:
    client = client_for(learner)
    html = client.get(reverse("labs:traces", args=[sandbox.hex]) + "?only=errors").content.decode()
    assert "gateway /checkout" in html and "1 trace kept" in html and "failed" in html
    html = client.get(
        reverse("labs:traces", args=[sandbox.hex]) + "?only=nonsense"
    ).content.decode()
    assert 'aria-pressed="true"' in html and "traces-all" in html  # an unknown filter: all
    html = client.get(reverse("labs:trace", args=[sandbox.hex, "t1"])).content.decode()
    assert html.count('class="span-row') == 6 and "its log lines" in html
    missing = reverse("labs:trace", args=[sandbox.hex, "f" * 32])
    gone = client.get(missing)
    assert gone.status_code == 404 and "no longer holds" in gone.content.decode()
    # A request clicked in the lab: its trace may be on its way, so the fragment asks again
    # each second (htmx swaps only a 200), then says why it may never come.
    waiting = client.get(missing, {"wait": "1"}, headers={"HX-Request": "true"})
    html = waiting.content.decode()
    assert waiting.status_code == 200 and 'data-testid="trace-waiting"' in html
    assert f"{missing}?wait=2" in html and 'hx-trigger="load delay:1s"' in html
    given_up = client.get(missing, {"wait": "8"}, headers={"HX-Request": "true"})
    html = given_up.content.decode()
    assert given_up.status_code == 200 and "holds no trace" in html and "Sampling" in html
    assert "hx-get" not in html.split('data-testid="trace-gone"')[1]  # no more tries
    assert client.get(missing, {"wait": "x"}).status_code == 404
    url = reverse("labs:logs", args=[sandbox.hex])
    html = client.get(url, {"trace": "t1"}).content.decode()
    assert "payments failed &lt;b&gt;" in html and "checkout step done" not in html
    lines_only = client.get(
        url, {"service": "gateway"}, headers={"HX-Request": "true", "HX-Target": "lab-log-lines"}
    )
    text = lines_only.content.decode()
    assert 'id="lab-log-lines"' in text and "<form" not in text and "checkout step done" in text


def test_nothing_collected_yet_says_so(learner: User) -> None:
    created = services.sandbox_launch(user=learner, pattern_id="tracing-logging", enqueue=False)
    client = client_for(learner)
    assert (
        "No trace has reached"
        in client.get(reverse("labs:traces", args=[created.hex])).content.decode()
    )
    assert (
        "No log line has reached"
        in client.get(reverse("labs:logs", args=[created.hex])).content.decode()
    )


def test_another_learner_gets_404_and_a_visitor_is_sent_to_sign_in(
    sandbox: Sandbox, other_learner: User, client
) -> None:  # type: ignore[no-untyped-def]
    for url in (
        reverse("labs:traces", args=[sandbox.hex]),
        reverse("labs:trace", args=[sandbox.hex, "t1"]),
        reverse("labs:logs", args=[sandbox.hex]),
    ):
        assert client_for(other_learner).get(url).status_code == 404
        assert client.get(url).status_code == 302
        assert client_for(other_learner).post(url).status_code in (404, 405)
