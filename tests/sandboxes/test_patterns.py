"""The pattern loader: the real replicated-lb spec, expansion, and errors with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apps.labs.patterns import (
    PATTERNS_ROOT,
    UNKNOWN_PATTERN,
    Control,
    PatternError,
    PatternNotFound,
    load_pattern,
    pattern_ids,
    pattern_problems,
)

# ---- the real pattern --------------------------------------------------------------------


def test_it_lists_the_patterns_in_the_repo() -> None:
    assert "replicated-lb" in pattern_ids()
    assert (PATTERNS_ROOT / "replicated-lb" / "pattern.yaml").is_file()


def test_it_loads_replicated_lb() -> None:
    pattern = load_pattern("replicated-lb")
    assert pattern.id == "replicated-lb"
    assert pattern.title == "Replicated load-balanced service"
    replica, lb, traffic = pattern.nodes
    assert (replica.name, replica.role, replica.program) == ("replica", "replica", "replica.py")
    assert (replica.count, replica.min_count, replica.max_count) == (3, 1, 6)
    assert replica.env == {"DISTLAB_REPLICA_WORK_MS": "5"}
    assert (lb.name, lb.role, lb.count) == ("lb", "balancer", None)
    assert (traffic.name, traffic.role) == ("traffic", "client")
    assert pattern.faults == (
        "kill",
        "pause",
        "restart",
        "partition",
        "latency",
        "errors",
        "drop",
    )
    assert [(link.source, link.target, link.kind) for link in pattern.links] == [
        ("traffic", "lb", "request"),
        ("lb", "replica", "request"),
        ("lb", "replica", "probe"),
    ]
    assert pattern.layout.columns == (("traffic",), ("lb",), ("replica",))
    assert pattern.layout.column_of("replica") == 2
    assert [(t.node, t.target, t.rps) for t in pattern.traffic] == [("traffic", "lb", 20)]
    assert pattern.params["health_interval_s"] == 1.0
    assert pattern.users == ("traffic",)
    assert pattern.probes() == [{"from": "lb", "to": "replica", "route": "/health"}]
    assert [m.id for m in pattern.observe.marks] == ["ejected"]
    assert pattern.observe.marks[0].cleared_by == ("readmitted", "admitted")
    policy = pattern.control("policy")
    assert policy is not None and policy.node == "lb" and policy.key == "policy"
    assert policy.choices == ("round-robin", "least-connections", "random")
    scale = pattern.control("replicas")
    assert scale is not None and (scale.kind, scale.role, scale.min, scale.max) == (
        "scale",
        "replica",
        1,
        6,
    )
    assert [c.id for c in pattern.controls] == ["policy", "health_checks", "replicas", "rps"]


def test_expand_names_replicas_after_their_role() -> None:
    pattern = load_pattern("replicated-lb")
    nodes = pattern.expand()
    assert [n.name for n in nodes] == ["replica-1", "replica-2", "replica-3", "lb", "traffic"]
    name, role, program, env = nodes[0]
    assert (name, role, program) == ("replica-1", "replica", "replica.py")
    assert env["DISTLAB_REPLICA_WORK_MS"] == "5"
    assert "DISTLAB_TRAFFIC" not in env
    profile = json.loads(nodes[4].env["DISTLAB_TRAFFIC"])
    assert profile["target"] == "lb" and profile["rps"] == 20
    assert profile["mix"] == [{"method": "GET", "path": "/", "weight": 1.0, "target": ""}]
    for node in nodes:  # every node gets the params
        params = json.loads(node.env["DISTLAB_PARAMS"])
        assert params["health_interval_s"] == 1.0 and params["unhealthy_threshold"] == 1

    five = pattern.expand(count_overrides={"replica": 5})
    assert [n.name for n in five][:6] == [f"replica-{i}" for i in range(1, 6)] + ["lb"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"replica": 0}, "replica count must be from 1 to 6, got 0"),
        ({"replica": 7}, "replica count must be from 1 to 6, got 7"),
        ({"replica": True}, "replica count must be from 1 to 6, got True"),
        ({"lb": 2}, "'lb' is not a replicated role of pattern 'replicated-lb'"),
    ],
)
def test_expand_refuses_bad_counts(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(PatternError) as caught:
        load_pattern("replicated-lb").expand(count_overrides=overrides)
    assert message in str(caught.value)


def test_it_finds_any_node_a_sandbox_may_have() -> None:
    pattern = load_pattern("replicated-lb")
    assert pattern.node("replica-6").program == "replica.py"
    assert pattern.node("lb").role == "balancer"
    for name in ("replica-7", "replica-0", "nobody"):
        with pytest.raises(PatternError, match="unknown node"):
            pattern.node(name)


@pytest.mark.parametrize("pattern_id", ["nope", "../replicated-lb", "", "REPLICATED-LB"])
def test_an_unknown_pattern_is_a_clear_error(pattern_id: str) -> None:
    with pytest.raises(PatternNotFound) as caught:
        load_pattern(pattern_id)
    assert str(caught.value) == UNKNOWN_PATTERN.format(pattern_id=pattern_id)


def test_controls_validate_values() -> None:
    pattern = load_pattern("replicated-lb")
    controls: dict[str, Control] = {c.id: c for c in pattern.controls}
    assert controls["policy"].validate("random") == "random"
    assert controls["health_checks"].validate(False) is False
    assert controls["replicas"].validate(4) == 4
    assert controls["rps"].validate(150.5) == 150.5
    bad = [
        ("policy", "fastest", "must be one of round-robin, least-connections, random"),
        ("health_checks", "yes", "must be true or false"),
        ("replicas", 7, "must be from 1 to 6"),
        ("replicas", 2.5, "must be a whole number"),
        ("rps", -1, "must be from 0 to 200"),
        ("rps", "many", "must be a number"),
        ("rps", True, "must be a number"),
    ]
    for control_id, value, message in bad:
        with pytest.raises(ValueError, match=message):
            controls[control_id].validate(value)


# ---- spec errors -------------------------------------------------------------------------

SPEC = """\
title: Test pattern
nodes:
  - role: worker
    program: worker.py
    count: {default: 2, min: 1, max: 4}
  - name: front
    role: front
    program: front.py
