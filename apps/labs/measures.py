"""Measures: the numbers an experiment's check computes from the sandbox's own telemetry.

A measure reads the telemetry history the supervisor stores with each sandbox's snapshot
(one point per second, schema in ``apps/labs/telemetry.py``) over the windows of time
the experiment's steps actually ran (a ``Timeline``), and returns named numbers. The
experiment's check judges the learner's prediction against them and fills its
explanation template with them (``safe_format``).

``MEASURES`` is the registry the pattern loader validates ``check.measure`` against: each
measure declares its parameters (so a spec naming a step, node or role that does not
exist fails at load time, with its line) and the values it returns (so a template naming
a value it does not return fails at load time too).

Pure Python: no Django, no I/O, so every measure is testable on synthetic histories.
"""

from __future__ import annotations

import math
import re
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ONGOING_S = 1.0  # errors this close to a window's end count as still going on
MAX_MISSING_SECONDS = 1  # seconds of a window the history may lack before it is "missing"

TELEMETRY_MISSING = (
    "The sandbox's telemetry does not cover the experiment (from {start} to {end}, the "
    "history reaches {reach})."
)
NO_TRAFFIC = (
    "No request reached the service during “{window}”, so there is nothing to measure. "
    "Is the traffic generator on (Requests per second above 0)?"
)
NO_NODE_TRAFFIC = (
    "No {role} served any request during “{window}”, so their shares cannot be compared."
)
PHASE_TOO_SHORT = (
    "The step “{window}” ran for too short a time to measure (under a whole second after "
    "its first {skip:g} s)."
)


class MeasureError(Exception):
    """A measure could not compute its values; the message is for the learner."""


class TelemetryMissing(MeasureError):
    """The history does not (yet) cover the window: the snapshot may still be catching up."""


@dataclass(frozen=True)
class Timeline:
    """When each step of a run actually ran: step id → (start, end), Unix seconds."""

    steps: Mapping[str, tuple[float, float]]

    def window(self, first: str, last: str | None = None) -> tuple[float, float]:
        return self.steps[first][0], self.steps[last or first][1]


@dataclass(frozen=True)
class Param:
    """One parameter of a measure. ``kind``: ``step`` (a step id of the experiment),
    ``node`` (a node the pattern may have, e.g. ``replica-3``), ``role`` (a replicated
    role), ``number`` (from ``low`` to ``high``), ``phases`` (a mapping of phase names,
    lower-case words, to step ids), ``gauge`` (a declared gauge), ``event`` (a declared
    event or one the platform writes), ``link`` (``src>dst``, two nodes), ``series`` (a
    declared series' id), ``field`` (a field name)."""

    kind: str
    required: bool = True
    default: Any = None
    low: float = 0.0
    high: float = 3600.0
    help: str = ""


@dataclass(frozen=True)
class Output:
    """One value a measure returns, as the results table shows it."""

    label: str
    unit: str = ""  # "s", "ms", "%", or "" for a count
    decimals: int = 0

    def show(self, value: float) -> str:
        text = f"{value:,.{self.decimals}f}"
        if not self.unit:
            return text
        return f"{text}{self.unit}" if self.unit == "%" else f"{text} {self.unit}"


@dataclass(frozen=True)
class Measure:
    name: str
    summary: str
    params: Mapping[str, Param]
    outputs: Callable[[Mapping[str, Any]], dict[str, Output]]
    compute: Callable[[Sequence[Mapping[str, Any]], Timeline, Mapping[str, Any]], dict[str, float]]
    doc: str = field(default="", repr=False)


# ---- reading the history -----------------------------------------------------------------


def _clock(ts: float) -> str:
    """A Unix time to the second (UTC)."""
    return time.strftime("%H:%M:%S", time.gmtime(ts)) + " UTC"


