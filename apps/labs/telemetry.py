"""Telemetry aggregation: node telemetry lines in, frames, events and snapshots out.

Pure Python (no Django, no I/O) so the arithmetic is testable without a sandbox. The
supervisor (``apps/labs/supervisor.py``) feeds one ``Aggregator`` per sandbox with the
parsed lines of every node (schema: ``sandboxes/runtime/TELEMETRY.md``), tells it what the
engine and the database say about nodes and faults, and publishes what it returns.

Wire formats (version 1; add fields freely, change meanings only with ``v: 2``):

* **frame**, several a second, latest wins::

    {"type": "frame", "v": 1, "ts": now, "seq": n,
     "nodes": {name: {"role", "rps", "error_pct", "p50_ms", "p99_ms", "in_flight", "state",
                      "gauges": {id: number},        # only when the node reported some
                      "states": {id: value}}},       # likewise
     "links": {"src>dst": {"src", "dst", "rps", "error_pct", "p50_ms", "p99_ms",
                           "probe_rps", "probe_error_pct"}},
     "sample": [{"src", "dst", "status", "ms", "ts", "trace"?}, …],   # ≤ 40 recent calls
     "totals": {"rps", "error_pct", "p50_ms", "p99_ms", "slow_trace"?},
     "series": {id: {"rps", "error_pct", "p50_ms", "p99_ms"}},   # the spec's ``series``
     "faults": [{"node", "kind"}, …],
     "tables": [{"id", "node", "rows": [{column id: value}, …]}, …]}

  What the aggregator knows of the pattern comes from ``Pattern.telemetry_spec()``
  (``users``, probe links, ``series``, ``observe``); it names no pattern, role or route itself.
  Rates are per second over the last ``window`` seconds ending ``lag`` seconds ago (lines
  reach the supervisor up to ~0.15 s late). A node's figures come from the ``request``
  lines it wrote (a user node's, from its ``call`` lines); a link's from its source's
  ``call`` lines; a series' from the ``call`` lines its node (or role) wrote on its
  route. Calls on a probe link's route count only as that link's ``probe_*``.
  An error is status 0 (no answer) or ≥ 400. Latencies are null when nothing was seen.
  A call that carried a W3C trace (a ``trace`` on its line) has it in the sample, and
  every figure set (node, link, totals, series, history point) has ``slow_trace``: the
  trace id of its slowest traced request, when one was traced.
  ``in_flight`` is what the node reports as its ``in_flight`` gauge when it does, else the
  time-averaged concurrency of the window's requests (Little's law). Totals are what
  users saw: the user nodes' calls (every node's requests when the pattern names none).
  Node ``state``: ``killed`` (engine: exited or missing) > ``paused`` > ``partitioned`` >
  a mark another node set on it (a declared mark's id, such as ``ejected``) > ``up``.
* **event**, at once::

    {"type": "event", "v": 1, "ts", "node", "kind", "text", "data": {…},
     "severity": "warning" | "error"}               # only for such declared events

  ``kind``: from ``state`` lines the runtime's ``started``, ``stopped``, ``failed``,
  ``config``, ``task_failed``, ``set`` (a declared state changed) and the pattern's own
  events (text from its ``observe.events``; an undeclared one is logged plainly and
  counted in the snapshot's ``undeclared``); from the union of runtime and platform
  faults ``fault`` / ``fault_cleared``; from engine status ``down``, ``up``, ``paused``,
  ``resumed``, ``added``, ``removed``; and ``sandbox_ended``.
* **snapshot**, for a viewer that connects::

    {"type": "snapshot", "v": 1, "ts", "nodes": {name: {"role", "state"}},
     "frame": last frame or null, "history": [point, …], "events": [≤ 100 events],
     "tables": [as in frames], "undeclared": {"event x": count, …}}

  A history point per whole second (≤ 5 minutes)::

    {"ts": second, "totals": {"rps", "error_pct", "p50_ms", "p99_ms",
                              "n", "errors", "first_error_ts", "last_error_ts", "ms_hist"},
     "nodes": {name: {"rps", "error_pct", "p50_ms", "p99_ms", "n", "errors", "state",
                      "in_flight", "gauges", "states"}},
     "links": {"src>dst": {as totals}},                # calls, probes excluded
     "series": {id: {as totals}},                      # only when the spec has series
     "events": {kind: count},                          # events of that second, if any
     "event_values": {kind: {field: number}}}          # their numeric fields (the last)

  The point for second ``S`` covers the lines whose ``ts`` (when a request or call ended)
  is in ``(S - 1, S]``. Besides the rates, each point counts what happened in it, for the
  experiments' checks (``apps/labs/measures.py``), which need finer than per second:

  - ``n``: the requests (a node's), or the calls users made (``totals``); ``errors``: how
    many of them failed (status 0 or ≥ 400).
  - ``first_error_ts`` / ``last_error_ts`` (totals): the ``ts`` of the first and the last
    failed call users made in that second (0.1 ms precision), null when none failed.
  - ``ms_hist`` (totals): the users' latencies as ``[[ms, count], …]`` by ascending
    ``ms``, non-empty buckets only. Buckets are ``LATENCY_BUCKETS_PER_DECADE`` (40) to a
    decade, each about 6 % wide, named by their geometric middle (``latency_bucket``), so
    percentiles over any span of seconds come within 3 % of the exact ones.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from apps.labs.engine.base import MAX_LINE_BYTES
from sandboxes.runtime.telemetry import RUNTIME_EVENTS  # the runtime's own state events

VERSION = 1
DOWN_STATES = frozenset({"exited", "missing"})
# The runtime's own ``state`` events that the event log shows (faults come from the union
# of runtime and platform faults; ``peers`` is plumbing; ``set`` is a declared state).
RUNTIME_LOGGED = frozenset({"started", "stopped", "failed", "config", "task_failed"})
IN_FLIGHT_GAUGE = "in_flight"  # built in: a node's own count replaces the estimate
MAX_GAUGES = 32  # per node
MAX_TABLE_ROWS = 50
MAX_CELL_CHARS = 80
MAX_TEXT_FIELD_CHARS = 200
MAX_RECORDS = 50_000  # about 10 s of a busy sandbox (200 requests/s through 5 hops: 5,000/s)
MAX_FRESH_CALLS = 2_000  # calls kept between two frames, to sample the moving dots from
MAX_TRACES = 200  # the newest traces a collector reported, for the lab's trace list
MAX_SPANS = 40  # per trace
MAX_LOG_LINES = 2_000  # the newest lines of the central log
MAX_LOGS_PER_LINE = 200
LOG_LEVELS = ("debug", "info", "warning", "error")


class Record(NamedTuple):
    ts: float
    kind: str  # "request" or "call"
    node: str  # the node that wrote the line
    src: str
    dst: str
    status: int
    ms: float
    probe: bool
    route: str = ""
    trace: str = ""  # the W3C trace id the request carried, if any


@dataclass(frozen=True)
class NodeView:
    """What the engine says about one node (a subset of ``engine.base.NodeStatus``)."""

    name: str
    role: str
    state: str  # running, paused, exited, missing
    exit_code: int | None = None


def parse_line(raw: bytes | str, *, now: float | None = None) -> dict[str, Any] | None:
    """One telemetry line, or None for anything that is not a version-1 object. A node's
    output is untrusted: a line longer than the engines' limit, JSON nested too deep for
    the parser, or a timestamp that is not a finite number is refused; a timestamp in the
    future is taken as ``now`` (by default the current time), so it cannot stop the
    aggregator's clock."""
    if len(raw) > MAX_LINE_BYTES:
        return None
    try:
        line = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(line, dict) or line.get("v") != VERSION:
        return None
    ts = line.get("ts")
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        return None
    if not isinstance(line.get("node"), str):
        return None
    line["ts"] = min(float(ts), time.time() if now is None else now)
    return line


