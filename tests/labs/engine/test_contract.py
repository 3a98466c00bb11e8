"""The shared engine suite: what every engine must do, run against each of them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from apps.labs.engine.base import Engine, EngineError, NodeNotFound, NodeSpec, SandboxSpec


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what or predicate}")


def answers(engine: Engine, spec: SandboxSpec, name: str) -> bool:
    try:
        return bool(engine.control(spec.sandbox_id, name, {"op": "state"}).get("ok"))
    except EngineError:
        return False


def states(engine: Engine, spec: SandboxSpec) -> dict[str, str]:
    return {s.name: s.state for s in engine.status(spec.sandbox_id)}


def ready(engine: Engine, spec: SandboxSpec) -> None:
    for node in spec.nodes:
        wait_for(lambda n=node.name: answers(engine, spec, n), what=f"{node.name} answers")


def telemetry(
    engine: Engine, spec: SandboxSpec, name: str, seconds: float, since: float
) -> list[dict[str, Any]]:
    """The node's telemetry lines from ``since`` for at most ``seconds``."""
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    lines = []
    try:
        for raw in engine.follow(spec.sandbox_id, name, since=since, stop=stop):
            lines.append(json.loads(raw))
            if stop.is_set():
                break
    finally:
        timer.cancel()
    return lines


def test_create_starts_every_node_and_they_answer(engine: Engine, spec_factory) -> None:  # type: ignore[no-untyped-def]
    spec = spec_factory()
    statuses = engine.create(spec)
    assert [s.name for s in statuses] == [n.name for n in spec.nodes]
    assert all(s.state == "running" for s in statuses)
    ready(engine, spec)
    reply = engine.control(spec.sandbox_id, "lb", {"op": "state"})
    assert reply["node"] == "lb" and reply["role"] == "balancer"


def test_create_twice_adopts_instead_of_duplicating(engine: Engine, spec_factory) -> None:  # type: ignore[no-untyped-def]
    spec = spec_factory()
    first = engine.create(spec)
    second = engine.create(spec)
    assert [(s.name, s.address) for s in first] == [(s.name, s.address) for s in second]
    assert len(engine.status(spec.sandbox_id)) == len(spec.nodes)


def test_traffic_flows_and_follow_yields_telemetry(engine: Engine, spec_factory) -> None:  # type: ignore[no-untyped-def]
    spec = spec_factory()
    since = time.time()
    engine.create(spec)
    ready(engine, spec)
    lines = telemetry(engine, spec, "replica-1", seconds=3.0, since=since)
    requests = [line for line in lines if line["type"] == "request" and line["route"] == "/"]
    assert requests, lines[:5]
    assert all(line["v"] == 1 and line["node"] == "replica-1" for line in lines)
    assert {line["src"] for line in requests} == {"lb"}


def test_kill_restart_pause_resume(engine: Engine, spec_factory) -> None:  # type: ignore[no-untyped-def]
    spec = spec_factory()
    engine.create(spec)
    ready(engine, spec)

    engine.kill(spec.sandbox_id, "replica-2")
    assert states(engine, spec)["replica-2"] == "exited"
    assert not answers(engine, spec, "replica-2")
    engine.restart(spec.sandbox_id, "replica-2")
    wait_for(lambda: answers(engine, spec, "replica-2"), what="replica-2 back")
    assert states(engine, spec)["replica-2"] == "running"

    engine.pause(spec.sandbox_id, "replica-3")
    assert states(engine, spec)["replica-3"] == "paused"
    engine.resume(spec.sandbox_id, "replica-3")
    wait_for(lambda: states(engine, spec)["replica-3"] == "running")
    wait_for(lambda: answers(engine, spec, "replica-3"), what="replica-3 answers")


def calls_to(lines: list[dict[str, Any]], peer: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["type"] == "call" and line["dst"] == peer]