def points_between(
    history: Sequence[Mapping[str, Any]], start: float, end: float, *, whole: bool
) -> list[Mapping[str, Any]]:
    """The history points of a window. A point for second ``S`` covers ``(S-1, S]``; with
    ``whole`` only the points entirely inside ``[start, end]`` are taken, else every point
    that overlaps it. Raises TelemetryMissing when the history does not reach the window's
    end, or lacks more than ``MAX_MISSING_SECONDS`` of its seconds."""
    if whole:
        first, last = math.ceil(start) + 1, math.floor(end)
    else:
        first, last = math.floor(start) + 1, math.ceil(end)
    by_second = {
        int(p["ts"]): p
        for p in history
        if isinstance(p, Mapping) and isinstance(p.get("ts"), int | float)
    }
    reach = max(by_second, default=None)
    if reach is None or reach < math.ceil(end):
        raise TelemetryMissing(
            TELEMETRY_MISSING.format(
                start=_clock(start),
                end=_clock(end),
                reach=_clock(reach) if reach is not None else "nowhere: it is empty",
            )
        )
    wanted = range(first, last + 1)
    points = [by_second[s] for s in wanted if s in by_second]
    if len(wanted) - len(points) > MAX_MISSING_SECONDS:
        raise TelemetryMissing(
            TELEMETRY_MISSING.format(
                start=_clock(start),
                end=_clock(end),
                reach=f"{_clock(reach)}, but {len(wanted) - len(points)} s of it are missing",
            )
        )
    return points


def _totals(point: Mapping[str, Any]) -> Mapping[str, Any]:
    totals = point.get("totals")
    return totals if isinstance(totals, Mapping) else {}


def _count(entry: Mapping[str, Any]) -> int:
    """A point's ``n``; points stored before ``n`` existed give their rate (per second)."""
    n = entry.get("n")
    if isinstance(n, int):
        return n
    rps = entry.get("rps")
    return round(rps) if isinstance(rps, int | float) else 0


def merge_histograms(points: Sequence[Mapping[str, Any]]) -> list[tuple[float, int]]:
    """The users' latency histograms of several points, merged: ``[(ms, count)]``."""
    merged: dict[float, int] = {}
    for point in points:
        for pair in _totals(point).get("ms_hist") or []:
            if isinstance(pair, Sequence) and len(pair) == 2:
                merged[float(pair[0])] = merged.get(float(pair[0]), 0) + int(pair[1])
    return sorted(merged.items())


def histogram_percentile(histogram: Sequence[tuple[float, int]], q: float) -> float | None:
    """Nearest-rank percentile of a bucketed histogram (the bucket's middle), or None."""
    total = sum(count for _, count in histogram)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for ms, count in histogram:
        seen += count
        if seen >= rank:
            return ms
    return histogram[-1][0]


# ---- the measures ----------------------------------------------------------------------


def _error_duration_outputs(params: Mapping[str, Any]) -> dict[str, Output]:
    return {
        "error_s": Output("Errors lasted (first to last failed request)", "s", 2),
        "errors": Output("Failed requests"),
        "calls": Output("Requests sent"),
        "error_pct": Output("Share of requests that failed", "%", 1),
        "ongoing": Output("Errors still going on at the end (1 = yes)"),
        "window_s": Output("Time observed", "s", 1),
    }


def _error_duration(
    history: Sequence[Mapping[str, Any]], timeline: Timeline, params: Mapping[str, Any]
) -> dict[str, float]:
    """How long users saw errors during a window of steps: from the first failed call to
    the last (by when each ended), how many failed, out of how many."""
    start, end = timeline.window(params["from_step"], params.get("to_step"))
    points = points_between(history, start, end, whole=False)
    calls = sum(_count(_totals(p)) for p in points)
    errors = sum(int(_totals(p).get("errors") or 0) for p in points)
    if calls == 0:
        raise MeasureError(NO_TRAFFIC.format(window=params["from_step"]))
    firsts = [_totals(p).get("first_error_ts") for p in points]
    lasts = [_totals(p).get("last_error_ts") for p in points]
    first = min((t for t in firsts if isinstance(t, int | float)), default=None)
    last = max((t for t in lasts if isinstance(t, int | float)), default=None)
    span = (last - first) if first is not None and last is not None else 0.0
    return {
        "error_s": round(max(0.0, span), 3),
        "errors": float(errors),
        "calls": float(calls),
        "error_pct": round(100.0 * errors / calls, 2),
        "ongoing": 1.0 if last is not None and last >= end - ONGOING_S else 0.0,
        "window_s": round(end - start, 3),
    }