def is_error(status: int) -> bool:
    return status == 0 or status >= 400


def percentile(sorted_ms: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none."""
    if not sorted_ms:
        return None
    return round(sorted_ms[max(0, math.ceil(q * len(sorted_ms)) - 1)], 2)


TRACE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def _trace_id(value: Any) -> str:
    """A line's ``trace``: a W3C trace id (32 lowercase hex digits), else nothing."""
    return value if isinstance(value, str) and TRACE_ID_RE.match(value) else ""


def stats(records: Sequence[Record], seconds: float) -> dict[str, Any]:
    ms = sorted(r.ms for r in records)
    errors = sum(1 for r in records if is_error(r.status))
    out: dict[str, Any] = {
        "rps": round(len(records) / seconds, 2),
        "error_pct": round(100.0 * errors / len(records), 2) if records else 0.0,
        "p50_ms": percentile(ms, 0.50),
        "p99_ms": percentile(ms, 0.99),
    }
    traced = [r for r in records if r.trace]
    if traced:  # the slowest request that carried a trace: a click on a p99 point opens it
        out["slow_trace"] = max(traced, key=lambda r: r.ms).trace
    return out


LATENCY_BUCKETS_PER_DECADE = 40
MIN_BUCKET_MS = 0.1  # latencies below are counted in this one's bucket


def latency_bucket(ms: float) -> float:
    """The history's latency bucket of ``ms``: the geometric middle of the bucket
    ``(10**((k-1)/40), 10**(k/40)]`` holding it, to three significant digits."""
    k = math.ceil(LATENCY_BUCKETS_PER_DECADE * math.log10(max(ms, MIN_BUCKET_MS)) - 1e-9)
    return float(f"{10 ** ((k - 0.5) / LATENCY_BUCKETS_PER_DECADE):.3g}")


def counts(records: Sequence[Record], *, detail: bool = False) -> dict[str, Any]:
    """What a history point counts (see the module docstring): ``n`` and ``errors``, and
    with ``detail`` the first and last error's ``ts`` and the latency histogram."""
    failed = [r.ts for r in records if is_error(r.status)]
    out: dict[str, Any] = {"n": len(records), "errors": len(failed)}
    if detail:
        out["first_error_ts"] = round(min(failed), 4) if failed else None
        out["last_error_ts"] = round(max(failed), 4) if failed else None
        histogram: dict[float, int] = {}
        for r in records:
            bucket = latency_bucket(r.ms)
            histogram[bucket] = histogram.get(bucket, 0) + 1
        out["ms_hist"] = [[ms, histogram[ms]] for ms in sorted(histogram)]
    return out


def empty_snapshot(now: float) -> dict[str, Any]:
    return {
        "type": "snapshot",
        "v": VERSION,
        "ts": now,
        "nodes": {},
        "frame": None,
        "history": [],
        "events": [],
    }


def _fmt_params(params: Any) -> str:
    if not isinstance(params, Mapping) or not params:
        return ""
    parts = [f"{k}={v}" for k, v in params.items() if k != "duration"]
    if params.get("duration"):
        parts.append(f"for {params['duration']} s")
    return f" ({', '.join(parts)})" if parts else ""


class _Fields(dict[str, Any]):
    """An event's fields for its text: a field it lacks reads "?"."""

    def __missing__(self, key: str) -> str:
        return "?"


def fill(template: str, node: str, data: Mapping[str, Any]) -> str:
    """A declared event's text: ``{node}`` and the event's fields (plain names only, as
    the pattern loader checks), each cut to a sensible length."""
    fields = _Fields({k: str(v)[:MAX_TEXT_FIELD_CHARS] for k, v in data.items()})
    fields["node"] = node
    try:
        return template.format_map(fields)
    except (ValueError, IndexError, KeyError, AttributeError):
        return f"{node}: {template}"


def event_text(node: str, kind: str, data: Mapping[str, Any]) -> str:
    """A short sentence for the event log (the platform's and the runtime's events; a
    pattern's own come from its ``observe.events`` templates)."""
    reason = data.get("reason")
    why = f" ({reason})" if reason else ""
    texts = {
        "started": f"{node} started",
        "stopped": f"{node} stopped{why}",
        "failed": f"{node} failed to start: {data.get('error', 'unknown error')}",
        "config": f"{node}: {data.get('key')} set to {data.get('value')} "
        f"(was {data.get('previous')})",
        "task_failed": f"{node}: background task {data.get('task')} crashed: {data.get('error')}",
        "fault": f"{data.get('kind')} fault on {node}{_fmt_params(data.get('params'))}",
        "fault_cleared": f"{data.get('kind')} fault on {node} cleared",
        "down": f"{node} is down"
        + (f" (exit code {data['exit_code']})" if data.get("exit_code") is not None else ""),
        "up": f"{node} is up again",
        "paused": f"{node} is paused",
        "resumed": f"{node} resumed",
        "added": f"{node} was added",
        "removed": f"{node} was removed",
        "sandbox_ended": f"The sandbox is {data.get('state')}.",
    }
    reason_why = why if kind == "stopped" else ""
    return texts.get(kind, f"{node}: {kind}{reason_why}")


class Aggregator:
    """One sandbox's telemetry. Thread-safe: followers call ``ingest`` from their threads
    while the publisher calls ``frame``; every public method takes the lock."""

    def __init__(
        self,
        spec: Mapping[str, Any] | None = None,
        *,
        window: float = 1.0,
        lag: float = 0.2,
        sample_size: int = 40,
        history_seconds: int = 300,
        max_events: int = 100,
    ) -> None:
        self.window = window
        self.lag = lag
        self.sample_size = sample_size
        self._lock = threading.Lock()
        # Bounded whatever the nodes write: a flood pushes out the oldest records, and the
        # sample is drawn from the first calls of a frame's interval.
        self._records: deque[Record] = deque(maxlen=MAX_RECORDS)
        self._fresh_calls: list[Record] = []  # arrived since the last frame: the sample
        self._history: deque[dict[str, Any]] = deque(maxlen=history_seconds)
        self._events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self._last_second: int | None = None
        self._event_horizon = 0.0  # lines up to this ts were already announced (resume)
        self._seq = 0
        self._last_frame: dict[str, Any] | None = None
        # What is known about nodes.
        self._roles: dict[str, str] = {}
        self._engine_state: dict[str, NodeView] = {}
        self._status_known = False
        # What the pattern declares (``Pattern.telemetry_spec()``; nothing when None).
        spec = spec or {}
        observe = spec.get("observe") or {}
        self._users = frozenset(spec.get("users") or ())
        self._probes = [
            (str(p["from"]), str(p["to"]), str(p["route"])) for p in spec.get("probes") or ()
        ]
        self._series = [
            (str(s["id"]), str(s["node"]), str(s["route"])) for s in spec.get("series") or ()
        ]
        self._declared_events: dict[str, Mapping[str, Any]] = dict(observe.get("events") or {})
        self._mark_defs = list(observe.get("marks") or ())
        self._gauge_ids = {g["id"] for g in observe.get("gauges") or ()} | {IN_FLIGHT_GAUGE}
        self._state_defs = {x["id"]: x for x in observe.get("states") or ()}
        self._table_ids = {t["id"] for t in observe.get("tables") or ()}
        self._marks: dict[str, dict[str, str]] = {}  # writer → marked node → mark id
        self._gauges: dict[str, dict[str, tuple[float, float]]] = {}  # node → id → (ts, v)
        self._states: dict[str, dict[str, str]] = {}  # node → state id → value
        self._tables: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (node, id) → rows
        self._undeclared: dict[str, int] = {}  # what nodes reported that the spec lacks
        # second → {"events": {kind: count}, "event_values": {kind: {field: number}}}
        self._event_seconds: dict[int, dict[str, Any]] = {}
        self._runtime_faults: dict[str, dict[str, Any]] = {}  # node → kind → params
        self._platform_faults: dict[str, dict[str, Any]] = {}
        self._links: set[tuple[str, str]] = set()
        # The pattern's collector: whole traces and the central log (``observe.traces``,
        # ``observe.logs``), kept apart from the snapshot (``inspect``).
        self._trace_node = str(observe.get("traces") or "")
        self._log_node = str(observe.get("logs") or "")
        self._traces: deque[dict[str, Any]] = deque(maxlen=MAX_TRACES)
        self._logs: deque[dict[str, Any]] = deque(maxlen=MAX_LOG_LINES)

    # --- input -------------------------------------------------------------------------

    def ingest(self, line: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Take one parsed telemetry line; return the events it causes."""
        with self._lock:
            return self._ingest(line)

    def ingest_many(self, lines: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        with self._lock:
            return [event for line in lines for event in self._ingest(line)]

    def _ingest(self, line: Mapping[str, Any]) -> list[dict[str, Any]]:
        kind, node, ts = line.get("type"), str(line.get("node")), float(line["ts"])
        if node not in self._roles and node not in self._engine_state:
            self._roles.setdefault(node, "")  # roles come from the engine, never from output
        if kind in ("request", "call"):
            try:
                # A node speaks for itself only: it is the caller of the calls it reports
                # and the callee of the requests it reports.
                record = Record(
                    ts=ts,
                    kind=kind,
                    node=node,
                    src=node if kind == "call" else str(line.get("src") or ""),
                    dst=node if kind == "request" else str(line.get("dst") or ""),
                    status=int(line.get("status", 0)),
                    ms=float(line.get("ms", 0.0)),
                    probe=False,
                    route=str(line.get("route") or "")[:MAX_CELL_CHARS],
                    trace=_trace_id(line.get("trace")),
                )
            except (TypeError, ValueError):
                return []
            if self._probes:
                record = record._replace(probe=self._is_probe(record, line.get("route")))
            self._records.append(record)
            if kind == "call":
                self._links.add((record.src, record.dst))
                if not record.probe and len(self._fresh_calls) < MAX_FRESH_CALLS:
                    self._fresh_calls.append(record)
            return []
        if kind == "gauges":
            self._gauge_line(node, ts, line.get("values"))
            return []
        if kind == "table":
            self._table_line(node, line.get("table"), line.get("rows"))
            return []
        if kind == "trace" and node == self._trace_node:
            trace = clean_trace(line)
            if trace is not None:
                self._traces.append(trace)
            return []
        if kind == "logs" and node == self._log_node:
            lines = line.get("lines")
            for entry in lines[:MAX_LOGS_PER_LINE] if isinstance(lines, list) else ():
                cleaned = clean_log(entry)
                if cleaned is not None:
                    self._logs.append(cleaned)
            return []
        if kind != "state":
            return []
        return self._state_line(node, ts, line)

    def _role_of(self, name: str) -> str:
        return self._roles.get(name, "")

    def _is(self, name: str, ref: str) -> bool:
        """Whether ``name`` is the node ``ref``, or an instance of the role ``ref``."""
        return bool(name) and (name == ref or self._role_of(name) == ref)

    def _is_probe(self, record: Record, route: Any) -> bool:
        return any(
            route == probe_route and self._is(record.src, src) and self._is(record.dst, dst)
            for src, dst, probe_route in self._probes
        )

    def _is_user(self, name: str) -> bool:
        return name in self._users or self._role_of(name) in self._users

    def _count_undeclared(self, what: str) -> None:
        if what in self._undeclared or len(self._undeclared) < 100:
            self._undeclared[what] = self._undeclared.get(what, 0) + 1

    def _gauge_line(self, node: str, ts: float, values: Any) -> None:
        if not isinstance(values, Mapping):
            return
        gauges = self._gauges.setdefault(node, {})
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            if key not in self._gauge_ids:
                self._count_undeclared(f"gauge {key}")
                continue
            if key in gauges or len(gauges) < MAX_GAUGES:
                gauges[str(key)] = (ts, float(value))

    def _table_line(self, node: str, table: Any, rows: Any) -> None:
        if not isinstance(table, str) or not isinstance(rows, list):
            return
        if table not in self._table_ids:
            self._count_undeclared(f"table {table}")
            return
        clean: list[dict[str, Any]] = []
        for row in rows[:MAX_TABLE_ROWS]:
            if not isinstance(row, Mapping):
                continue
            clean.append(
                {
                    str(k)[:40]: v
                    if isinstance(v, int | float) and not isinstance(v, bool)
                    else str(v)[:MAX_CELL_CHARS]
                    for k, v in list(row.items())[:16]
                }
            )
        self._tables[(node, table)] = clean

    def _state_line(self, node: str, ts: float, line: Mapping[str, Any]) -> list[dict[str, Any]]:
        event = line.get("event")
        data = {k: v for k, v in line.items() if k not in {"v", "ts", "node", "type", "event"}}
        before = self._fault_keys()
        announce = ts > self._event_horizon
        text: str | None = None
        logged = event in RUNTIME_LOGGED
        if event == "started":
            self._marks.pop(node, None)  # a fresh node starts with no marks on others
            self._states.pop(node, None)
            self._gauges.pop(node, None)
            self._runtime_faults.pop(node, None)
        elif event == "fault" and line.get("kind"):
            self._runtime_faults.setdefault(node, {})[str(line["kind"])] = line.get("params", {})
        elif event == "fault_cleared" and line.get("kind"):
            self._runtime_faults.get(node, {}).pop(str(line["kind"]), None)
        elif event == "set":
            text = self._set_state(node, line)
            logged = text is not None
        elif isinstance(event, str) and event not in RUNTIME_EVENTS:
            declared = self._declared_events.get(event)
            if declared is None:
                self._count_undeclared(f"event {event}")
                text = f"{node}: {event}"
            else:
                text = fill(str(declared.get("text", event)), node, data)
                self._apply_marks(node, event, data.get("target"))
            logged = True
        events = self._fault_events(before, ts) if announce else []
        if announce and logged:
            events.insert(0, self._event(ts, node, str(event), data, text))
        return events

    def _set_state(self, node: str, line: Mapping[str, Any]) -> str | None:
        """A declared state's new value; the event log's text, or None when it is not
        a declared state with one of its values."""
        name, value = line.get("name"), line.get("value")
        state = self._state_defs.get(name) if isinstance(name, str) else None
        if state is None or value not in state.get("values", ()):
            self._count_undeclared(f"state {name}={value}")
            return None
        previous = self._states.setdefault(node, {}).get(str(name))
        self._states[node][str(name)] = str(value)
        if previous == value:  # written again for readers that attached late: no change
            return None
        label = state.get("label") or name
        return f"{node}: {label} {previous} → {value}" if previous else f"{node}: {label} {value}"

    def _apply_marks(self, writer: str, event: str, target: Any) -> None:
        if not isinstance(target, str) or not target:
            return
        for mark in self._mark_defs:
            if event in mark["set_by"]:
                self._marks.setdefault(writer, {})[target] = mark["id"]
            elif (
                event in mark["cleared_by"]
                and self._marks.get(writer, {}).get(target) == mark["id"]
            ):
                del self._marks[writer][target]

    def update_status(
        self, *, nodes: Sequence[NodeView], faults: Iterable[Mapping[str, Any]], now: float
    ) -> list[dict[str, Any]]:
        """What the engine says about the nodes, and the platform's active faults
        (``{"node", "kind", "params"}``); returns the events the changes cause."""
        with self._lock:
            events: list[dict[str, Any]] = []
            current = {n.name: n for n in nodes}
            if self._status_known:
                for name, view in current.items():
                    old = self._engine_state.get(name)
                    kind = _status_change(old.state if old else None, view.state)
                    if kind:
                        data = {"state": view.state, "exit_code": view.exit_code}
                        events.append(self._event(now, name, kind, data))
                for name in self._engine_state.keys() - current.keys():
                    events.append(self._event(now, name, "removed", {"state": "missing"}))
            for name in self._engine_state.keys() - current.keys():
                self._forget(name)
            self._engine_state = current
            for view in nodes:
                self._roles[view.name] = view.role
            resuming = not self._status_known and self._event_horizon > 0
            before = self._fault_keys()
            platform: dict[str, dict[str, Any]] = {}
            for fault in faults:
                platform.setdefault(str(fault["node"]), {})[str(fault["kind"])] = fault.get(
                    "params", {}
                )
            self._platform_faults = platform
            if not resuming:  # a resumed stream announced these faults already
                events.extend(self._fault_events(before, now))
            self._status_known = True
            return events

    def _forget(self, name: str) -> None:
        self._roles.pop(name, None)
        self._marks.pop(name, None)
        for marked in self._marks.values():
            marked.pop(name, None)
        self._states.pop(name, None)
        self._gauges.pop(name, None)
        self._tables = {k: v for k, v in self._tables.items() if k[0] != name}
        self._runtime_faults.pop(name, None)
        self._links = {link for link in self._links if name not in link}

    def _fault_keys(self) -> dict[tuple[str, str], Any]:
        keys: dict[tuple[str, str], Any] = {}
        for source in (self._platform_faults, self._runtime_faults):
            for node, kinds in source.items():
                for kind, params in kinds.items():
                    keys.setdefault((node, kind), params)
        return keys

    def _fault_events(
        self, before: Mapping[tuple[str, str], Any], ts: float
    ) -> list[dict[str, Any]]:
        after = self._fault_keys()
        events = [
            self._event(ts, node, "fault", {"kind": kind, "params": after[(node, kind)]})
            for node, kind in after.keys() - before.keys()
        ]
        events += [
            self._event(ts, node, "fault_cleared", {"kind": kind})
            for node, kind in before.keys() - after.keys()
        ]
        return sorted(events, key=lambda e: (e["node"], e["kind"]))

    def _event(
        self,
        ts: float,
        node: str,
        kind: str,
        data: Mapping[str, Any],
        text: str | None = None,
    ) -> dict[str, Any]:
        declared = self._declared_events.get(kind)
        event = {
            "type": "event",
            "v": VERSION,
            "ts": ts,
            "node": node,
            "kind": kind,
            "text": text if text is not None else event_text(node, kind, data),
            "data": dict(data),
        }
        if declared is not None and declared.get("severity", "info") != "info":
            event["severity"] = declared["severity"]
        self._count_event(ts, kind, data)
        self._events.append(event)
        return event

    def _count_event(self, ts: float, kind: str, data: Mapping[str, Any]) -> None:
        """Count an event in the history point of its second (or, when that point is
        already written, in the last one), and keep its numeric fields (the last of each
        in that second) for the experiments' measures."""
        second = math.ceil(ts)
        if self._last_second is not None and second <= self._last_second and self._history:
            point: dict[str, Any] = self._history[-1]
        elif len(self._event_seconds) < 600:
            point = self._event_seconds.setdefault(second, {})
        else:
            return
        counted = point.setdefault("events", {})
        counted[kind] = counted.get(kind, 0) + 1
        numbers = {
            str(k)[:40]: float(v)
            for k, v in list(data.items())[:16]
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        if numbers:
            point.setdefault("event_values", {}).setdefault(kind, {}).update(numbers)

    def ended(self, *, now: float, state: str) -> dict[str, Any]:
        """The sandbox stopped: the last event its viewers get."""
        with self._lock:
            return self._event(now, "", "sandbox_ended", {"state": state})

    # --- output ------------------------------------------------------------------------

    def node_states(self) -> dict[str, str]:
        with self._lock:
            return {name: self._node_state(name) for name in self._node_names()}

    def _node_names(self) -> list[str]:
        if self._status_known:
            return list(self._engine_state)
        return list(self._roles)

    def _node_state(self, name: str) -> str:
        view = self._engine_state.get(name)
        faults = self._fault_keys()
        if view is not None and view.state in DOWN_STATES:
            return "killed"
        if (view is not None and view.state == "paused") or (name, "pause") in faults:
            return "paused"
        if (name, "partition") in faults:
            return "partitioned"
        for writer, marked in self._marks.items():
            if name in marked and writer in self._roles:
                return marked[name]
        return "up"

    def _node_records(self, records: Iterable[Record], name: str) -> list[Record]:
        if self._is_user(name):
            return [r for r in records if r.kind == "call" and r.node == name and not r.probe]
        return [r for r in records if r.kind == "request" and r.node == name and not r.probe]

    def _series_records(self, records: Sequence[Record]) -> dict[str, list[Record]]:
        """Each declared series' records: the calls its node made on its route."""
        return {
            id_: [
                r
                for r in records
                if r.kind == "call" and r.route == route and not r.probe and self._is(r.node, node)
            ]
            for id_, node, route in self._series
        }

    def _totals_records(self, records: Sequence[Record]) -> list[Record]:
        users = {n for n in self._roles if self._is_user(n)}
        if users:
            return [r for r in records if r.kind == "call" and r.node in users and not r.probe]
        return [r for r in records if r.kind == "request" and not r.probe]

    def _observed(self, name: str, now: float) -> dict[str, Any]:
        """A node's gauges (without the built-in in_flight) and states, for frames."""
        out: dict[str, Any] = {}
        gauges = {k: v for k, (_, v) in self._gauges.get(name, {}).items() if k != IN_FLIGHT_GAUGE}
        if gauges:
            out["gauges"] = gauges
        if self._states.get(name):
            out["states"] = dict(self._states[name])
        return out

    def _tables_out(self) -> list[dict[str, Any]]:
        return [
            {"id": table, "node": node, "rows": rows}
            for (node, table), rows in sorted(self._tables.items())
        ]

    def _between(self, start: float, end: float) -> list[Record]:
        return [r for r in self._records if start < r.ts <= end]

    def frame(self, now: float) -> dict[str, Any]:
        with self._lock:
            end = now - self.lag
            start = end - self.window
            self._record_history(end)
            self._prune(end - self.window - 3.0)
            records = self._between(start, end)
            nodes: dict[str, Any] = {}
            for name in self._node_names():
                mine = self._node_records(records, name)
                entry: dict[str, Any] = {"role": self._roles.get(name, "")}
                entry |= stats(mine, self.window)
                entry["in_flight"] = self._in_flight(name, mine, start, end, now)
                entry["state"] = self._node_state(name)
                entry |= self._observed(name, now)
                nodes[name] = entry
            links: dict[str, Any] = {}
            for src, dst in sorted(self._links):
                calls = [r for r in records if r.kind == "call" and r.src == src and r.dst == dst]
                real = [r for r in calls if not r.probe]
                probes = [r for r in calls if r.probe]
                link = stats(real, self.window)
                probe = stats(probes, self.window)
                links[f"{src}>{dst}"] = {
                    "src": src,
                    "dst": dst,
                    **link,
                    "probe_rps": probe["rps"],
                    "probe_error_pct": probe["error_pct"],
                }
            self._seq += 1
            frame = {
                "type": "frame",
                "v": VERSION,
                "ts": now,
                "seq": self._seq,
                "nodes": nodes,
                "links": links,
                "sample": self._take_sample(),
                "totals": stats(self._totals_records(records), self.window),
                "series": {
                    id_: stats(mine, self.window)
                    for id_, mine in self._series_records(records).items()
                },
                "faults": [{"node": n, "kind": k} for n, k in sorted(self._fault_keys())],
                "tables": self._tables_out(),
            }
            self._last_frame = frame
            return frame

    def _in_flight(
        self, name: str, mine: Sequence[Record], start: float, end: float, now: float
    ) -> float:
        reported = self._gauges.get(name, {}).get(IN_FLIGHT_GAUGE)
        if reported is not None and now - reported[0] <= 2.0:
            return reported[1]
        busy = sum(max(0.0, min(r.ts, end) - max(r.ts - r.ms / 1000.0, start)) for r in mine)
        return round(busy / (end - start), 2)

    def _take_sample(self) -> list[dict[str, Any]]:
        fresh, self._fresh_calls = self._fresh_calls, []
        if len(fresh) > self.sample_size:
            step = len(fresh) / self.sample_size
            fresh = [fresh[int(i * step)] for i in range(self.sample_size)]
        return [
            {"src": r.src, "dst": r.dst, "status": r.status, "ms": round(r.ms, 2), "ts": r.ts}
            | ({"trace": r.trace} if r.trace else {})
            for r in sorted(fresh, key=lambda r: r.ts)
        ]

    def _prune(self, before: float) -> None:
        while self._records and self._records[0].ts < before:
            self._records.popleft()

    def _record_history(self, end: float) -> None:
        """A point for every whole second completed since the last one (not older than
        the records kept)."""
        last_whole = math.floor(end)
        if self._last_second is None:
            self._last_second = last_whole - 1
        first = max(self._last_second + 1, last_whole - 2)
        for second in range(first, last_whole + 1):
            records = self._between(second - 1, second)
            users = self._totals_records(records)
            nodes = {name: self._node_records(records, name) for name in self._node_names()}
            links: dict[str, list[Record]] = {}
            for r in records:
                if r.kind == "call" and not r.probe:
                    links.setdefault(f"{r.src}>{r.dst}", []).append(r)
            point_events = self._event_seconds.pop(second, None)
            point_nodes: dict[str, Any] = {}
            for name, mine in nodes.items():
                point_nodes[name] = stats(mine, 1.0) | counts(mine) | self._observed(name, second)
                point_nodes[name]["state"] = self._node_state(name)
                point_nodes[name]["in_flight"] = self._in_flight(
                    name, mine, second - 1, second, second
                )
            self._history.append(
                {
                    "ts": second,
                    "totals": stats(users, 1.0) | counts(users, detail=True),
                    "nodes": point_nodes,
                    "links": {
                        key: stats(calls, 1.0) | counts(calls, detail=True)
                        for key, calls in sorted(links.items())
                    },
                }
            )
            if self._series:
                self._history[-1]["series"] = {
                    id_: stats(mine, 1.0) | counts(mine, detail=True)
                    for id_, mine in self._series_records(records).items()
                }
            if point_events:
                self._history[-1].update(point_events)
        for stale in [s for s in self._event_seconds if s <= last_whole]:
            del self._event_seconds[stale]
        self._last_second = max(self._last_second, last_whole)

    def snapshot(self, now: float) -> dict[str, Any]:
        with self._lock:
            return {
                "type": "snapshot",
                "v": VERSION,
                "ts": now,
                "nodes": {
                    name: {"role": self._roles.get(name, ""), "state": self._node_state(name)}
                    for name in self._node_names()
                },
                "frame": self._last_frame,
                "history": list(self._history),
                "events": list(self._events),
                "tables": self._tables_out(),
                "undeclared": dict(self._undeclared),
            }

    def inspect(self) -> dict[str, Any]:
        """The collector's traces and log lines, newest last (``inspect_cache_key``)."""
        with self._lock:
            return {"traces": list(self._traces), "logs": list(self._logs)}

    @property
    def inspects(self) -> bool:
        return bool(self._trace_node or self._log_node)

    def resume(self, snapshot: Mapping[str, Any]) -> None:
        """Continue from a snapshot a previous supervisor stored: keep its history and
        events, and do not announce again what it had already announced."""
        with self._lock:
            history = [p for p in snapshot.get("history", []) if isinstance(p, dict)]
            self._history.extend(history)
            if history:
                self._last_second = int(history[-1]["ts"])
            events = [e for e in snapshot.get("events", []) if isinstance(e, dict)]
            self._events.extend(events)
            self._event_horizon = max((float(e.get("ts", 0)) for e in events), default=0.0)


def _text(value: Any, limit: int = MAX_TEXT_FIELD_CHARS) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def clean_trace(line: Mapping[str, Any]) -> dict[str, Any] | None:
    """A ``trace`` line as the lab shows it, or None: ids and names as short strings,
    times as finite numbers, at most ``MAX_SPANS`` spans (a node's output is untrusted)."""
    trace_id = _text(line.get("trace_id"), 64)
    started, ms = _number(line.get("started")), _number(line.get("ms"))
    spans_in = line.get("spans")
    if not trace_id or started is None or ms is None or not isinstance(spans_in, list):
        return None
    spans = []
    for raw in spans_in[:MAX_SPANS]:
        if not isinstance(raw, Mapping):
            continue
        start, span_ms = _number(raw.get("start")), _number(raw.get("ms"))
        if start is None or span_ms is None:
            continue
        spans.append(
            {
                "span_id": _text(raw.get("span_id"), 32),
                "parent_id": _text(raw.get("parent_id"), 32),
                "service": _text(raw.get("service"), MAX_CELL_CHARS),
                "name": _text(raw.get("name"), MAX_CELL_CHARS),
                "kind": _text(raw.get("kind"), 16),
                "offset_ms": round(max(0.0, (start - started) * 1000), 2),
                "ms": round(max(0.0, span_ms), 2),
                "status": "error" if raw.get("status") == "error" else "ok",
            }
        )
    if not spans:
        return None
    return {
        "trace_id": trace_id,
        "root": _text(line.get("root"), MAX_CELL_CHARS),
        "service": _text(line.get("service"), MAX_CELL_CHARS),
        "started": started,
        "ms": round(max(0.0, ms), 2),
        "status": "error" if line.get("status") == "error" else "ok",
        "spans": spans,
    }


def clean_log(entry: Any) -> dict[str, Any] | None:
    """One line of the central log, or None."""
    if not isinstance(entry, Mapping) or _number(entry.get("ts")) is None:
        return None
    level = entry.get("level")
    return {
        "ts": _number(entry.get("ts")),
        "service": _text(entry.get("service"), MAX_CELL_CHARS),
        "level": level if level in LOG_LEVELS else "info",
        "msg": _text(entry.get("msg")),
        "trace_id": _text(entry.get("trace_id"), 64),
        "span_id": _text(entry.get("span_id"), 32),
    }


def _status_change(old: str | None, new: str) -> str | None:
    if old is None:
        return "added"
    if old == new:
        return None
    if new in DOWN_STATES:
        return None if old in DOWN_STATES else "down"
    if new == "paused":
        return "paused"
    if old == "paused":
        return "resumed"
    return "up"
