"""Every pattern keeps the platform's contract, whatever it does: it loads, its nodes start
as local processes, each live control maps to a setting its node declares (same default
and bounds), every gauge, state and table it declares is reported by a node it names, its
users make calls, and its nodes write nothing but telemetry on stdout and nothing on
stderr. A new pattern gets these checks by existing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from apps.labs.patterns import Pattern, load_pattern, pattern_ids
from sandboxes.runtime.telemetry import RUNTIME_EVENTS
from sandboxes.runtime.testing import LocalCluster, wait_for
from tests.sandboxes.helpers import assert_quiet, assert_well_formed

REPORT_WITHIN_S = 12.0  # every declared observation shows up within this long


@pytest.fixture(scope="module", params=pattern_ids())
def running(request: pytest.FixtureRequest) -> Iterator[tuple[Pattern, LocalCluster]]:
    pattern = load_pattern(request.param)
    with LocalCluster(pattern.id, pattern.expand()) as cluster:
        cluster.wait_started()
        yield pattern, cluster


def refers_to(pattern: Pattern, name: str, refs: tuple[str, ...]) -> bool:
    node_def = pattern.node_def(name)
    return name in refs or (node_def is not None and node_def.role in refs)


def observed(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    return {name: cluster.ctl(name, {"op": "state"})["observed"] for name in cluster.nodes}


def test_each_control_maps_to_a_setting_of_its_node(running: tuple[Pattern, LocalCluster]) -> None:
    pattern, cluster = running
    for control in pattern.controls:
        if control.kind == "scale":
            node_def = pattern.node_def(f"{control.role}-1")
            assert node_def is not None
            assert (control.min, control.max) == (node_def.min_count, node_def.max_count)
            continue
        assert control.node is not None and control.key is not None
        targets = [n.name for n in pattern.expand() if control.applies_to(n.name, n.role)]
        assert targets, f"{control.id}: sets nothing"
        for name in targets:  # a control on a role: every instance
            state = cluster.ctl(name, {"op": "state"})
            assert control.key in state["config_schema"], f"{control.id}: {name} lacks it"
            schema = state["config_schema"][control.key]
            assert state["config"][control.key] == control.default, control.id
            if control.kind == "choice":
                assert schema["type"] == "choice" and tuple(schema["choices"]) == control.choices
            elif control.kind == "toggle":
                assert schema["type"] == "bool"
            else:
                assert (schema["min"], schema["max"]) == (control.min, control.max), control.id


def test_every_declared_observation_is_reported(running: tuple[Pattern, LocalCluster]) -> None:
    pattern, cluster = running
    wanted = [("gauges", g.id, g.nodes) for g in pattern.observe.gauges]
    wanted += [("states", s.id, s.nodes) for s in pattern.observe.states]
    wanted += [("tables", t.id, (t.node,)) for t in pattern.observe.tables]

    def missing() -> list[str]:
        now = observed(cluster)
        return [
            f"{kind[:-1]} {id_} (from {', '.join(refs)})"
            for kind, id_, refs in wanted
            if not any(id_ in now[name][kind] for name in now if refers_to(pattern, name, refs))
        ]

    try:
        wait_for(lambda: not missing(), REPORT_WITHIN_S, what="every declared observation")
    except AssertionError:
        pytest.fail(f"{pattern.id}: never reported: {'; '.join(missing())}")
    states = {s.id: s.values for s in pattern.observe.states}
    for name, seen in observed(cluster).items():
        for state_id, value in seen["states"].items():
            assert value in states.get(state_id, ()), f"{name}: {state_id}={value} undeclared"


def test_users_make_calls_and_every_line_is_telemetry(
    running: tuple[Pattern, LocalCluster],
) -> None:
    pattern, cluster = running
    users = [n for n in cluster.nodes if refers_to(pattern, n, pattern.users)]
    assert users or not pattern.users
    for name in users:
        cluster.wait_for(
            lambda name=name: cluster.find(name, "call"), REPORT_WITHIN_S, f"a call by {name}"
        )
    assert_well_formed(cluster)
    for name in cluster.nodes:
        for event in cluster.events(name):
            if event["type"] == "state" and event["event"] not in RUNTIME_EVENTS:
                declared = {e.id for e in pattern.observe.events}
                assert event["event"] in declared, f"{name}: undeclared event {event}"
    assert_quiet(cluster)