def _phase_outputs(params: Mapping[str, Any]) -> dict[str, Output]:
    node = params.get("node", "the node")
    role = params.get("role") or _role_of(node)
    out: dict[str, Output] = {}
    for phase in params.get("phases", {}):
        shown = phase.replace("_", " ")
        out |= {
            f"{phase}_share_pct": Output(f"{node}'s share of the {role} requests, {shown}", "%", 1),
            f"{phase}_node_requests": Output(f"Requests served by {node}, {shown}"),
            f"{phase}_requests": Output(f"Requests served by every {role}, {shown}"),
            f"{phase}_p50_ms": Output(f"Median latency users saw (p50), {shown}", "ms", 0),
            f"{phase}_p99_ms": Output(f"p99 latency users saw, {shown}", "ms", 0),
            f"{phase}_error_pct": Output(f"Share of requests that failed, {shown}", "%", 1),
        }
    return out


def _role_of(node: str) -> str:
    return node.rpartition("-")[0] or node


def _share_by_node(
    history: Sequence[Mapping[str, Any]], timeline: Timeline, params: Mapping[str, Any]
) -> dict[str, float]:
    """For each phase (a step): the share of a role's requests that one of its nodes
    served, and the latency users saw (p50, p99) and their error rate. Each phase skips its
    first ``skip_s`` seconds (the system settling after the step's action) and counts only
    whole seconds."""
    node = params["node"]
    role = params.get("role") or _role_of(node)
    member = re.compile(rf"^{re.escape(role)}-[1-9][0-9]*$")
    skip = float(params.get("skip_s", 1.0))
    out: dict[str, float] = {}
    for phase, step in params["phases"].items():
        start, end = timeline.window(step)
        if math.floor(end) - math.ceil(start + skip) < 1:
            raise MeasureError(PHASE_TOO_SHORT.format(window=step, skip=skip))
        points = points_between(history, start + skip, end, whole=True)
        mine = everyone = calls = errors = 0
        for point in points:
            nodes = point.get("nodes")
            for name, entry in nodes.items() if isinstance(nodes, Mapping) else ():
                if member.match(name) and isinstance(entry, Mapping):
                    everyone += _count(entry)
                    if name == node:
                        mine += _count(entry)
            calls += _count(_totals(point))
            errors += int(_totals(point).get("errors") or 0)
        if calls == 0:
            raise MeasureError(NO_TRAFFIC.format(window=step))
        if everyone == 0:
            raise MeasureError(NO_NODE_TRAFFIC.format(role=role, window=step))
        histogram = merge_histograms(points)
        out |= {
            f"{phase}_share_pct": round(100.0 * mine / everyone, 2),
            f"{phase}_node_requests": float(mine),
            f"{phase}_requests": float(everyone),
            f"{phase}_p50_ms": histogram_percentile(histogram, 0.50) or 0.0,
            f"{phase}_p99_ms": histogram_percentile(histogram, 0.99) or 0.0,
            f"{phase}_error_pct": round(100.0 * errors / calls, 2),
        }
    return out


def _series_label(params: Mapping[str, Any]) -> str:
    link, series, node = params.get("link"), params.get("series"), params.get("node")
    if node:
        return f"reaching {node}"
    if series:
        return f"of the {series} calls"
    return f"on {link.replace('>', ' → ')}" if link else "users saw"


def _phase_stats_outputs(params: Mapping[str, Any]) -> dict[str, Output]:
    where = _series_label(params)
    out: dict[str, Output] = {}
    for phase in params.get("phases", {}):
        shown = phase.replace("_", " ")
        out |= {
            f"{phase}_rps": Output(f"Requests per second {where}, {shown}", "", 1),
            f"{phase}_requests": Output(f"Requests {where}, {shown}"),
            f"{phase}_error_pct": Output(f"Share that failed {where}, {shown}", "%", 1),
            f"{phase}_p50_ms": Output(f"p50 latency {where}, {shown}", "ms", 0),
            f"{phase}_p99_ms": Output(f"p99 latency {where}, {shown}", "ms", 0),
        }
    return out


