"""Patterns: the blueprints in ``sandboxes/patterns/<pattern_id>/``, loaded and validated.

A pattern is a folder holding ``pattern.yaml`` (its topology, traffic profile, faults,
live controls and experiments; the format is documented in ``sandboxes/README.md``) and
the node programs it names. ``load_pattern`` reads and checks the spec, raising
``PatternError`` with ``file:line`` on the first problem; ``Pattern.expand`` turns it into
the concrete nodes an engine starts (``replica-1`` … ``replica-N``), each with its
environment.

Pure Python: no Django, no database, so the engines, commands and tests can all use it.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn

import yaml

from apps.labs.measures import MEASURES, Output, TemplateError, safe_format, template_fields
from sandboxes.runtime.faults import ENGINE_KINDS, RUNTIME_KINDS
from sandboxes.runtime.telemetry import RUNTIME_EVENTS

PATTERNS_ROOT = Path(__file__).resolve().parent.parent.parent / "sandboxes" / "patterns"
# Programs several patterns share (the traffic generator), used when a pattern's own
# folder has no file of that name: ``sandboxes/programs/`` beside ``patterns/``.
SPEC_FILE = "pattern.yaml"

FAULT_KINDS = (*ENGINE_KINDS, *RUNTIME_KINDS)  # kill, pause, restart, latency, errors, …
CONTROL_KINDS = ("choice", "toggle", "number", "scale")
LINK_KINDS = ("request", "probe")
DIRECTIONS = ("left-to-right", "top-to-bottom")
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE")
KEY_DISTRIBUTIONS = ("uniform", "zipf")
MAX_COUNT = 20  # replicas of one role, at most
MAX_RPS = 200
# Set by the engine or derived from the spec: a node's `env` may not set them.
RESERVED_ENV = frozenset(
    {
        "DISTLAB_SANDBOX",
        "DISTLAB_NODE",
        "DISTLAB_ROLE",
        "DISTLAB_PATTERN",
        "DISTLAB_LISTEN",
        "DISTLAB_PEERS",
        "DISTLAB_CONTROL",
        "DISTLAB_TRAFFIC",
        "DISTLAB_PARAMS",
    }
)
TRAFFIC_ENV = "DISTLAB_TRAFFIC"  # the traffic profile, as JSON, for the traffic node
PARAMS_ENV = "DISTLAB_PARAMS"  # the pattern's params, as JSON, for every node
SEVERITIES = ("info", "warning", "error")
# A node's state in frames besides marks: a mark may not take one of these names.
NODE_STATES = ("up", "killed", "paused", "partitioned")
# Events the platform itself logs (engine status, faults, the runtime's own), which an
# experiment may count besides a pattern's declared ones.
PLATFORM_EVENTS = (
    "started",
    "stopped",
    "failed",
    "config",
    "task_failed",
    "fault",
    "fault_cleared",
    "down",
    "up",
    "paused",
    "resumed",
    "added",
    "removed",
    "set",
)
MAX_TABLE_COLUMNS = 8

PATTERN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
NAME_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?$")
KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
ENV_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,127}$")
PROGRAM_RE = re.compile(r"^[a-z_][a-z0-9_]*\.py$")
INSTANCE_RE = re.compile(r"^(?P<role>.+)-(?P<n>[1-9][0-9]*)$")

EXPERIMENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # experiments, steps, options
PREDICTION_KINDS = ("choice", "number")
ACTION_KINDS = ("fault", "control")
JUDGE_OPS = ("lt", "le", "gt", "ge", "eq", "ne")
# The parameters the platform's faults take (services.FAULT_PARAMS checks their values).
FAULT_PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "latency": ("ms", "jitter_ms"),
    "errors": ("rate", "status"),
    "drop": ("rate",),
}
MAX_FAULT_S = 600
MAX_STEP_S = 120
MAX_EXPERIMENT_S = 240  # the history the check reads holds 5 minutes
# "0.8 * rr_share_pct": a judging rule's operand may scale another measured value.
OPERAND_RE = re.compile(r"^(?:(?P<factor>[0-9]+(?:\.[0-9]+)?)\s*\*\s*)?(?P<name>[a-z][a-z0-9_]*)$")
TEMPLATE_EXTRAS = ("prediction", "answer")  # besides measured and spec values

PREDICTION_MISSING = "Choose an answer before you start."
PREDICTION_UNKNOWN = "{value!r} is not one of the answers: choose one of the options."
PREDICTION_NOT_NUMBER = "Enter your prediction as a number{unit}."
PREDICTION_OUT_OF_RANGE = "Your prediction must be from {min:g} to {max:g}{unit}."

UNKNOWN_PATTERN = "No pattern named {pattern_id!r}."
UNKNOWN_KEY = "unknown key {key!r} (expected one of: {expected})"
MISSING_KEY = "missing key {key!r}"
UNKNOWN_NODE = "unknown node {name!r} (nodes: {names})"
MISSING_PROGRAM = "program {program!r} not found in {folder}"
UNKNOWN_FAULT = "unknown fault kind {kind!r} (expected one of: {expected})"
NOT_REPLICATED = "{role!r} is not a replicated role of pattern {pattern_id!r} (replicated: {roles})"
COUNT_OUT_OF_RANGE = "{role} count must be from {min} to {max}, got {count!r}"


class PatternError(ValueError):
    """A pattern that does not exist or does not validate. The message is shown to
    people; for spec problems it starts with ``file:line:``."""


class PatternNotFound(PatternError):
    pass


# ---- the model -------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeDef:
    """One entry of ``nodes``: a single node (``count`` is None), or a replicated role
    whose instances are ``<role>-1`` … ``<role>-<count>`` (its ``name`` is the role)."""

    name: str
    role: str
    program: str
    env: Mapping[str, str]
    count: int | None = None  # default number of instances (replicated roles only)
    min_count: int | None = None
    max_count: int | None = None
    line: int = 0

    @property
    def replicated(self) -> bool:
        return self.count is not None

    def instance_names(self, count: int | None = None) -> list[str]:
        if self.count is None:
            return [self.name]
        return [f"{self.role}-{n}" for n in range(1, (count or self.count) + 1)]


@dataclass(frozen=True)
class Link:
    """``source`` calls ``target`` (node names, or replicated roles meaning every instance)."""

    source: str
    target: str
    label: str = ""
    kind: str = "request"  # "probe": health checks and the like, drawn dashed
    route: str = ""  # a probe's route (its calls count only as probes), "/health" by default


@dataclass(frozen=True)
class Series:
    """Calls ``node`` (a node, or a replicated role) makes on ``route``, charted and
    measured apart from the rest (``series:`` in the spec)."""

    id: str
    label: str
    node: str
    route: str


@dataclass(frozen=True)
class Layout:
    """Graph hints: columns (or rows, top-to-bottom) of node names and replicated roles;
    a replicated role's instances stack inside its cell."""

    direction: str
    columns: tuple[tuple[str, ...], ...]

    def column_of(self, name: str) -> int:
        for index, column in enumerate(self.columns):
            if name in column:
                return index
        raise KeyError(name)


@dataclass(frozen=True)
class RequestKind:
    method: str
    path: str  # ``{key}`` is replaced by a key from the key space
    weight: float
    target: str = ""  # the profile's target when empty


@dataclass(frozen=True)
class KeySpace:
    count: int
    distribution: str  # "uniform" or "zipf"
    s: float  # zipf exponent (ignored for uniform)