links:
  - {from: front, to: worker}
layout:
  columns: [[front], [worker]]
traffic: {node: front, target: worker, rps: 5}
params: {interval_s: 1.0}
faults: [kill, latency]
controls:
  - {id: workers, kind: scale, role: worker}
  - {id: mode, kind: choice, node: front, key: mode, choices: [a, b], default: a}
"""


def write_pattern(root: Path, changes: dict[int, str]) -> Path:
    """A pattern folder ``root/test`` whose spec is SPEC with some lines replaced."""
    lines = SPEC.splitlines()
    for number, text in changes.items():
        lines[number - 1] = text
    folder = root / "test"
    folder.mkdir()
    (folder / "pattern.yaml").write_text("\n".join(lines) + "\n")
    for program in ("worker.py", "front.py"):
        (folder / program).write_text("def setup(node):\n    pass\n")
    return folder / "pattern.yaml"


def test_the_test_spec_itself_is_valid(tmp_path: Path) -> None:
    write_pattern(tmp_path, {})
    pattern = load_pattern("test", root=tmp_path)
    assert [n.name for n in pattern.expand()] == ["worker-1", "worker-2", "front"]
    assert pattern_ids(tmp_path) == ["test"]


def test_series_name_a_node_or_role_and_a_route(tmp_path: Path) -> None:
    series = "series:\n  - {id: slow, node: front, route: /slow, label: front GET /slow}\n"
    write_pattern(tmp_path, {14: series + "  - {id: all, node: worker, route: /}"})
    pattern = load_pattern("test", root=tmp_path)
    assert pattern.telemetry_spec()["series"] == [
        {"id": "slow", "label": "front GET /slow", "node": "front", "route": "/slow"},
        {"id": "all", "label": "worker /", "node": "worker", "route": "/"},  # default label
    ]


SPEC_ERRORS = [
    ({1: "title: Test pattern\ncolour: red"}, 2, "pattern: unknown key 'colour' (expected"),
    ({1: "# untitled"}, 2, "pattern: missing key 'title'"),
    ({13: "title: again"}, 13, "duplicate key 'title' (first on line 1)"),
    ({4: "    program: ghost.py"}, 4, "nodes[0].program: program 'ghost.py' not found"),
    ({4: "    program: ../front.py"}, 4, "nodes[0].program: '../front.py' is not a valid name"),
    ({3: "  - role: worker\n    name: workers"}, 4, "a replicated node is named after its role"),
    ({6: "  - name: worker-2"}, 6, "the name 'worker-2' clashes with the node on line 3"),
    ({6: "  - name: Front!"}, 6, "nodes[1].name: 'Front!' is not a valid name"),
    (
        {5: "    count: {default: 9, min: 1, max: 4}"},
        5,
        "count.default: must be from 1 to 4, got 9",
    ),
    ({5: "    count: {default: 2, min: 3, max: 2}"}, 5, "count.max: must be from 3 to 20, got 2"),
    ({5: "    count: 0"}, 5, "nodes[0].count: must be from 1 to 20, got 0"),
    ({5: "    count: {default: 2}"}, 5, "nodes[0].count: missing key 'min'"),
    (
        {8: "    program: front.py\n    env: {DISTLAB_NODE: x}"},
        9,
        "DISTLAB_NODE is set by the engine",
    ),
    (
        {8: "    program: front.py\n    env: {MODE: [1]}"},
        9,
        "env.MODE: must be a string or a number",
    ),
    ({10: "  - {from: front, to: nobody}"}, 10, "links[0].to: unknown node 'nobody'"),
    ({10: "  - {from: front, to: worker, via: x}"}, 10, "links[0]: unknown key 'via'"),
    ({10: "  - {from: front, to: front}"}, 10, "links[0]: a node cannot link to itself"),
    ({12: "  columns: [[front]]"}, 12, "layout: node 'worker' is in no column"),
    ({12: "  columns: [[front], [worker, front]]"}, 12, "'front' is placed twice"),
    (
        {13: "traffic: {node: worker, target: front, rps: 5}"},
        13,
        "traffic.node: must name a single node, not the role 'worker'",
    ),
    (
        {13: "traffic: {node: front, target: worker, rps: 500}"},
        13,
        "traffic.rps: must be from 0 to 200, got 500",
    ),
    ({14: "params: {Interval: 1}"}, 14, "params: 'Interval' is not a valid name"),
    ({14: "params: {interval_s: [1]}"}, 14, "params.interval_s: must be a number, a string"),
    (
        {
            13: "traffic: [{node: front, target: worker, rps: 5}, "
            "{node: front, target: worker, rps: 1}]"
        },
        13,
        "traffic: 'front' has two profiles",
    ),
    (
        {13: "traffic: {node: front, target: worker, rps: 5, mix: [{path: /, target: ghost}]}"},
        13,
        "traffic.mix[0].target: unknown node 'ghost'",
    ),
    ({10: "  - {from: front, to: worker, route: /x}"}, 10, "links[0].route: only a probe link"),
    ({14: "users: [front, nobody]"}, 14, "users[1]: unknown node 'nobody'"),
    ({14: "series:\n  - {id: a, node: ghost, route: /}"}, 15, "series[0].node: unknown node"),
    ({14: "series:\n  - {id: a, node: front, route: x}"}, 15, "series[0].route: must start"),
    ({14: "series:\n  - {id: a, node: front}"}, 15, "series[0]: missing key 'route'"),
    ({14: "series:\n  - {id: A, node: front, route: /}"}, 15, "series[0].id: 'A' is not"),
    (
        {14: "series:\n  - {id: a, node: front, route: /}\n  - {id: a, node: worker, route: /}"},
        16,
        "series[1].id: 'a' is declared twice",
    ),
    (
        {14: "observe:\n  events:\n    - {id: started, text: x}"},
        16,
        "observe.events[0].id: 'started' is an event the runtime writes itself",
    ),
    (
        {14: "observe:\n  events:\n    - {id: moved, text: '{n:.0f} keys moved'}"},
        16,
        "observe.events[0].text: {n}: name a field plainly",
    ),
    (
        {14: "observe:\n  marks:\n    - {id: out, set_by: [gone], cleared_by: back}"},
        16,
        "observe.marks[0]: the event 'gone' is not declared in observe.events",
    ),
    (
        {14: "observe:\n  gauges:\n    - {id: lag, nodes: [ghost]}"},
        16,
        "observe.gauges[0].nodes[0]: unknown node 'ghost'",
    ),
    (
        {14: "observe:\n  gauges:\n    - {id: lag, nodes: [worker], graph: 'no'}"},
        16,
        "observe.gauges[0].graph: must be true or false, got 'no'",
    ),
    (
        {
            14: "observe:\n  gauges:\n    - {id: lag, nodes: worker}\n"
            "  states:\n    - {id: lag, values: [a], nodes: front}"
        },
        18,
        "observe.states[0].id: 'lag' is declared twice",
    ),
    (
        {14: "observe:\n  tables:\n    - {id: t, node: front, columns: []}"},
        16,
        "observe.tables[0].columns: from 1 to 8 columns",
    ),
    (
        {15: "faults: [kill, meteor]"},
        15,
        "faults[1]: unknown fault kind 'meteor' (expected one of: kill, pause, restart, latency",
    ),
    ({15: "faults: [kill, kill]"}, 15, "faults[1]: 'kill' is listed twice"),
    (
        {17: "  - {id: workers, kind: slider, role: worker}"},
        17,
        "controls[0].kind: must be one of choice, toggle, number, scale, got 'slider'",
    ),
    (
        {17: "  - {id: workers, kind: scale, role: front}"},
        17,
        "controls[0].role: 'front' is not a replicated role",
    ),
    (
        {17: "  - {id: workers, kind: scale, role: worker, max: 9}"},
        17,
        "controls[0].max: must be from 1 to 4, got 9",
    ),
    (
        {18: "  - {id: mode, kind: choice, node: ghost, key: mode, choices: [a, b]}"},
        18,
        "controls[1].node: unknown node 'ghost'",
    ),
    (
        {18: "  - {id: mode, kind: choice, node: front, key: mode, choices: [a, b], default: c}"},
        18,
        "controls[1].default: must be one of a, b, got 'c'",
    ),
    (
        {18: "  - {id: mode, kind: choice, node: front, key: mode, choices: [a]}"},
        18,
        "controls[1].choices: must be two or more different strings",
    ),
    (
        {18: "  - {id: workers, kind: toggle, node: front, key: enabled}"},
        18,
        "controls[1]: the id 'workers' is used twice",
    ),
    (
        {18: "  - {id: rate, kind: number, node: front, key: rate, min: 5, max: 1}"},
        18,
        "controls[1].max: must be from 5 to",
    ),
]


@pytest.mark.parametrize(("changes", "line", "message"), SPEC_ERRORS, ids=lambda v: str(v)[:30])
def test_spec_errors_name_the_file_and_line(
    tmp_path: Path, changes: dict[int, str], line: int, message: str
) -> None:
    path = write_pattern(tmp_path, changes)
    with pytest.raises(PatternError) as caught:
        load_pattern("test", root=tmp_path)
    assert str(caught.value).startswith(f"{path}:{line}: "), caught.value
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", ":1: the file is empty"),
        ("- just\n- a list\n", ":1: the file must be a mapping"),
        ("title: [unclosed\n", "invalid YAML"),
        ("a: &x [1, 2]\nb: *x\n", ":1: anchors and aliases"),
    ],
)
def test_a_spec_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "pattern.yaml").write_text(text)
    with pytest.raises(PatternError, match=message):
        load_pattern("test", root=tmp_path)


def test_folders_without_a_spec_are_not_patterns(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "Bad Name").mkdir()
    (tmp_path / "Bad Name" / "pattern.yaml").write_text("title: x\n")
    assert pattern_ids(tmp_path) == []
    assert pattern_ids(tmp_path / "missing") == []


def test_content_check_finds_declarations_no_program_reports(tmp_path: Path) -> None:
    write_pattern(tmp_path, {14: "observe:\n  gauges:\n    - {id: depth, nodes: [worker]}"})
    [(path, _, message)] = pattern_problems(tmp_path)
    assert path == tmp_path / "test" / "pattern.yaml"
    assert "the gauge 'depth' is declared but never reported" in message
    assert "node.gauge('depth', …) in worker.py" in message
    (tmp_path / "test" / "worker.py").write_text("def setup(node):\n    node.gauge('depth', 0)\n")
    assert pattern_problems(tmp_path) == []


def test_content_check_reports_a_spec_that_does_not_load(tmp_path: Path) -> None:
    write_pattern(tmp_path, {15: "faults: [meteor]"})
    [(path, line, message)] = pattern_problems(tmp_path)
    assert line == 15 and "unknown fault kind 'meteor'" in message
    assert path.name == "pattern.yaml"