def _series(
    point: Mapping[str, Any], link: str | None, series: str | None = None, node: str | None = None
) -> Mapping[str, Any]:
    if node:  # the requests a node received, as the lab shows its figures
        nodes = point.get("nodes")
        entry = nodes.get(node) if isinstance(nodes, Mapping) else None
        return entry if isinstance(entry, Mapping) else {}
    if not link and not series:
        return _totals(point)
    entries = point.get("series" if series else "links")
    entry = entries.get(series or link) if isinstance(entries, Mapping) else None
    return entry if isinstance(entry, Mapping) else {}


def _phase_stats(
    history: Sequence[Mapping[str, Any]], timeline: Timeline, params: Mapping[str, Any]
) -> dict[str, float]:
    """Per phase (a step): the rate, errors and latency (p50, p99) of what users saw, of
    one link's calls (``link: src>dst``), of one declared series (``series: id``) or of the
    requests one node received (``node``: those a fault answered too). Skips each phase's
    first ``skip_s`` seconds and counts whole seconds only."""
    link, series_id, node = params.get("link"), params.get("series"), params.get("node")
    skip = float(params.get("skip_s", 1.0))
    out: dict[str, float] = {}
    for phase, step in params["phases"].items():
        start, end = timeline.window(step)
        if math.floor(end) - math.ceil(start + skip) < 1:
            raise MeasureError(PHASE_TOO_SHORT.format(window=step, skip=skip))
        points = points_between(history, start + skip, end, whole=True)
        series = [_series(p, link, series_id, node) for p in points]
        calls = sum(_count(entry) for entry in series)
        errors = sum(int(entry.get("errors") or 0) for entry in series)
        if calls == 0:
            raise MeasureError(NO_TRAFFIC.format(window=step))
        histogram = merge_histograms([{"totals": entry} for entry in series])
        out |= {
            f"{phase}_rps": round(calls / max(1, len(points)), 2),
            f"{phase}_requests": float(calls),
            f"{phase}_error_pct": round(100.0 * errors / calls, 2),
            f"{phase}_p50_ms": histogram_percentile(histogram, 0.50) or 0.0,
            f"{phase}_p99_ms": histogram_percentile(histogram, 0.99) or 0.0,
        }
    return out


NO_GAUGE = "{node} reported no {gauge} during “{window}”: was it running?"


def _gauge_values(
    history: Sequence[Mapping[str, Any]], timeline: Timeline, params: Mapping[str, Any]
) -> list[tuple[float, float]]:
    start, end = timeline.window(params["from_step"], params.get("to_step"))
    points = points_between(history, start, end, whole=False)
    values: list[tuple[float, float]] = []
    for point in points:
        nodes = point.get("nodes")
        entry = nodes.get(params["node"]) if isinstance(nodes, Mapping) else None
        gauges = entry.get("gauges") if isinstance(entry, Mapping) else None
        value = gauges.get(params["gauge"]) if isinstance(gauges, Mapping) else None
        if isinstance(value, int | float):
            values.append((float(point["ts"]), float(value)))
    if not values:
        raise MeasureError(
            NO_GAUGE.format(node=params["node"], gauge=params["gauge"], window=params["from_step"])
        )
    return values


def _gauge_stats_outputs(params: Mapping[str, Any]) -> dict[str, Output]:
    what = f"{params.get('node', 'the node')}'s {params.get('gauge', 'gauge')}"
    return {
        "first": Output(f"{what} at the start"),
        "last": Output(f"{what} at the end"),
        "min": Output(f"Lowest {what}"),
        "max": Output(f"Highest {what}"),
        "mean": Output(f"Average {what}", "", 1),
        "rise_per_s": Output(f"How fast {what} rose (per second, start to peak)", "", 1),
    }


def _gauge_stats(
    history: Sequence[Mapping[str, Any]], timeline: Timeline, params: Mapping[str, Any]
) -> dict[str, float]:
    """A gauge of one node over a window of steps: first, last, min, max, mean, and how
    fast it rose from the start to its peak (per second)."""
    values = _gauge_values(history, timeline, params)
    numbers = [v for _, v in values]
    peak_at = max(range(len(values)), key=lambda i: (values[i][1], -i))
    span = values[peak_at][0] - values[0][0]
    rise = (values[peak_at][1] - values[0][1]) / span if span > 0 else 0.0
    return {
        "first": numbers[0],
        "last": numbers[-1],
        "min": min(numbers),
        "max": max(numbers),
        "mean": round(sum(numbers) / len(numbers), 3),
        "rise_per_s": round(rise, 3),
    }