@dataclass(frozen=True)
class Traffic:
    """The traffic profile, handed to ``node`` as JSON in ``DISTLAB_TRAFFIC``."""

    node: str
    target: str
    rps: float
    timeout_s: float
    max_in_flight: int
    mix: tuple[RequestKind, ...]
    keys: KeySpace

    def as_json(self) -> str:
        return json.dumps(
            {
                "target": self.target,
                "rps": self.rps,
                "timeout_s": self.timeout_s,
                "max_in_flight": self.max_in_flight,
                "mix": [
                    {"method": m.method, "path": m.path, "weight": m.weight, "target": m.target}
                    for m in self.mix
                ],
                "keys": {
                    "count": self.keys.count,
                    "distribution": self.keys.distribution,
                    "s": self.keys.s,
                },
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True)
class EventDef:
    """A program event (``node.event(id, …)``): its text for the event log is ``text``
    filled with ``node`` (the writer) and the event's fields."""

    id: str
    text: str
    severity: str = "info"


@dataclass(frozen=True)
class MarkDef:
    """A state one node puts on another: set by the events ``set_by`` and cleared by
    ``cleared_by`` (each naming the marked node in its ``target`` field)."""

    id: str
    label: str
    set_by: tuple[str, ...]
    cleared_by: tuple[str, ...]


@dataclass(frozen=True)
class GaugeDef:
    id: str
    label: str
    unit: str
    nodes: tuple[str, ...]  # node names or roles that report it
    graph: bool = True  # shown under its node on the graph (always charted and listed)


@dataclass(frozen=True)
class StateDef:
    id: str
    label: str
    values: tuple[str, ...]
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class ColumnDef:
    id: str
    label: str
    unit: str = ""


@dataclass(frozen=True)
class TableDef:
    id: str
    label: str
    node: str  # a node name or a role
    columns: tuple[ColumnDef, ...]


@dataclass(frozen=True)
class Observe:
    """What a pattern's nodes report besides requests: ``observe`` in the spec."""

    events: tuple[EventDef, ...] = ()
    marks: tuple[MarkDef, ...] = ()
    gauges: tuple[GaugeDef, ...] = ()
    states: tuple[StateDef, ...] = ()
    tables: tuple[TableDef, ...] = ()
    traces: str = ""  # the node whose ``trace`` lines are the lab's traces (a collector)
    logs: str = ""  # the node whose ``logs`` lines are the lab's central log

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the aggregator and the browser (JSON-serialisable)."""
        return {
            "events": {e.id: {"text": e.text, "severity": e.severity} for e in self.events},
            "marks": [
                {"id": m.id, "label": m.label, "set_by": m.set_by, "cleared_by": m.cleared_by}
                for m in self.marks
            ],
            "gauges": [
                {"id": g.id, "label": g.label, "unit": g.unit, "nodes": g.nodes, "graph": g.graph}
                for g in self.gauges
            ],
            "states": [
                {"id": x.id, "label": x.label, "values": x.values, "nodes": x.nodes}
                for x in self.states
            ],
            "tables": [
                {
                    "id": t.id,
                    "label": t.label,
                    "node": t.node,
                    "columns": [{"id": c.id, "label": c.label, "unit": c.unit} for c in t.columns],
                }
                for t in self.tables
            ],
            "traces": self.traces,
            "logs": self.logs,
        }


@dataclass(frozen=True)
class Control:
    """A live control. ``choice``, ``toggle`` and ``number`` set the setting ``key`` of
    ``node`` (``{"op": "config", "set": {key: value}}``): a single node, or a replicated
    role (``replicated``: every instance, those started later included); ``scale`` sets how
    many instances of the replicated ``role`` run."""

    id: str
    label: str
    kind: str
    node: str | None = None
    role: str | None = None
    key: str | None = None
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    step: float | None = None
    default: Any = None
    replicated: bool = False

    def applies_to(self, name: str, role: str) -> bool:
        """Whether this control sets a setting of the node ``name`` (of ``role``)."""
        if self.kind == "scale":
            return False
        return self.node == (role if self.replicated else name)

    def validate(self, value: Any) -> Any:
        """Return ``value`` as this control takes it, or raise ValueError saying why not."""
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if self.kind == "toggle":
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {value!r}")
        if not math.isfinite(value) or (self.kind == "scale" and value != int(value)):
            raise ValueError(f"must be a whole number, got {value!r}")
        assert self.min is not None and self.max is not None
        if not self.min <= value <= self.max:
            raise ValueError(f"must be from {self.min:g} to {self.max:g}, got {value!r}")
        return int(value) if self.kind == "scale" else value


@dataclass(frozen=True)
class Option:
    id: str
    label: str


@dataclass(frozen=True)
class Prediction:
    """What the learner answers before acting: one of ``options`` (``choice``), or a
    number with a ``unit``, optionally bounded (``number``)."""

    question: str
    kind: str
    options: tuple[Option, ...] = ()
    unit: str = ""
    min: float | None = None
    max: float | None = None

    def option(self, option_id: Any) -> Option | None:
        return next((o for o in self.options if o.id == option_id), None)

    def validate(self, raw: Any) -> str | float:
        """The prediction as stored (an option id, or a float), or ValueError with a
        sentence for the learner. Numbers may come as form text."""
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise ValueError(
                PREDICTION_MISSING
                if self.kind == "choice"
                else PREDICTION_NOT_NUMBER.format(unit=self._in_unit())
            )
        if self.kind == "choice":
            if self.option(raw) is None:
                raise ValueError(PREDICTION_UNKNOWN.format(value=raw))
            return str(raw)
        value = raw
        if isinstance(raw, str):
            try:
                value = float(raw.strip().replace(",", "."))
            except ValueError:
                value = None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(PREDICTION_NOT_NUMBER.format(unit=self._in_unit()))
        low = -math.inf if self.min is None else self.min
        high = math.inf if self.max is None else self.max
        if not low <= value <= high:
            raise ValueError(
                PREDICTION_OUT_OF_RANGE.format(
                    min=low, max=high, unit=f" {self.unit}" if self.unit else ""
                )
            )
        return float(value)

    def show(self, value: Any) -> str:
        """A prediction (or an answer) as the learner reads it."""
        if self.kind == "choice":
            option = self.option(value)
            return option.label if option else str(value)
        if isinstance(value, int | float):
            return f"{value:g} {self.unit}".strip()
        return str(value)

    def _in_unit(self) -> str:
        return f" (in {self.unit})" if self.unit else ""


@dataclass(frozen=True)
class Action:
    """What a step does as it starts: a ``fault`` (``node``, ``fault`` kind, ``duration_s``,
    ``params``), given to ``services.fault_inject``; or a ``control`` (``control`` id, and
    ``value``, or ``restore``: the value it had when the run started), given to
    ``services.sandbox_control``."""

    kind: str
    node: str = ""
    fault: str = ""
    duration_s: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)
    control: str = ""
    value: Any = None
    restore: bool = False

    def describe(self) -> str:
        if self.kind == "fault":
            params = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
            how = f" ({params})" if params else ""
            length = f" for {self.duration_s} s" if self.duration_s else ""
            return f"{self.fault} {self.node}{how}{length}"
        if self.restore:
            return f"put {self.control} back as it was"
        value = json.dumps(self.value) if isinstance(self.value, bool) else self.value
        return f"set {self.control} to {value}"


@dataclass(frozen=True)
class Step:
    id: str
    text: str
    actions: tuple[Action, ...]
    duration_s: float  # before the next step (or, for the last, before the check)


@dataclass(frozen=True)
class Condition:
    """``value op operand``: operand is a number, or ``factor`` times another measured value."""

    value: str
    op: str
    operand: float | str
    factor: float = 1.0

    def holds(self, measured: Mapping[str, float]) -> bool:
        left = measured[self.value]
        right = (
            self.factor * measured[self.operand] if isinstance(self.operand, str) else self.operand
        )
        return {
            "lt": left < right,
            "le": left <= right,
            "gt": left > right,
            "ge": left >= right,
            "eq": left == right,
            "ne": left != right,
        }[self.op]


@dataclass(frozen=True)
class Rule:
    answer: str
    conditions: tuple[Condition, ...] = ()

    def holds(self, measured: Mapping[str, float]) -> bool:
        return all(c.holds(measured) for c in self.conditions)


@dataclass(frozen=True)
class Judge:
    """How a prediction is judged. Choice: the first of ``rules`` that holds names the
    right option (the last rule has no conditions). Number: the measured ``value`` is the
    answer; the prediction is right within ``tolerance`` (absolute) or ``tolerance_pct``
    (of the answer), or when it falls in the same bucket (``buckets``: ascending edges,
    each bucket ``[edge, next edge)``)."""

    rules: tuple[Rule, ...] = ()
    value: str = ""
    tolerance: float | None = None
    tolerance_pct: float | None = None
    buckets: tuple[float, ...] = ()

    def answer(self, measured: Mapping[str, float]) -> str | float:
        if self.rules:
            return next(r.answer for r in self.rules if r.holds(measured))
        return measured[self.value]

    def correct(self, prediction: Any, measured: Mapping[str, float]) -> bool:
        answer = self.answer(measured)
        if self.rules:
            return prediction == answer
        assert isinstance(answer, int | float)
        if self.buckets:
            return bisect.bisect_right(self.buckets, prediction) == bisect.bisect_right(
                self.buckets, answer
            )
        miss = abs(float(prediction) - answer)
        return (self.tolerance is not None and miss <= self.tolerance + 1e-9) or (
            self.tolerance_pct is not None and miss <= self.tolerance_pct / 100 * abs(answer) + 1e-9
        )


@dataclass(frozen=True)
class Check:
    """The automatic check: a measure (``measures.MEASURES``) with its parameters, how the
    prediction is judged, and the explanation: a template per right answer (option id)
    or ``default``, filled with the measured values, the pattern's values
    (``Pattern.spec_values``), ``prediction`` and ``answer``."""

    measure: str
    params: Mapping[str, Any]
    judge: Judge
    explanation: Mapping[str, str]
    outputs: Mapping[str, Output]
    show: tuple[str, ...]  # the measured values the result lists, in order

    def template(self, answer: Any) -> str:
        return self.explanation.get(str(answer), self.explanation.get("default", ""))


@dataclass(frozen=True)
class Experiment:
    """A guided predict → act → observe exercise (``experiments:`` in the spec)."""

    id: str
    title: str
    intro: str
    prediction: Prediction
    steps: tuple[Step, ...]
    check: Check
    line: int = 0

    @property
    def duration_s(self) -> float:
        return sum(s.duration_s for s in self.steps)

    def step_offsets(self) -> list[float]:
        """When each step is due, in seconds after the run starts; then the end."""
        offsets = [0.0]
        for step in self.steps:
            offsets.append(offsets[-1] + step.duration_s)
        return offsets


class ConcreteNode(NamedTuple):
    """One node to start: unpacks as ``(name, role, program, env)``."""

    name: str
    role: str
    program: str
    env: dict[str, str]


@dataclass(frozen=True)
class Scenario:
    """A scripted sequence of the pattern's experiments (``scenario`` in the spec): the
    learner predicts each before its faults are injected, in order, and is scored on the
    predictions their own telemetry confirmed."""

    title: str
    intro: str
    experiments: tuple[str, ...]  # experiment ids, in order


@dataclass(frozen=True)
class Pattern:
    id: str
    title: str
    summary: str
    folder: Path
    nodes: tuple[NodeDef, ...]
    links: tuple[Link, ...]
    layout: Layout
    faults: tuple[str, ...]
    controls: tuple[Control, ...]
    traffic: tuple[Traffic, ...] = ()
    users: tuple[str, ...] = ()  # single nodes or roles whose calls are what users see
    params: Mapping[str, Any] = field(default_factory=dict)
    observe: Observe = Observe()
    experiments: tuple[Experiment, ...] = ()
    series: tuple[Series, ...] = ()
    scenario: Scenario | None = None
    _by_instance_role: Mapping[str, NodeDef] = field(default_factory=dict, repr=False)

    def expand(self, count_overrides: Mapping[str, int] | None = None) -> list[ConcreteNode]:
        """The concrete nodes, in spec order: replicated roles expanded to their default
        count, or to ``count_overrides[role]`` (which must be within the role's bounds)."""
        counts = {d.role: d.count for d in self.nodes if d.count is not None}
        for role, count in (count_overrides or {}).items():
            node_def = self._by_instance_role.get(role)
            if node_def is None:
                raise PatternError(
                    NOT_REPLICATED.format(
                        role=role, pattern_id=self.id, roles=", ".join(counts) or "none"
                    )
                )
            assert node_def.min_count is not None and node_def.max_count is not None
            if (
                isinstance(count, bool)
                or not isinstance(count, int)
                or not node_def.min_count <= count <= node_def.max_count
            ):
                raise PatternError(
                    COUNT_OUT_OF_RANGE.format(
                        role=role, min=node_def.min_count, max=node_def.max_count, count=count
                    )
                )
            counts[role] = count
        out = []
        for node_def in self.nodes:
            for name in node_def.instance_names(counts.get(node_def.role)):
                out.append(ConcreteNode(name, node_def.role, node_def.program, self._env(node_def)))
        return out

    def node(self, name: str) -> ConcreteNode:
        """The concrete node called ``name``, including replicas beyond the default count
        (``replica-5`` exists when the role may scale to 5 or more). Raises PatternError."""
        node_def = self.node_def(name)
        if node_def is None:
            raise PatternError(UNKNOWN_NODE.format(name=name, names=", ".join(self.node_names())))
        return ConcreteNode(name, node_def.role, node_def.program, self._env(node_def))

    def node_def(self, name: str) -> NodeDef | None:
        """The definition an instance name belongs to (``replica-2`` → the replica role)."""
        for node_def in self.nodes:
            if node_def.count is None and node_def.name == name:
                return node_def
        match = INSTANCE_RE.match(name)
        if match:
            role_def = self._by_instance_role.get(match["role"])
            if role_def is not None and int(match["n"]) <= (role_def.max_count or 0):
                return role_def
        return None

    def node_names(self) -> list[str]:
        return [n.name for n in self.expand()]

    def control(self, control_id: str) -> Control | None:
        return next((c for c in self.controls if c.id == control_id), None)

    def experiment(self, experiment_id: str) -> Experiment | None:
        return next((e for e in self.experiments if e.id == experiment_id), None)

    def spec_values(self) -> dict[str, Any]:
        """Values from the spec an explanation template may use, by dotted name: every
        ``params.<name>``, and ``traffic.rps`` / ``traffic.timeout_s`` of the first
        traffic profile (``traffic.<node>.rps`` … of each)."""
        values: dict[str, Any] = {f"params.{k}": v for k, v in self.params.items()}
        for index, profile in enumerate(self.traffic):
            prefixes = [f"traffic.{profile.node}"] + (["traffic"] if index == 0 else [])
            for prefix in prefixes:
                values[f"{prefix}.rps"] = profile.rps
                values[f"{prefix}.timeout_s"] = profile.timeout_s
        return values

    def programs(self) -> dict[str, list[NodeDef]]:
        """Each program the nodes run, in spec order → the entries of ``nodes`` that run it."""
        out: dict[str, list[NodeDef]] = {}
        for d in self.nodes:
            out.setdefault(d.program, []).append(d)
        return out

    def user_nodes(self, names: Sequence[str]) -> list[str]:
        """Which of ``names`` (running nodes) make what users see (``users:``)."""
        return [n for n in names if n in self.users or _role_of(self, n) in self.users]

    def probes(self) -> list[dict[str, str]]:
        """The probe links as ``{"from", "to", "route"}`` (roles stand for every instance)."""
        return [
            {"from": link.source, "to": link.target, "route": link.route or "/health"}
            for link in self.links
            if link.kind == "probe"
        ]

    def telemetry_spec(self) -> dict[str, Any]:
        """What the aggregator needs to know of this pattern (plain data): roles of the
        replicated entries, users, probes, series and ``observe``."""
        return {
            "roles": sorted(d.role for d in self.nodes if d.replicated),
            "users": list(self.users),
            "probes": self.probes(),
            "series": self.series_list(),
            "observe": self.observe.as_dict(),
        }

    def series_list(self) -> list[dict[str, str]]:
        """The ``series`` as plain data: ``{"id", "label", "node", "route"}``."""
        return [
            {"id": s.id, "label": s.label, "node": s.node, "route": s.route} for s in self.series
        ]

    def _env(self, node_def: NodeDef) -> dict[str, str]:
        env = dict(node_def.env)
        for profile in self.traffic:
            if profile.node == node_def.name:
                env[TRAFFIC_ENV] = profile.as_json()
        if self.params:
            env[PARAMS_ENV] = json.dumps(dict(self.params), separators=(",", ":"))
        return env


# ---- finding and loading -----------------------------------------------------------------


def pattern_ids(root: Path = PATTERNS_ROOT) -> list[str]:
    """Every pattern folder (one holding a pattern.yaml), sorted. Not validated."""
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if PATTERN_ID_RE.match(p.name) and (p / SPEC_FILE).is_file()
    )


def load_pattern(pattern_id: str, root: Path = PATTERNS_ROOT) -> Pattern:
    """Load and validate one pattern. Raises PatternNotFound (message UNKNOWN_PATTERN) or
    PatternError (``file:line: problem``). Cached until the spec file changes."""
    if not isinstance(pattern_id, str) or not PATTERN_ID_RE.match(pattern_id):
        raise PatternNotFound(UNKNOWN_PATTERN.format(pattern_id=pattern_id))
    path = root / pattern_id / SPEC_FILE
    try:
        stat = path.stat()
    except OSError:
        raise PatternNotFound(UNKNOWN_PATTERN.format(pattern_id=pattern_id)) from None
    return _load(pattern_id, root, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _load(pattern_id: str, root: Path, mtime_ns: int, size: int) -> Pattern:
    folder = root / pattern_id
    path = folder / SPEC_FILE
    spec = _Spec(path)
    return spec.build(pattern_id, folder, _read(spec, path.read_text(encoding="utf-8")))


# ---- YAML with line numbers ------------------------------------------------------------


def program_path(pattern: Pattern, program: str) -> Path:
    """Where a node's program is: the pattern's folder, else the shared programs."""
    return _program_file(pattern.folder, program)


def _program_file(folder: Path, program: str) -> Path:
    own = folder / program
    return own if own.is_file() else folder.parent.parent / "programs" / program


def pattern_problems(root: Path = PATTERNS_ROOT) -> list[tuple[Path, int, str]]:
    """What is wrong with the patterns, as ``(file, line, message)``: a spec that does not
    load, and a declared gauge, state or table that no program of the nodes it names ever
    reports (its id never appears as a string in their source)."""
    problems: list[tuple[Path, int, str]] = []
    for pattern_id in pattern_ids(root):
        try:
            pattern = load_pattern(pattern_id, root)
        except PatternError as exc:
            where, _, message = str(exc).partition(": ")
            line = int(where.rsplit(":", 1)[-1]) if where.rsplit(":", 1)[-1].isdigit() else 1
            problems.append((root / pattern_id / SPEC_FILE, line, message or str(exc)))
            continue
        declared = [("gauge", g.id, g.nodes, "node.gauge") for g in pattern.observe.gauges]
        declared += [("state", x.id, x.nodes, "node.set_state") for x in pattern.observe.states]
        declared += [("table", t.id, (t.node,), "node.table") for t in pattern.observe.tables]
        for kind, id_, refs, call in declared:
            programs = {d.program for d in pattern.nodes if d.name in refs or d.role in refs}
            sources = [program_path(pattern, p).read_text(encoding="utf-8") for p in programs]
            if not any(f'"{id_}"' in text or f"'{id_}'" in text for text in sources):
                problems.append(
                    (
                        root / pattern_id / SPEC_FILE,
                        1,
                        f"observe: the {kind} {id_!r} is declared but never reported: no "
                        f"{call}({id_!r}, …) in {', '.join(sorted(programs))}",
                    )
                )
    return problems


class _Map(dict[str, Any]):
    line: int
    key_lines: dict[str, int]


class _Seq(list[Any]):
    line: int
    item_lines: list[int]


def _read(spec: _Spec, text: str) -> _Map:
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        spec.fail(mark.line + 1 if mark else 1, f"invalid YAML: {exc.problem or exc}")
    except yaml.YAMLError as exc:
        spec.fail(1, f"invalid YAML: {exc}")
    if document is None:
        spec.fail(1, "the file is empty")
    top = _convert(spec, document, yaml.constructor.SafeConstructor(), set())
    if not isinstance(top, _Map):
        spec.fail(1, "the file must be a mapping of keys (title, nodes, …)")
    return top


def _convert(spec: _Spec, node: yaml.Node, constructor: Any, seen: set[int]) -> Any:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.CollectionNode):
        if id(node) in seen:  # an alias: refused, so a spec can never blow up in size
            spec.fail(line, "anchors and aliases (&name, *name) are not supported")
        seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        mapping = _Map()
        mapping.line, mapping.key_lines = line, {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                spec.fail(key_line, "keys must be plain words")
            key = str(key_node.value)
            if key in mapping:
                spec.fail(
                    key_line, f"duplicate key {key!r} (first on line {mapping.key_lines[key]})"
                )
            mapping[key] = _convert(spec, value_node, constructor, seen)
            mapping.key_lines[key] = key_line
        return mapping
    if isinstance(node, yaml.SequenceNode):
        sequence = _Seq(_convert(spec, item, constructor, seen) for item in node.value)
        sequence.line = line
        sequence.item_lines = [item.start_mark.line + 1 for item in node.value]
        return sequence
    try:
        return constructor.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        spec.fail(line, f"invalid value: {exc}")


# ---- validation --------------------------------------------------------------------------


class _Spec:
    """Reads one spec file's values, failing with ``file:line: where: problem``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.shown = str(path.relative_to(PATTERNS_ROOT.parent.parent))
        except ValueError:
            self.shown = str(path)

    def fail(self, line: int, message: str) -> NoReturn:
        raise PatternError(f"{self.shown}:{line}: {message}")

    # -- typed getters: ``where`` names the value for the message ("nodes[2].count") --

    def keys(self, m: _Map, where: str, required: Sequence[str], optional: Sequence[str]) -> None:
        allowed = [*required, *optional]
        for key in m:
            if key not in allowed:
                self.fail(
                    m.key_lines[key],
                    f"{where}: " + UNKNOWN_KEY.format(key=key, expected=", ".join(allowed)),
                )
        for key in required:
            if key not in m:
                self.fail(m.line, f"{where}: " + MISSING_KEY.format(key=key))

    def line(self, m: _Map, key: str) -> int:
        return m.key_lines.get(key, m.line)

    def mapping(self, m: _Map, key: str, where: str) -> _Map:
        value = m[key]
        if not isinstance(value, _Map):
            self.fail(self.line(m, key), f"{where}: must be a mapping of keys")
        return value

    def sequence(self, m: _Map, key: str, where: str) -> _Seq:
        value = m[key]
        if not isinstance(value, _Seq):
            self.fail(self.line(m, key), f"{where}: must be a list")
        return value

    def text(self, m: _Map, key: str, where: str, pattern: re.Pattern[str] | None = None) -> str:
        value = m[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(self.line(m, key), f"{where}: must be a non-empty string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            self.fail(self.line(m, key), f"{where}: {value!r} is not a valid name here")
        return value

    def number(self, m: _Map, key: str, where: str, low: float, high: float) -> float:
        value = m[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self.fail(self.line(m, key), f"{where}: must be a number, got {value!r}")
        if not low <= value <= high:
            self.fail(
                self.line(m, key), f"{where}: must be from {low:g} to {high:g}, got {value!r}"
            )
        return float(value)

    def integer(self, m: _Map, key: str, where: str, low: int, high: int) -> int:
        value = m[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(self.line(m, key), f"{where}: must be a whole number, got {value!r}")
        if not low <= value <= high:
            self.fail(self.line(m, key), f"{where}: must be from {low} to {high}, got {value!r}")
        return value

    def number_or(
        self, m: _Map, key: str, where: str, low: float, high: float, default: float
    ) -> float:
        return self.number(m, key, where, low, high) if key in m else default

    def integer_or(self, m: _Map, key: str, where: str, low: int, high: int, default: int) -> int:
        return self.integer(m, key, where, low, high) if key in m else default

    def item(self, seq: _Seq, index: int, where: str) -> _Map:
        value = seq[index]
        if not isinstance(value, _Map):
            self.fail(seq.item_lines[index], f"{where}: must be a mapping of keys")
        return value

    # -- the sections --

    def build(self, pattern_id: str, folder: Path, top: _Map) -> Pattern:
        self.keys(
            top,
            "pattern",
            ["title", "nodes"],
            [
                "summary",
                "links",
                "layout",
                "users",
                "series",
                "traffic",
                "params",
                "observe",
                "faults",
                "controls",
                "experiments",
                "scenario",
            ],
        )
        title = self.text(top, "title", "title")
        summary = self.text(top, "summary", "summary").strip() if "summary" in top else ""
        nodes = self.nodes(top, folder)
        by_name = {d.name: d for d in nodes}
        roles = {d.role: d for d in nodes if d.replicated}
        links = self.links(top, by_name) if "links" in top else ()
        layout = self.layout(top, nodes) if "layout" in top else None
        if layout is None:
            layout = Layout("left-to-right", tuple((d.name,) for d in nodes))
        traffic = self.traffic(top, by_name) if "traffic" in top else ()
        users = self.node_refs(top, "users", "users", by_name) if "users" in top else ()
        series = self.series(top, by_name) if "series" in top else ()
        params = self.params(top) if "params" in top else {}
        observe = self.observe(top, by_name) if "observe" in top else Observe()
        faults = self.faults(top) if "faults" in top else ()
        controls = self.controls(top, by_name, roles) if "controls" in top else ()
        pattern = Pattern(
            id=pattern_id,
            title=title.strip(),
            summary=summary,
            folder=folder,
            nodes=nodes,
            links=links,
            layout=layout,
            faults=faults,
            controls=controls,
            traffic=traffic,
            users=users,
            params=MappingProxyType(params),
            observe=observe,
            series=series,
            _by_instance_role=MappingProxyType(roles),
        )
        if "experiments" in top:
            pattern = dataclasses.replace(pattern, experiments=self.experiments(top, pattern))
        if "scenario" in top:
            pattern = dataclasses.replace(pattern, scenario=self.scenario(top, pattern))
        return pattern

    def scenario(self, top: _Map, pattern: Pattern) -> Scenario:
        m = self.mapping(top, "scenario", "scenario")
        self.keys(m, "scenario", ["title", "experiments"], ["intro"])
        ids = self.ids(m, "experiments", "scenario.experiments", EXPERIMENT_ID_RE)
        known = {e.id for e in pattern.experiments}
        for id_ in ids:
            if id_ not in known:
                message = f"scenario.experiments: no experiment {id_!r} (there are: "
                self.fail(self.line(m, "experiments"), message + ", ".join(sorted(known)) + ")")
        if len(ids) < 2 or len(set(ids)) != len(ids):
            self.fail(
                self.line(m, "experiments"),
                "scenario.experiments: two or more experiments, each once",
            )
        intro = " ".join(self.text(m, "intro", "scenario.intro").split()) if "intro" in m else ""
        return Scenario(self.text(m, "title", "scenario.title").strip(), intro, tuple(ids))

    def nodes(self, top: _Map, folder: Path) -> tuple[NodeDef, ...]:
        seq = self.sequence(top, "nodes", "nodes")
        if not seq:
            self.fail(seq.line, "nodes: a pattern needs at least one node")
        out: list[NodeDef] = []
        taken: dict[str, int] = {}  # every name a node can have → line
        for index in range(len(seq)):
            where = f"nodes[{index}]"
            m = self.item(seq, index, where)
            self.keys(m, where, ["role", "program"], ["name", "count", "env"])
            role = self.text(m, "role", f"{where}.role", NAME_RE)
            program = self.text(m, "program", f"{where}.program", PROGRAM_RE)
            if not _program_file(folder, program).is_file():
                folder_shown = self.shown.rsplit("/", 1)[0] + "/"
                self.fail(
                    self.line(m, "program"),
                    f"{where}.program: "
                    + MISSING_PROGRAM.format(program=program, folder=folder_shown),
                )
            env = self.env(m, where) if "env" in m else {}
            if "count" in m:
                name = role
                if "name" in m and self.text(m, "name", f"{where}.name") != role:
                    self.fail(
                        self.line(m, "name"),
                        f"{where}.name: a replicated node is named after its role "
                        f"({role}-1, {role}-2, …): use name {role!r} or leave it out",
                    )
                count, low, high = self.count(m, where)
                names = [name] + [f"{role}-{n}" for n in range(1, high + 1)]
                if any(d.role == role for d in out):
                    self.fail(m.line, f"{where}: role {role!r} is already used by another node")
            else:
                if "name" not in m:
                    self.fail(m.line, f"{where}: " + MISSING_KEY.format(key="name"))
                name = self.text(m, "name", f"{where}.name", NAME_RE)
                count, low, high = None, None, None
                names = [name]
                if any(d.role == role and d.replicated for d in out):
                    self.fail(m.line, f"{where}: role {role!r} is replicated by another node")
            for candidate in names:
                if candidate in taken:
                    self.fail(
                        m.line,
                        f"{where}: the name {candidate!r} clashes with the node on line "
                        f"{taken[candidate]}",
                    )
                taken[candidate] = m.line
            node_def = NodeDef(
                name, role, program, MappingProxyType(env), count, low, high, line=m.line
            )
            out.append(node_def)
        return tuple(out)

    def count(self, m: _Map, where: str) -> tuple[int, int, int]:
        value = m["count"]
        if isinstance(value, int) and not isinstance(value, bool):
            n = self.integer(m, "count", f"{where}.count", 1, MAX_COUNT)
            return n, n, n
        if not isinstance(value, _Map):
            self.fail(
                self.line(m, "count"),
                f"{where}.count: must be a number or {{default: N, min: N, max: N}}",
            )
        self.keys(value, f"{where}.count", ["default", "min", "max"], [])
        low = self.integer(value, "min", f"{where}.count.min", 1, MAX_COUNT)
        high = self.integer(value, "max", f"{where}.count.max", low, MAX_COUNT)
        default = self.integer(value, "default", f"{where}.count.default", low, high)
        return default, low, high

    def env(self, m: _Map, where: str) -> dict[str, str]:
        env = self.mapping(m, "env", f"{where}.env")
        out: dict[str, str] = {}
        for key, value in env.items():
            line = env.key_lines[key]
            if not ENV_RE.match(key):
                self.fail(line, f"{where}.env: {key!r} is not a valid variable name")
            if key in RESERVED_ENV:
                self.fail(line, f"{where}.env: {key} is set by the engine, not by the spec")
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                self.fail(line, f"{where}.env.{key}: must be a string or a number, got {value!r}")
            out[key] = str(value)
        return out

    def endpoint(self, m: _Map, key: str, where: str, by_name: Mapping[str, NodeDef]) -> str:
        name = self.text(m, key, where)
        if name not in by_name:
            message = UNKNOWN_NODE.format(name=name, names=", ".join(by_name))
            self.fail(self.line(m, key), f"{where}: {message}")
        return name

    def single(self, m: _Map, key: str, where: str, by_name: Mapping[str, NodeDef]) -> str:
        name = self.endpoint(m, key, where, by_name)
        if by_name[name].replicated:
            self.fail(self.line(m, key), f"{where}: must name a single node, not the role {name!r}")
        return name

    def links(self, top: _Map, by_name: Mapping[str, NodeDef]) -> tuple[Link, ...]:
        seq = self.sequence(top, "links", "links")
        out: list[Link] = []
        for index in range(len(seq)):
            where = f"links[{index}]"
            m = self.item(seq, index, where)
            self.keys(m, where, ["from", "to"], ["label", "kind", "route"])
            source = self.endpoint(m, "from", f"{where}.from", by_name)
            target = self.endpoint(m, "to", f"{where}.to", by_name)
            if source == target:
                self.fail(m.line, f"{where}: a node cannot link to itself")
            label = self.text(m, "label", f"{where}.label") if "label" in m else ""
            kind = self.choice(m, "kind", f"{where}.kind", LINK_KINDS, "request")
            route = ""
            if "route" in m:
                if kind != "probe":
                    self.fail(self.line(m, "route"), f"{where}.route: only a probe link has one")
                route = self.url_path(m, "route", f"{where}.route")
            link = Link(source, target, label, kind, route)
            if any((x.source, x.target, x.kind) == (source, target, kind) for x in out):
                self.fail(m.line, f"{where}: the same link is listed twice")
            out.append(link)
        return tuple(out)

    def flag(self, m: _Map, key: str, where: str, default: bool) -> bool:
        if key not in m:
            return default
        value = m[key]
        if not isinstance(value, bool):
            self.fail(self.line(m, key), f"{where}: must be true or false, got {value!r}")
        return bool(value)

    def choice(self, m: _Map, key: str, where: str, allowed: Sequence[str], default: str) -> str:
        if key not in m:
            return default
        value = m[key]
        if value not in allowed:
            self.fail(
                self.line(m, key), f"{where}: must be one of {', '.join(allowed)}, got {value!r}"
            )
        return str(value)

    def layout(self, top: _Map, nodes: Sequence[NodeDef]) -> Layout:
        m = self.mapping(top, "layout", "layout")
        self.keys(m, "layout", ["columns"], ["direction"])
        direction = self.choice(m, "direction", "layout.direction", DIRECTIONS, "left-to-right")
        seq = self.sequence(m, "columns", "layout.columns")
        names = {d.name for d in nodes}
        placed: dict[str, int] = {}
        columns: list[tuple[str, ...]] = []
        for index, column in enumerate(seq):
            line = seq.item_lines[index]
            if not isinstance(column, _Seq) or not column:
                self.fail(line, f"layout.columns[{index}]: must be a non-empty list of nodes")
            for name in column:
                if name not in names:
                    message = UNKNOWN_NODE.format(name=name, names=", ".join(names))
                    self.fail(line, f"layout.columns[{index}]: {message}")
                if name in placed:
                    self.fail(line, f"layout.columns[{index}]: {name!r} is placed twice")
                placed[name] = index
            columns.append(tuple(column))
        missing = [d.name for d in nodes if d.name not in placed]
        if missing:
            self.fail(m.line, f"layout: node {missing[0]!r} is in no column")
        return Layout(direction, tuple(columns))

    def traffic(self, top: _Map, by_name: Mapping[str, NodeDef]) -> tuple[Traffic, ...]:
        """``traffic``: one profile, or a list of them (one per generating node)."""
        if isinstance(top["traffic"], _Seq):
            seq = self.sequence(top, "traffic", "traffic")
            profiles = [
                self.profile(self.item(seq, i, f"traffic[{i}]"), f"traffic[{i}]", by_name)
                for i in range(len(seq))
            ]
        else:
            profiles = [self.profile(self.mapping(top, "traffic", "traffic"), "traffic", by_name)]
        seen: set[str] = set()
        for profile in profiles:
            if profile.node in seen:
                self.fail(top.key_lines["traffic"], f"traffic: {profile.node!r} has two profiles")
            seen.add(profile.node)
        return tuple(profiles)

    def profile(self, m: _Map, here: str, by_name: Mapping[str, NodeDef]) -> Traffic:
        optional = ["timeout_s", "max_in_flight", "mix", "keys"]
        self.keys(m, here, ["node", "target", "rps"], optional)
        node = self.single(m, "node", f"{here}.node", by_name)
        target = self.endpoint(m, "target", f"{here}.target", by_name)
        rps = self.number(m, "rps", f"{here}.rps", 0, MAX_RPS)
        timeout_s = self.number_or(m, "timeout_s", f"{here}.timeout_s", 0.01, 60, 2.0)
        max_in_flight = self.integer_or(m, "max_in_flight", f"{here}.max_in_flight", 1, 10_000, 200)
        mix: list[RequestKind] = []
        if "mix" in m:
            seq = self.sequence(m, "mix", f"{here}.mix")
            for index in range(len(seq)):
                where = f"{here}.mix[{index}]"
                item = self.item(seq, index, where)
                self.keys(item, where, ["path"], ["method", "weight", "target"])
                path = self.url_path(item, "path", f"{where}.path")
                method = self.choice(item, "method", f"{where}.method", HTTP_METHODS, "GET")
                weight = self.number_or(item, "weight", f"{where}.weight", 0, 1e6, 1.0)
                to = (
                    self.endpoint(item, "target", f"{where}.target", by_name)
                    if "target" in item
                    else ""
                )
                mix.append(RequestKind(method, path, weight, to))
            if not mix or not any(r.weight > 0 for r in mix):
                self.fail(seq.line, f"{here}.mix: needs at least one request with a weight above 0")
        else:
            mix.append(RequestKind("GET", "/", 1.0))
        keys = KeySpace(100, "uniform", 1.1)
        if "keys" in m:
            k = self.mapping(m, "keys", f"{here}.keys")
            self.keys(k, f"{here}.keys", [], ["count", "distribution", "s"])
            keys = KeySpace(
                self.integer_or(k, "count", f"{here}.keys.count", 1, 1_000_000, 100),
                self.choice(
                    k, "distribution", f"{here}.keys.distribution", KEY_DISTRIBUTIONS, "uniform"
                ),
                self.number_or(k, "s", f"{here}.keys.s", 0.01, 10, 1.1),
            )
        return Traffic(node, target, rps, timeout_s, max_in_flight, tuple(mix), keys)

    def url_path(self, m: _Map, key: str, where: str) -> str:
        path = self.text(m, key, where)
        if not path.startswith("/"):
            self.fail(self.line(m, key), f"{where}: must start with /")
        return path

    def node_refs(
        self, m: _Map, key: str, where: str, by_name: Mapping[str, NodeDef]
    ) -> tuple[str, ...]:
        """A list of node names or replicated roles (or one of them, as a string)."""
        value = m[key]
        if isinstance(value, str):
            return (self.endpoint(m, key, where, by_name),)
        seq = self.sequence(m, key, where)
        out: list[str] = []
        for index, name in enumerate(seq):
            if name not in by_name:
                message = UNKNOWN_NODE.format(name=name, names=", ".join(by_name))
                self.fail(seq.item_lines[index], f"{where}[{index}]: {message}")
            if name in out:
                self.fail(seq.item_lines[index], f"{where}[{index}]: {name!r} is listed twice")
            out.append(str(name))
        if not out:
            self.fail(seq.line, f"{where}: name at least one node")
        return tuple(out)

    def series(self, top: _Map, by_name: Mapping[str, NodeDef]) -> tuple[Series, ...]:
        seq = self.sequence(top, "series", "series")
        out: list[Series] = []
        for index in range(len(seq)):
            where = f"series[{index}]"
            m = self.item(seq, index, where)
            self.keys(m, where, ["id", "node", "route"], ["label"])
            id_ = self.text(m, "id", f"{where}.id", KEY_RE)
            if any(s.id == id_ for s in out):
                self.fail(self.line(m, "id"), f"{where}.id: {id_!r} is declared twice")
            node = self.endpoint(m, "node", f"{where}.node", by_name)
            route = self.url_path(m, "route", f"{where}.route")
            out.append(Series(id_, self.label(m, where, f"{node} {route}"), node, route))
        return tuple(out)

    def params(self, top: _Map) -> dict[str, Any]:
        m = self.mapping(top, "params", "params")
        out: dict[str, Any] = {}
        for key, value in m.items():
            line = m.key_lines[key]
            if not KEY_RE.match(key):
                self.fail(
                    line, f"params: {key!r} is not a valid name (lower_case_with_underscores)"
                )
            if isinstance(value, float) and not math.isfinite(value):
                self.fail(line, f"params.{key}: must be a finite number")
            if not isinstance(value, str | int | float | bool):
                self.fail(line, f"params.{key}: must be a number, a string or true/false")
            out[key] = value
        return out

    def label(self, m: _Map, where: str, default: str) -> str:
        return self.text(m, "label", f"{where}.label").strip() if "label" in m else default

    def ids(self, m: _Map, key: str, where: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
        value = m[key]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            self.fail(self.line(m, key), f"{where}: must be a name or a non-empty list of names")
        for item in items:
            if not isinstance(item, str) or not pattern.match(item):
                self.fail(self.line(m, key), f"{where}: {item!r} is not a valid name")
        return tuple(items)

    def observe(self, top: _Map, by_name: Mapping[str, NodeDef]) -> Observe:
        m = self.mapping(top, "observe", "observe")
        self.keys(
            m, "observe", [], ["events", "marks", "gauges", "states", "tables", "traces", "logs"]
        )
        ids: dict[str, int] = {}  # gauges, states and tables share one name space

        def entries(key: str, required: list[str], optional: list[str]) -> list[tuple[_Map, str]]:
            if key not in m:
                return []
            seq = self.sequence(m, key, f"observe.{key}")
            out = []
            for index in range(len(seq)):
                where = f"observe.{key}[{index}]"
                item = self.item(seq, index, where)
                self.keys(item, where, required, optional)
                out.append((item, where))
            return out

        def new_id(item: _Map, where: str, space: dict[str, int]) -> str:
            id_ = self.text(item, "id", f"{where}.id", KEY_RE)
            if id_ in space:
                self.fail(item.line, f"{where}.id: {id_!r} is declared twice")
            space[id_] = item.line
            return id_

        events: list[EventDef] = []
        event_ids: dict[str, int] = {}
        for item, where in entries("events", ["id", "text"], ["severity"]):
            id_ = new_id(item, where, event_ids)
            if id_ in RUNTIME_EVENTS:
                self.fail(item.line, f"{where}.id: {id_!r} is an event the runtime writes itself")
            text = " ".join(self.text(item, "text", f"{where}.text").split())
            try:
                for name, spec in template_fields(text):
                    if spec or not KEY_RE.match(name):
                        raise TemplateError(f"{{{name}}}: name a field plainly, as in {{target}}")
            except TemplateError as exc:
                self.fail(self.line(item, "text"), f"{where}.text: {exc}")
            severity = self.choice(item, "severity", f"{where}.severity", SEVERITIES, "info")
            events.append(EventDef(id_, text, severity))
        marks: list[MarkDef] = []
        mark_ids: dict[str, int] = {}
        for item, where in entries("marks", ["id", "set_by", "cleared_by"], ["label"]):
            id_ = new_id(item, where, mark_ids)
            if id_ in NODE_STATES:
                self.fail(item.line, f"{where}.id: {id_!r} is a state the platform sets itself")
            set_by = self.ids(item, "set_by", f"{where}.set_by", KEY_RE)
            cleared_by = self.ids(item, "cleared_by", f"{where}.cleared_by", KEY_RE)
            for event_id in (*set_by, *cleared_by):
                if event_id not in event_ids:
                    self.fail(
                        item.line,
                        f"{where}: the event {event_id!r} is not declared in observe.events",
                    )
            marks.append(MarkDef(id_, self.label(item, where, id_), set_by, cleared_by))
        gauges: list[GaugeDef] = []
        for item, where in entries("gauges", ["id", "nodes"], ["label", "unit", "graph"]):
            id_ = new_id(item, where, ids)
            if id_ == "in_flight":
                self.fail(
                    item.line, f"{where}.id: in_flight is built in: report it without declaring it"
                )
            unit = self.text(item, "unit", f"{where}.unit") if "unit" in item else ""
            nodes = self.node_refs(item, "nodes", f"{where}.nodes", by_name)
            graph = self.flag(item, "graph", f"{where}.graph", default=True)
            gauges.append(GaugeDef(id_, self.label(item, where, id_), unit, nodes, graph))
        states: list[StateDef] = []
        for item, where in entries("states", ["id", "values", "nodes"], ["label"]):
            id_ = new_id(item, where, ids)
            values = self.ids(item, "values", f"{where}.values", NAME_RE)
            if len(set(values)) != len(values):
                self.fail(self.line(item, "values"), f"{where}.values: a value is listed twice")
            nodes = self.node_refs(item, "nodes", f"{where}.nodes", by_name)
            states.append(StateDef(id_, self.label(item, where, id_), values, nodes))
        tables: list[TableDef] = []
        for item, where in entries("tables", ["id", "node", "columns"], ["label"]):
            id_ = new_id(item, where, ids)
            node = self.endpoint(item, "node", f"{where}.node", by_name)
            seq = self.sequence(item, "columns", f"{where}.columns")
            columns: list[ColumnDef] = []
            for index in range(len(seq)):
                cwhere = f"{where}.columns[{index}]"
                column = self.item(seq, index, cwhere)
                self.keys(column, cwhere, ["id"], ["label", "unit"])
                cid = self.text(column, "id", f"{cwhere}.id", KEY_RE)
                if any(c.id == cid for c in columns):
                    self.fail(column.line, f"{cwhere}.id: {cid!r} is used twice")
                unit = self.text(column, "unit", f"{cwhere}.unit") if "unit" in column else ""
                columns.append(ColumnDef(cid, self.label(column, cwhere, cid), unit))
            if not 1 <= len(columns) <= MAX_TABLE_COLUMNS:
                self.fail(seq.line, f"{where}.columns: from 1 to {MAX_TABLE_COLUMNS} columns")
            tables.append(TableDef(id_, self.label(item, where, id_), node, tuple(columns)))
        sources = {}
        for key in ("traces", "logs"):
            if key in m:
                item = self.mapping(m, key, f"observe.{key}")
                self.keys(item, f"observe.{key}", ["node"], [])
                sources[key] = self.single(item, "node", f"observe.{key}.node", by_name)
        return Observe(
            tuple(events), tuple(marks), tuple(gauges), tuple(states), tuple(tables), **sources
        )

    def faults(self, top: _Map) -> tuple[str, ...]:
        seq = self.sequence(top, "faults", "faults")
        out: list[str] = []
        for index, kind in enumerate(seq):
            line = seq.item_lines[index]
            if kind not in FAULT_KINDS:
                message = UNKNOWN_FAULT.format(kind=kind, expected=", ".join(FAULT_KINDS))
                self.fail(line, f"faults[{index}]: {message}")
            if kind in out:
                self.fail(line, f"faults[{index}]: {kind!r} is listed twice")
            out.append(kind)
        return tuple(out)

    def controls(
        self, top: _Map, by_name: Mapping[str, NodeDef], roles: Mapping[str, NodeDef]
    ) -> tuple[Control, ...]:
        seq = self.sequence(top, "controls", "controls")
        out: list[Control] = []
        for index in range(len(seq)):
            where = f"controls[{index}]"
            m = self.item(seq, index, where)
            if "kind" not in m:
                self.fail(m.line, f"{where}: " + MISSING_KEY.format(key="kind"))
            kind = self.choice(m, "kind", f"{where}.kind", CONTROL_KINDS, "")
            control = self.control(m, where, kind, by_name, roles)
            if any(c.id == control.id for c in out):
                self.fail(m.line, f"{where}: the id {control.id!r} is used twice")
            if control.key and any((c.node, c.key) == (control.node, control.key) for c in out):
                self.fail(m.line, f"{where}: another control already sets {control.key!r}")
            out.append(control)
        return tuple(out)

    def control(
        self,
        m: _Map,
        where: str,
        kind: str,
        by_name: Mapping[str, NodeDef],
        roles: Mapping[str, NodeDef],
    ) -> Control:
        common = ["id", "kind"]
        if kind == "scale":
            self.keys(m, where, [*common, "role"], ["label", "min", "max"])
        elif kind == "choice":
            self.keys(m, where, [*common, "node", "key", "choices"], ["label", "default"])
        elif kind == "toggle":
            self.keys(m, where, [*common, "node", "key"], ["label", "default"])
        else:
            required = [*common, "node", "key", "min", "max"]
            self.keys(m, where, required, ["label", "step", "default"])
        control_id = self.text(m, "id", f"{where}.id", KEY_RE)
        label = self.text(m, "label", f"{where}.label") if "label" in m else control_id
        if kind == "scale":
            role = self.text(m, "role", f"{where}.role")
            node_def = roles.get(role)
            if node_def is None:
                self.fail(
                    self.line(m, "role"),
                    f"{where}.role: {role!r} is not a replicated role "
                    f"(replicated: {', '.join(roles) or 'none'})",
                )
            assert node_def.min_count is not None and node_def.max_count is not None
            low, high = node_def.min_count, node_def.max_count
            if "min" in m:
                low = self.integer(m, "min", f"{where}.min", node_def.min_count, node_def.max_count)
            if "max" in m:
                high = self.integer(m, "max", f"{where}.max", low, node_def.max_count)
            return Control(
                control_id,
                label,
                kind,
                role=role,
                min=low,
                max=high,
                step=1,
                default=node_def.count,
            )
        node = self.endpoint(m, "node", f"{where}.node", by_name)  # a node or a whole role
        key = self.text(m, "key", f"{where}.key", KEY_RE)
        if kind == "choice":
            seq = self.sequence(m, "choices", f"{where}.choices")
            strings = all(isinstance(c, str) and c for c in seq)
            if len(seq) < 2 or not strings or len(set(seq)) != len(seq):
                self.fail(seq.line, f"{where}.choices: must be two or more different strings")
            control = Control(control_id, label, kind, node=node, key=key, choices=tuple(seq))
        elif kind == "toggle":
            control = Control(control_id, label, kind, node=node, key=key)
        else:
            minimum = self.number(m, "min", f"{where}.min", -1e12, 1e12)
            maximum = self.number(m, "max", f"{where}.max", minimum, 1e12)
            step = None
            if "step" in m:
                step = self.number(m, "step", f"{where}.step", 1e-9, maximum - minimum or 1)
            control = Control(
                control_id, label, kind, node=node, key=key, min=minimum, max=maximum, step=step
            )
        if "default" in m:
            try:
                default = control.validate(m["default"])
            except ValueError as exc:
                self.fail(self.line(m, "default"), f"{where}.default: {exc}")
            control = dataclasses.replace(control, default=default)
        return dataclasses.replace(control, replicated=by_name[node].replicated)

    # -- experiments --

    def experiments(self, top: _Map, pattern: Pattern) -> tuple[Experiment, ...]:
        seq = self.sequence(top, "experiments", "experiments")
        out: list[Experiment] = []
        for index in range(len(seq)):
            where = f"experiments[{index}]"
            m = self.item(seq, index, where)
            self.keys(m, where, ["id", "title", "intro", "prediction", "steps", "check"], [])
            experiment_id = self.text(m, "id", f"{where}.id", EXPERIMENT_ID_RE)
            if any(e.id == experiment_id for e in out):
                self.fail(self.line(m, "id"), f"{where}.id: the id {experiment_id!r} is used twice")
            title = " ".join(self.text(m, "title", f"{where}.title").split())
            intro = " ".join(self.text(m, "intro", f"{where}.intro").split())
            prediction = self.prediction(
                self.mapping(m, "prediction", f"{where}.prediction"), f"{where}.prediction"
            )
            steps = self.steps(m, f"{where}.steps", pattern)
            total = sum(s.duration_s for s in steps)
            if total > MAX_EXPERIMENT_S:
                self.fail(
                    self.line(m, "steps"),
                    f"{where}.steps: they last {total:g} s in all, more than {MAX_EXPERIMENT_S} s",
                )
            check = self.check(
                self.mapping(m, "check", f"{where}.check"),
                f"{where}.check",
                pattern,
                prediction,
                steps,
            )
            out.append(Experiment(experiment_id, title, intro, prediction, steps, check, m.line))
        return tuple(out)

    def prediction(self, m: _Map, where: str) -> Prediction:
        if "kind" not in m:
            self.fail(m.line, f"{where}: " + MISSING_KEY.format(key="kind"))
        kind = self.choice(m, "kind", f"{where}.kind", PREDICTION_KINDS, "")
        if kind == "choice":
            self.keys(m, where, ["question", "kind", "options"], [])
        else:
            self.keys(m, where, ["question", "kind"], ["unit", "min", "max"])
        question = " ".join(self.text(m, "question", f"{where}.question").split())
        if kind == "number":
            unit = self.text(m, "unit", f"{where}.unit").strip() if "unit" in m else ""
            low = self.number(m, "min", f"{where}.min", -1e12, 1e12) if "min" in m else None
            high = None
            if "max" in m:
                high = self.number(m, "max", f"{where}.max", -1e12 if low is None else low, 1e12)
            return Prediction(question, kind, unit=unit, min=low, max=high)
        seq = self.sequence(m, "options", f"{where}.options")
        options: list[Option] = []
        for index in range(len(seq)):
            item_where = f"{where}.options[{index}]"
            item = self.item(seq, index, item_where)
            self.keys(item, item_where, ["id", "label"], [])
            option_id = self.text(item, "id", f"{item_where}.id", EXPERIMENT_ID_RE)
            if any(o.id == option_id for o in options):
                self.fail(item.line, f"{item_where}.id: the id {option_id!r} is used twice")
            label = " ".join(self.text(item, "label", f"{item_where}.label").split())
            options.append(Option(option_id, label))
        if len(options) < 2:
            self.fail(seq.line, f"{where}.options: a choice needs two or more options")
        return Prediction(question, kind, options=tuple(options))

    def steps(self, m: _Map, where: str, pattern: Pattern) -> tuple[Step, ...]:
        seq = self.sequence(m, "steps", where)
        if not seq:
            self.fail(seq.line, f"{where}: an experiment needs at least one step")
        out: list[Step] = []
        for index in range(len(seq)):
            step_where = f"{where}[{index}]"
            item = self.item(seq, index, step_where)
            self.keys(item, step_where, ["id", "text", "duration_s"], ["action"])
            step_id = self.text(item, "id", f"{step_where}.id", EXPERIMENT_ID_RE)
            if any(s.id == step_id for s in out):
                self.fail(item.line, f"{step_where}.id: the id {step_id!r} is used twice")
            text = " ".join(self.text(item, "text", f"{step_where}.text").split())
            duration = self.number(item, "duration_s", f"{step_where}.duration_s", 0, MAX_STEP_S)
            actions = (
                self.actions(item, f"{step_where}.action", pattern) if "action" in item else ()
            )
            out.append(Step(step_id, text, actions, duration))
        return tuple(out)

    def actions(self, m: _Map, where: str, pattern: Pattern) -> tuple[Action, ...]:
        value = m["action"]
        if isinstance(value, _Map):
            return (self.action(value, where, pattern),)
        if not isinstance(value, _Seq) or not value:
            self.fail(
                self.line(m, "action"),
                f"{where}: must be an action ({{fault: …}} or {{control: …}}) or a list of them",
            )
        return tuple(
            self.action(self.item(value, i, f"{where}[{i}]"), f"{where}[{i}]", pattern)
            for i in range(len(value))
        )

    def action(self, m: _Map, where: str, pattern: Pattern) -> Action:
        self.keys(m, where, [], ACTION_KINDS)
        if len(m) != 1:
            self.fail(m.line, f"{where}: must be exactly one of: {', '.join(ACTION_KINDS)}")
        if "fault" in m:
            fault_where = f"{where}.fault"
            f = self.mapping(m, "fault", fault_where)
            self.keys(f, fault_where, ["node", "kind"], ["duration_s", "params"])
            node = self.text(f, "node", f"{fault_where}.node")
            if not _is_node(pattern, node):
                message = UNKNOWN_NODE.format(name=node, names=", ".join(pattern.node_names()))
                self.fail(self.line(f, "node"), f"{fault_where}.node: {message}")
            kind = self.text(f, "kind", f"{fault_where}.kind")
            if kind not in pattern.faults:
                self.fail(
                    self.line(f, "kind"),
                    f"{fault_where}.kind: {kind!r} is not one of the pattern's faults "
                    f"({', '.join(pattern.faults) or 'none'})",
                )
            duration = 0
            if kind == "restart" and "duration_s" in f:
                self.fail(
                    self.line(f, "duration_s"), f"{fault_where}.duration_s: a restart has none"
                )
            if kind != "restart":
                if "duration_s" not in f:
                    self.fail(f.line, f"{fault_where}: " + MISSING_KEY.format(key="duration_s"))
                duration = self.integer(
                    f, "duration_s", f"{fault_where}.duration_s", 1, MAX_FAULT_S
                )
            params: dict[str, float] = {}
            if "params" in f:
                given = self.mapping(f, "params", f"{fault_where}.params")
                allowed = FAULT_PARAM_NAMES.get(kind, ())
                for key in given:
                    if key not in allowed:
                        self.fail(
                            given.key_lines[key],
                            f"{fault_where}.params: the fault {kind!r} takes no parameter "
                            f"{key!r} (it takes: {', '.join(allowed) or 'none'})",
                        )
                    params[key] = self.number(given, key, f"{fault_where}.params.{key}", 0, 1e6)
            return Action(
                "fault", node=node, fault=kind, duration_s=duration, params=MappingProxyType(params)
            )
        control_where = f"{where}.control"
        c = self.mapping(m, "control", control_where)
        self.keys(c, control_where, ["id"], ["value", "restore"])
        if ("value" in c) == ("restore" in c):
            self.fail(c.line, f"{control_where}: needs either a value or restore: true")
        control_id = self.text(c, "id", f"{control_where}.id")
        control = pattern.control(control_id)
        if control is None:
            self.fail(
                self.line(c, "id"),
                f"{control_where}.id: the pattern has no control {control_id!r} "
                f"(it has: {', '.join(x.id for x in pattern.controls) or 'none'})",
            )
        if "restore" in c:
            if c["restore"] is not True:
                self.fail(self.line(c, "restore"), f"{control_where}.restore: must be true")
            return Action("control", control=control_id, restore=True)
        try:
            value = control.validate(c["value"])
        except ValueError as exc:
            self.fail(self.line(c, "value"), f"{control_where}.value: {exc}")
        return Action("control", control=control_id, value=value)

    def check(
        self,
        m: _Map,
        where: str,
        pattern: Pattern,
        prediction: Prediction,
        steps: Sequence[Step],
    ) -> Check:
        self.keys(m, where, ["measure", "judge", "explanation"], ["params", "show"])
        name = self.text(m, "measure", f"{where}.measure")
        measure = MEASURES.get(name)
        if measure is None:
            self.fail(
                self.line(m, "measure"),
                f"{where}.measure: unknown measure {name!r} (expected one of: "
                f"{', '.join(MEASURES)})",
            )
        params = self.measure_params(m, f"{where}.params", measure.params, pattern, steps)
        outputs = measure.outputs(params)
        judge = self.judge(
            self.mapping(m, "judge", f"{where}.judge"), f"{where}.judge", prediction, outputs
        )
        show = tuple(outputs)
        if "show" in m:
            seq = self.sequence(m, "show", f"{where}.show")
            for index, value in enumerate(seq):
                if value not in outputs:
                    self.fail(
                        seq.item_lines[index],
                        f"{where}.show[{index}]: {value!r} is not a value the measure gives "
                        f"(it gives: {', '.join(outputs)})",
                    )
            show = tuple(seq)
        explanation = self.explanation(m, f"{where}.explanation", prediction, outputs, pattern)
        return Check(
            name,
            MappingProxyType(params),
            judge,
            MappingProxyType(explanation),
            MappingProxyType(outputs),
            show,
        )

    def measure_params(
        self,
        m: _Map,
        where: str,
        declared: Mapping[str, Any],
        pattern: Pattern,
        steps: Sequence[Step],
    ) -> dict[str, Any]:
        if "params" in m:
            given = self.mapping(m, "params", where)
        else:
            given = _Map()
            given.line, given.key_lines = m.line, {}
        required = [k for k, p in declared.items() if p.required]
        self.keys(given, where, required, [k for k, p in declared.items() if not p.required])
        step_ids = [s.id for s in steps]
        params: dict[str, Any] = {}
        for key, spec in declared.items():
            if key not in given:
                if spec.default is not None:
                    params[key] = spec.default
                continue
            key_where, line = f"{where}.{key}", self.line(given, key)
            if spec.kind == "step":
                params[key] = self.step_ref(given, key, key_where, step_ids)
            elif spec.kind == "node":
                node = self.text(given, key, key_where)
                if not _is_node(pattern, node):
                    names = ", ".join(pattern.node_names())
                    self.fail(line, f"{key_where}: " + UNKNOWN_NODE.format(name=node, names=names))
                params[key] = node
            elif spec.kind == "role":
                role = self.text(given, key, key_where)
                if role not in pattern._by_instance_role:
                    self.fail(
                        line,
                        f"{key_where}: {role!r} is not a replicated role (replicated: "
                        f"{', '.join(pattern._by_instance_role) or 'none'})",
                    )
                params[key] = role
            elif spec.kind == "number":
                params[key] = self.number(given, key, key_where, spec.low, spec.high)
            elif spec.kind == "gauge":
                gauge = self.text(given, key, key_where)
                declared_gauges = [g.id for g in pattern.observe.gauges]
                if gauge not in declared_gauges:
                    self.fail(
                        line,
                        f"{key_where}: {gauge!r} is not a declared gauge "
                        f"(gauges: {', '.join(declared_gauges) or 'none'})",
                    )
                params[key] = gauge
            elif spec.kind == "event":
                event = self.text(given, key, key_where)
                known = [e.id for e in pattern.observe.events] + list(PLATFORM_EVENTS)
                if event not in known:
                    self.fail(
                        line, f"{key_where}: {event!r} is no event (events: {', '.join(known)})"
                    )
                params[key] = event
            elif spec.kind == "field":
                params[key] = self.text(given, key, key_where, KEY_RE)
            elif spec.kind == "series":
                series_id = self.text(given, key, key_where)
                known = [s.id for s in pattern.series]
                if series_id not in known:
                    self.fail(
                        line,
                        f"{key_where}: {series_id!r} is not a declared series "
                        f"(series: {', '.join(known) or 'none'})",
                    )
                params[key] = series_id
            elif spec.kind == "link":
                link = self.text(given, key, key_where)
                ends = link.split(">")
                if len(ends) != 2 or not all(_is_node(pattern, end) for end in ends):
                    self.fail(
                        line, f"{key_where}: {link!r} is not two nodes of the pattern as src>dst"
                    )
                params[key] = link
            else:  # phases
                phases = self.mapping(given, key, key_where)
                if not phases:
                    self.fail(line, f"{key_where}: needs at least one phase (name: step id)")
                named: dict[str, str] = {}
                for phase in phases:
                    if not KEY_RE.match(phase):
                        self.fail(
                            phases.key_lines[phase],
                            f"{key_where}: {phase!r} is not a valid phase name "
                            "(lower-case letters, digits and _)",
                        )
                    named[phase] = self.step_ref(phases, phase, f"{key_where}.{phase}", step_ids)
                params[key] = named
        if "link" in params and "series" in params:
            self.fail(given.line, f"{where}: give link or series, not both")
        if "at_most" in declared and ("at_most" in params) == ("at_least" in params):
            self.fail(given.line, f"{where}: give either at_most or at_least")
        if (
            "from_step" in params
            and params.get("to_step")
            and step_ids.index(params["to_step"]) < step_ids.index(params["from_step"])
        ):
            self.fail(self.line(given, "to_step"), f"{where}.to_step: comes before from_step")
        if "role" in declared and "node" in params:
            node_def = pattern.node_def(params["node"])
            shared = params.get("role")
            if node_def is None or not node_def.replicated:
                if shared is None:
                    self.fail(
                        self.line(given, "node"),
                        f"{where}.node: {params['node']!r} is a single node: name the role "
                        "whose nodes share the requests (role: …)",
                    )
                self.fail(
                    self.line(given, "node"),
                    f"{where}.node: {params['node']!r} is not one of the {shared} nodes",
                )
            if shared is not None and node_def.role != shared:
                self.fail(
                    self.line(given, "node"),
                    f"{where}.node: {params['node']!r} is not one of the {shared} nodes",
                )
        return params

    def step_ref(self, m: _Map, key: str, where: str, step_ids: Sequence[str]) -> str:
        value = m[key]
        if value not in step_ids:
            self.fail(
                self.line(m, key),
                f"{where}: {value!r} is not a step of this experiment "
                f"(steps: {', '.join(step_ids)})",
            )
        return str(value)

    def judge(
        self, m: _Map, where: str, prediction: Prediction, outputs: Mapping[str, Output]
    ) -> Judge:
        if prediction.kind == "choice":
            self.keys(m, where, ["rules"], [])
            seq = self.sequence(m, "rules", f"{where}.rules")
            rules: list[Rule] = []
            for index in range(len(seq)):
                rule_where = f"{where}.rules[{index}]"
                item = self.item(seq, index, rule_where)
                self.keys(item, rule_where, ["answer"], ["when"])
                answer = self.text(item, "answer", f"{rule_where}.answer")
                if prediction.option(answer) is None:
                    self.fail(
                        self.line(item, "answer"),
                        f"{rule_where}.answer: {answer!r} is not one of the options "
                        f"({', '.join(o.id for o in prediction.options)})",
                    )
                if rules and not rules[-1].conditions:
                    self.fail(
                        item.line,
                        f"{rule_where}: comes after a rule without `when`, so it never applies",
                    )
                conditions = (
                    self.conditions(item, f"{rule_where}.when", outputs) if "when" in item else ()
                )
                rules.append(Rule(answer, conditions))
            if not rules or rules[-1].conditions:
                self.fail(
                    seq.item_lines[-1] if rules else seq.line,
                    f"{where}.rules: the last rule must have no `when`, so that some answer "
                    "is always right",
                )
            return Judge(rules=tuple(rules))
        self.keys(m, where, ["value"], ["tolerance", "tolerance_pct", "buckets"])
        value = m["value"]
        if value not in outputs:
            self.fail(
                self.line(m, "value"),
                f"{where}.value: {value!r} is not a value the measure gives "
                f"(it gives: {', '.join(outputs)})",
            )
        if "buckets" in m:
            if "tolerance" in m or "tolerance_pct" in m:
                self.fail(m.line, f"{where}: give buckets or a tolerance, not both")
            seq = self.sequence(m, "buckets", f"{where}.buckets")
            edges: list[float] = []
            for index, edge in enumerate(seq):
                if isinstance(edge, bool) or not isinstance(edge, int | float):
                    self.fail(seq.item_lines[index], f"{where}.buckets[{index}]: must be a number")
                if edges and edge <= edges[-1]:
                    self.fail(seq.item_lines[index], f"{where}.buckets: must go up, one by one")
                edges.append(float(edge))
            if not edges:
                self.fail(seq.line, f"{where}.buckets: needs at least one edge")
            return Judge(value=str(value), buckets=tuple(edges))
        if "tolerance" not in m and "tolerance_pct" not in m:
            self.fail(m.line, f"{where}: needs a tolerance, a tolerance_pct or buckets")
        tolerance = (
            self.number(m, "tolerance", f"{where}.tolerance", 0, 1e12) if "tolerance" in m else None
        )
        percent = None
        if "tolerance_pct" in m:
            percent = self.number(m, "tolerance_pct", f"{where}.tolerance_pct", 0, 1000)
        return Judge(value=str(value), tolerance=tolerance, tolerance_pct=percent)

    def conditions(
        self, m: _Map, where: str, outputs: Mapping[str, Output]
    ) -> tuple[Condition, ...]:
        when = self.mapping(m, "when", where)
        if not when:
            self.fail(
                self.line(m, "when"), f"{where}: needs a condition, as in {{error_s: {{lt: 1}}}}"
            )
        out: list[Condition] = []
        for name in when:
            line = when.key_lines[name]
            if name not in outputs:
                self.fail(
                    line,
                    f"{where}: {name!r} is not a value the measure gives "
                    f"(it gives: {', '.join(outputs)})",
                )
            ops = self.mapping(when, name, f"{where}.{name}")
            if not ops:
                self.fail(line, f"{where}.{name}: needs a comparison, as in {{lt: 1}}")
            for op, operand in ops.items():
                op_line = ops.key_lines[op]
                if op not in JUDGE_OPS:
                    self.fail(
                        op_line,
                        f"{where}.{name}: unknown comparison {op!r} "
                        f"(expected one of: {', '.join(JUDGE_OPS)})",
                    )
                if (
                    isinstance(operand, int | float)
                    and not isinstance(operand, bool)
                    and math.isfinite(operand)
                ):
                    out.append(Condition(name, op, float(operand)))
                    continue
                match = OPERAND_RE.match(operand.strip()) if isinstance(operand, str) else None
                if match is None or match["name"] not in outputs:
                    self.fail(
                        op_line,
                        f"{where}.{name}.{op}: must be a number, a measured value or "
                        f"N * a measured value (values: {', '.join(outputs)}), got {operand!r}",
                    )
                out.append(Condition(name, op, match["name"], float(match["factor"] or 1)))
        return tuple(out)

    def explanation(
        self,
        m: _Map,
        where: str,
        prediction: Prediction,
        outputs: Mapping[str, Output],
        pattern: Pattern,
    ) -> dict[str, str]:
        value, line = m["explanation"], self.line(m, "explanation")
        templates: dict[str, tuple[str, int, str]] = {}  # answer → (text, line, where)
        if isinstance(value, str) and value.strip():
            templates["default"] = (value, line, where)
        elif isinstance(value, _Map) and value:
            if prediction.kind != "choice":
                self.fail(line, f"{where}: a number prediction takes one template, not a mapping")
            for key, text in value.items():
                key_line = value.key_lines[key]
                if key != "default" and prediction.option(key) is None:
                    self.fail(
                        key_line, f"{where}: {key!r} is neither one of the options nor default"
                    )
                if not isinstance(text, str) or not text.strip():
                    self.fail(key_line, f"{where}.{key}: must be a non-empty string")
                templates[key] = (text, key_line, f"{where}.{key}")
            missing = [o.id for o in prediction.options if o.id not in templates]
            if missing and "default" not in templates:
                self.fail(
                    line,
                    f"{where}: no template for the answer {missing[0]!r} (add it, or a default)",
                )
        else:
            self.fail(line, f"{where}: must be a template, or a mapping of answer → template")
        samples: dict[str, Any] = {name: 1.5 for name in outputs}
        samples |= pattern.spec_values()
        samples |= {extra: "x" for extra in TEMPLATE_EXTRAS}
        out: dict[str, str] = {}
        for key, (text, text_line, text_where) in templates.items():
            try:
                for name, _ in template_fields(text):
                    if name not in samples:
                        raise TemplateError(
                            f"unknown value {{{name}}} (values: {', '.join(samples)})"
                        )
                safe_format(text, samples)
            except TemplateError as exc:
                self.fail(text_line, f"{text_where}: {exc}")
            out[key] = " ".join(text.split())
        return out


def _role_of(pattern: Pattern, name: str) -> str | None:
    node_def = pattern.node_def(name)
    return node_def.role if node_def is not None else None


def _is_node(pattern: Pattern, name: str) -> bool:
    """Whether ``name`` is a node the pattern may have (``replica-3``; not a role)."""
    try:
        pattern.node(name)
    except PatternError:
        return False
    return True