def test_a_killed_node_is_refused_at_once_and_a_paused_one_times_out(  # type: ignore[no-untyped-def]
    engine: Engine, spec_factory
) -> None:
    """Chapter 1's lesson, from the caller's side: a crashed process fails *fast* (the
    kernel refuses the connection), a frozen one fails *slow* (the connection is taken,
    nobody answers, the caller waits for its timeout). The balancer calls (and probes)
    every replica, with a 1 s request timeout and a 0.5 s probe timeout."""
    spec = spec_factory(replicas=3)
    engine.create(spec)
    ready(engine, spec)

    engine.kill(spec.sandbox_id, "replica-2")
    engine.pause(spec.sandbox_id, "replica-3")
    since = time.time() + 0.2  # calls that started before the faults are not counted
    lines = telemetry(engine, spec, "lb", seconds=3.0, since=since)

    killed = calls_to(lines, "replica-2")
    assert killed, "the balancer never called the killed replica"
    assert all(line["error"] == "connect" for line in killed), killed[:5]
    assert max(line["ms"] for line in killed) < 250, killed[:5]  # well under the timeouts

    paused = calls_to(lines, "replica-3")
    assert paused, "the balancer never called the paused replica"
    assert all(line["error"] == "timeout" for line in paused), paused[:5]
    assert min(line["ms"] for line in paused) >= 400, paused[:5]  # waited for the timeout


def test_partition_cuts_a_node_off_and_heal_restores_it(engine: Engine, spec_factory) -> None:  # type: ignore[no-untyped-def]
    spec = spec_factory(replicas=1)
    engine.create(spec)
    ready(engine, spec)

    engine.partition(spec.sandbox_id, "lb")
    cut = time.time()
    lines = telemetry(engine, spec, "traffic", seconds=3.0, since=cut + 0.5)
    calls = [line for line in lines if line["type"] == "call"]
    assert calls and all(line["status"] != 200 for line in calls), calls[:5]

    engine.heal(spec.sandbox_id, "lb")
    healed = time.time()

    def recovered() -> bool:
        lines = telemetry(engine, spec, "traffic", 1.0, healed)
        return any(line["type"] == "call" and line["status"] == 200 for line in lines)

    wait_for(recovered, what="traffic succeeds after heal")


def test_scaling_adds_and_removes_nodes(engine: Engine, spec_factory) -> None:  # type: ignore[no-untyped-def]
    spec = spec_factory(replicas=1)
    engine.create(spec)
    extra = NodeSpec(
        name="replica-2", role="replica", program="replica.py", env=dict(spec.nodes[-1].env)
    )
    status = engine.add_node(spec, extra)
    assert status.name == "replica-2" and status.state == "running"
    wait_for(lambda: answers(engine, spec, "replica-2"))
    engine.remove_node(spec.sandbox_id, "replica-2")
    assert "replica-2" not in states(engine, spec)
    engine.remove_node(spec.sandbox_id, "replica-2")  # already gone: fine


def test_destroy_leaves_nothing(engine: Engine, spec_factory) -> None:  # type: ignore[no-untyped-def]
    spec = spec_factory()
    engine.create(spec)
    assert spec.sandbox_id in {i.sandbox_id for i in engine.list_sandboxes()}
    engine.destroy(spec.sandbox_id)
    assert engine.status(spec.sandbox_id) == []
    assert spec.sandbox_id not in {i.sandbox_id for i in engine.list_sandboxes()}
    engine.destroy(spec.sandbox_id)  # twice: fine


def test_unknown_nodes_are_a_clear_error(engine: Engine, spec_factory) -> None:  # type: ignore[no-untyped-def]
    spec = spec_factory(replicas=1)
    engine.create(spec)
    for operation in (engine.kill, engine.pause, engine.restart):
        with pytest.raises(NodeNotFound, match="no-such-node"):
            operation(spec.sandbox_id, "no-such-node")
    with pytest.raises(NodeNotFound):
        engine.control(spec.sandbox_id, "no-such-node", {"op": "state"})