def _gauge_until_outputs(params: Mapping[str, Any]) -> dict[str, Output]:
    what = f"{params.get('node', 'the node')}'s {params.get('gauge', 'gauge')}"
    return {
        "until_s": Output(f"Time until {what} got there", "s", 0),
        "reached": Output("Got there (1 = yes)"),
    }


def _gauge_until(
    history: Sequence[Mapping[str, Any]], timeline: Timeline, params: Mapping[str, Any]
) -> dict[str, float]:
    """Seconds from the window's start until a gauge was at most ``at_most`` (or at least
    ``at_least``), to the second; the whole window and ``reached`` 0 when it never was."""
    start, end = timeline.window(params["from_step"], params.get("to_step"))
    for ts, value in _gauge_values(history, timeline, params):
        low, high = params.get("at_least"), params.get("at_most")
        if (high is not None and value <= high) or (low is not None and value >= low):
            return {"until_s": round(max(0.0, ts - start), 3), "reached": 1.0}
    return {"until_s": round(end - start, 3), "reached": 0.0}


def _event_count_outputs(params: Mapping[str, Any]) -> dict[str, Output]:
    return {"count": Output(f"“{params.get('event', 'event')}” events")}


def _event_count(
    history: Sequence[Mapping[str, Any]], timeline: Timeline, params: Mapping[str, Any]
) -> dict[str, float]:
    """How many events of one kind (a pattern's declared event, or the platform's, such
    as ``down``) the event log got during a window of steps (to the second)."""
    start, end = timeline.window(params["from_step"], params.get("to_step"))
    points = points_between(history, start, end, whole=False)
    total = 0
    for point in points:
        events = point.get("events")
        if isinstance(events, Mapping):
            total += int(events.get(params["event"]) or 0)
    return {"count": float(total)}


def _event_value_outputs(params: Mapping[str, Any]) -> dict[str, Output]:
    what = f"{params.get('field', 'field')} of the “{params.get('event', 'event')}” events"
    return {
        "first": Output(f"The first {what}", "", 1),
        "last": Output(f"The last {what}", "", 1),
        "count": Output(f"“{params.get('event', 'event')}” events"),
    }


NO_EVENT = "No “{event}” event came during “{window}”, so there is nothing to measure."


def _event_value(
    history: Sequence[Mapping[str, Any]], timeline: Timeline, params: Mapping[str, Any]
) -> dict[str, float]:
    """A numeric field of one kind of event during a window (the first and the last to
    the second, and how many such events came): ``keys_moved``'s ``pct``, say."""
    start, end = timeline.window(params["from_step"], params.get("to_step"))
    points = points_between(history, start, end, whole=False)
    values: list[float] = []
    count = 0
    for point in points:
        events = point.get("events")
        count += int(events.get(params["event"]) or 0) if isinstance(events, Mapping) else 0
        fields = (point.get("event_values") or {}).get(params["event"]) or {}
        if isinstance(fields.get(params["field"]), int | float):
            values.append(float(fields[params["field"]]))
    if not values:
        raise MeasureError(NO_EVENT.format(event=params["event"], window=params["from_step"]))
    return {"first": values[0], "last": values[-1], "count": float(count)}


WINDOW_PARAMS = {
    "from_step": Param("step", help="the window starts when this step starts"),
    "to_step": Param("step", required=False, help="…and ends when this one ends (from_step)"),
}


