"""The generic measures a pattern's experiments use, on synthetic histories (no sandbox):
per-phase figures of what users saw or of one link, a gauge's statistics, the time until
a gauge gets somewhere, and event counts."""

from __future__ import annotations

from typing import Any

import pytest

from apps.labs.measures import MEASURES, MeasureError, Timeline

T0 = 1_800_000_000


def point(second: int, **fields: Any) -> dict[str, Any]:
    return {"ts": T0 + second, "totals": {"n": 0, "errors": 0}, "nodes": {}, "links": {}} | fields


def compute(
    name: str, history: list[dict[str, Any]], steps: dict[str, tuple[int, int]], **params: Any
) -> dict[str, float]:
    timeline = Timeline({k: (T0 + a, T0 + b) for k, (a, b) in steps.items()})
    return MEASURES[name].compute(history, timeline, params)


def lag_history(values: list[float]) -> list[dict[str, Any]]:
    return [point(i, nodes={"projector": {"gauges": {"lag": v}}}) for i, v in enumerate(values, 1)]


def test_gauge_stats_reads_one_nodes_gauge_over_the_window() -> None:
    history = lag_history([0, 0, 4, 8, 12, 16, 9, 2, 0, 0])
    out = compute(
        "gauge_stats", history, {"stop": (2, 6), "go": (6, 10)},
        node="projector", gauge="lag", from_step="stop", to_step="go",
    )  # fmt: skip
    # The window (seconds 2 to 10) holds the points of seconds 3 to 10.
    assert (out["first"], out["last"], out["min"], out["max"]) == (4, 0, 0, 16)
    assert out["rise_per_s"] == 4.0  # 4 at second 3 to 16 at second 6
    assert out["mean"] == pytest.approx(51 / 8, abs=0.001)


def test_gauge_until_finds_the_first_second_the_gauge_gets_there() -> None:
    history = lag_history([0, 0, 4, 8, 12, 16, 9, 2, 0, 0])
    out = compute(
        "gauge_until", history, {"go": (6, 10)},
        node="projector", gauge="lag", from_step="go", at_most=0,
    )  # fmt: skip
    assert out == {"until_s": 3.0, "reached": 1.0}
    never = compute(
        "gauge_until", history, {"go": (6, 10)},
        node="projector", gauge="lag", from_step="go", at_least=100,
    )  # fmt: skip
    assert never == {"until_s": 4.0, "reached": 0.0}


def test_a_gauge_nobody_reported_is_a_sentence_for_the_learner() -> None:
    with pytest.raises(MeasureError, match="projector reported no lag"):
        compute(
            "gauge_stats", [point(i) for i in range(1, 6)], {"s": (1, 4)},
            node="projector", gauge="lag", from_step="s",
        )  # fmt: skip


def test_phase_stats_of_a_link_per_phase() -> None:
    def scans(ms: float, errors: int = 0) -> dict[str, Any]:
        return {"reporter>router": {"n": 1, "errors": errors, "ms_hist": [[ms, 1]]}}

    history = [point(i, links=scans(12.0)) for i in range(1, 6)]
    history += [point(i, links=scans(312.0, errors=1 if i == 9 else 0)) for i in range(6, 11)]
    out = compute(
        "phase_stats", history, {"calm": (0, 5), "slow": (5, 10)},
        phases={"calm": "calm", "slow": "slow"}, link="reporter>router", skip_s=1.0,
    )  # fmt: skip
    assert out["calm_p50_ms"] == 12.0 and out["slow_p50_ms"] == 312.0
    assert out["calm_requests"] == 4 and out["slow_error_pct"] == 25.0
    assert out["calm_rps"] == 1.0


def test_phase_stats_of_a_series_per_phase() -> None:
    def fast(ms: float, errors: int = 0) -> dict[str, Any]:
        return {"fast": {"n": 2, "errors": errors, "ms_hist": [[ms, 2]]}}

    history = [point(i, series=fast(6.0)) for i in range(1, 6)]
    history += [point(i, series=fast(1990.0, errors=1)) for i in range(6, 11)]
    out = compute(
        "phase_stats", history, {"calm": (0, 5), "cascade": (5, 10)},
        phases={"calm": "calm", "cascade": "cascade"}, series="fast", skip_s=1.0,
    )  # fmt: skip
    assert out["calm_p99_ms"] == 6.0 and out["cascade_p99_ms"] == 1990.0
    assert out["calm_rps"] == 2.0 and out["cascade_error_pct"] == 50.0
    labels = MEASURES["phase_stats"].outputs({"phases": {"calm": "calm"}, "series": "fast"})
    assert labels["calm_p99_ms"].label == "p99 latency of the fast calls, calm"


def test_phase_stats_of_the_requests_a_node_received() -> None:
    def shard(n: int, errors: int) -> dict[str, Any]:
        return {"shard-a": {"n": n, "errors": errors}, "shard-b": {"n": 50, "errors": 0}}

    history = [point(i, nodes=shard(5, 2)) for i in range(1, 6)]
    history += [point(i, nodes=shard(9, 4)) for i in range(6, 11)]
    out = compute(
        "phase_stats", history, {"one": (0, 5), "three": (5, 10)},
        phases={"one": "one", "three": "three"}, node="shard-a", skip_s=1.0,
    )  # fmt: skip
    assert (out["one_rps"], out["three_rps"]) == (5.0, 9.0)  # answered by a fault or not
    assert out["three_error_pct"] == pytest.approx(44.44, abs=0.01)
    labels = MEASURES["phase_stats"].outputs({"phases": {"one": "one"}, "node": "shard-a"})
    assert labels["one_rps"].label == "Requests per second reaching shard-a, one"


def test_phase_stats_without_traffic_says_so() -> None:
    with pytest.raises(MeasureError, match="No request reached"):
        compute(
            "phase_stats", [point(i) for i in range(1, 8)], {"a": (0, 6)},
            phases={"a": "a"},
        )  # fmt: skip


def test_event_count_counts_one_kind_in_the_window() -> None:
    history = [point(i) for i in range(1, 11)]
    history[2]["events"] = {"conflict": 2, "down": 1}
    history[6]["events"] = {"conflict": 1}
    history[9]["events"] = {"conflict": 5}  # after the window
    out = compute("event_count", history, {"w": (1, 8)}, event="conflict", from_step="w")
    assert out == {"count": 3.0}


def test_event_value_reads_a_numeric_field_of_the_events_in_the_window() -> None:
    history = [point(i) for i in range(1, 11)]
    history[3] |= {"events": {"keys_moved": 1}, "event_values": {"keys_moved": {"pct": 76.2}}}
    history[6] |= {"events": {"keys_moved": 1}, "event_values": {"keys_moved": {"pct": 26.9}}}
    out = compute(
        "event_value", history, {"mod": (1, 5), "ring": (5, 9)},
        event="keys_moved", field="pct", from_step="mod", to_step="ring",
    )  # fmt: skip
    assert out == {"first": 76.2, "last": 26.9, "count": 2.0}
    with pytest.raises(MeasureError, match="No “keys_moved” event came"):
        compute(
            "event_value", history, {"w": (7, 9)},
            event="keys_moved", field="pct", from_step="w",
        )  # fmt: skip