MEASURES: dict[str, Measure] = {
    m.name: m
    for m in (
        Measure(
            name="error_duration",
            summary="How long users saw errors, and how many of their requests failed.",
            params={
                "from_step": Param("step", help="the window starts when this step starts"),
                "to_step": Param(
                    "step", required=False, help="…and ends when this one ends (from_step)"
                ),
            },
            outputs=_error_duration_outputs,
            compute=_error_duration,
        ),
        Measure(
            name="share_by_node",
            summary="Per phase, one node's share of its role's requests, and the latency "
            "(p50, p99) and errors users saw.",
            params={
                "node": Param("node", help="the node whose share is measured (replica-3)"),
                "role": Param(
                    "role", required=False, help="the nodes it shares with (its own role)"
                ),
                "phases": Param("phases", help="phase name → step id"),
                "skip_s": Param(
                    "number", required=False, default=1.0, low=0, high=60, help="settling time"
                ),
            },
            outputs=_phase_outputs,
            compute=_share_by_node,
        ),
        Measure(
            name="phase_stats",
            summary="Per phase, the rate, errors and latency (p50, p99) users saw, or one "
            "link's, or one series'.",
            params={
                "phases": Param("phases", help="phase name → step id"),
                "link": Param("link", required=False, help="a link's calls (src>dst)"),
                "series": Param("series", required=False, help="a declared series' calls (id)"),
                "node": Param("node", required=False, help="the requests a node received"),
                "skip_s": Param(
                    "number", required=False, default=1.0, low=0, high=60, help="settling time"
                ),
            },
            outputs=_phase_stats_outputs,
            compute=_phase_stats,
        ),
        Measure(
            name="gauge_stats",
            summary="A node's gauge over a window: first, last, lowest, highest, average, "
            "how fast it rose.",
            params={
                "node": Param("node", help="the node that reports the gauge"),
                "gauge": Param("gauge", help="a gauge the pattern declares"),
                **WINDOW_PARAMS,
            },
            outputs=_gauge_stats_outputs,
            compute=_gauge_stats,
        ),
        Measure(
            name="gauge_until",
            summary="Seconds until a node's gauge was at most (or at least) a value.",
            params={
                "node": Param("node", help="the node that reports the gauge"),
                "gauge": Param("gauge", help="a gauge the pattern declares"),
                "at_most": Param("number", required=False, low=-1e9, high=1e9),
                "at_least": Param("number", required=False, low=-1e9, high=1e9),
                **WINDOW_PARAMS,
            },
            outputs=_gauge_until_outputs,
            compute=_gauge_until,
        ),
        Measure(
            name="event_count",
            summary="How many events of one kind the event log got during a window.",
            params={
                "event": Param("event", help="an event id (declared, or the platform's)"),
                **WINDOW_PARAMS,
            },
            outputs=_event_count_outputs,
            compute=_event_count,
        ),
        Measure(
            name="event_value",
            summary="A numeric field of one kind of event during a window: first, last.",
            params={
                "event": Param("event", help="a declared event id"),
                "field": Param("field", help="one of its numeric fields"),
                **WINDOW_PARAMS,
            },
            outputs=_event_value_outputs,
            compute=_event_value,
        ),
    )
}


# ---- templates ---------------------------------------------------------------------------


class TemplateError(ValueError):
    pass


class _Formatter(string.Formatter):
    """``str.format`` restricted to plain names looked up whole in one mapping: no
    attribute or index access (``{x.__class__}`` is the name "x.__class__", which is
    simply unknown), no positional fields, no conversions, no nested fields."""

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if field_name not in kwargs:
            raise TemplateError(f"unknown value {{{field_name}}}")
        return kwargs[field_name], field_name


_FORMATTER = _Formatter()


def template_fields(template: str) -> list[tuple[str, str]]:
    """The ``(name, format_spec)`` of every field, or TemplateError for a malformed
    template, a positional field, a conversion (``!r``) or a nested field."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise TemplateError(f"malformed template: {exc}") from None
    fields = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or name.isdigit():
            raise TemplateError("every {…} must name a value, as in {error_s:.1f}")
        if conversion:
            raise TemplateError(f"{{{name}!{conversion}}}: conversions are not supported")
        if spec and "{" in spec:
            raise TemplateError(f"{{{name}}}: nested fields are not supported")
        fields.append((name, spec or ""))
    return fields


def safe_format(template: str, values: Mapping[str, Any]) -> str:
    """Fill a template with ``values`` only. Raises TemplateError (a name not in
    ``values``, or a format spec its value does not take)."""
    template_fields(template)
    try:
        return _FORMATTER.vformat(template, (), values)
    except (ValueError, TypeError) as exc:
        raise TemplateError(str(exc)) from None
