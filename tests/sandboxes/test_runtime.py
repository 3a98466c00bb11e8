"""The node runtime, through real replica nodes: HTTP, telemetry, faults, control, shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apps.labs.patterns import Pattern
from sandboxes.runtime.ctl import EXIT_NOT_OK, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, send
from sandboxes.runtime.node import trace_id
from sandboxes.runtime.run import PATTERNS_DIR, UsageError, node_from_environment, program_path
from sandboxes.runtime.testing import REPO, LocalCluster, wait_for
from tests.sandboxes.helpers import PATTERN, assert_quiet, get

NODE = "replica-1"
OTHER = "replica-2"


@pytest.fixture(scope="module")
def pair(pattern: Pattern) -> Iterator[LocalCluster]:
    """replica-1 (the node under test) and replica-2 (a peer to partition from)."""
    with LocalCluster(PATTERN, [pattern.node(NODE), pattern.node(OTHER)]) as cluster:
        cluster.wait_started()
        yield cluster


@pytest.fixture
def cluster(pair: LocalCluster) -> Iterator[LocalCluster]:
    yield pair
    pair.ctl(NODE, {"op": "clear"})
    pair.ctl(NODE, {"op": "config", "set": {"work_ms": 5.0}})
    pair.ctl(NODE, {"op": "peers", "set": pair.peers()})
    assert_quiet(pair)


def address(cluster: LocalCluster) -> str:
    return cluster.nodes[NODE].address


def fault(cluster: LocalCluster, **message: Any) -> None:
    reply = cluster.ctl(NODE, {"op": "fault", **message})
    assert reply["ok"], reply


def timed_get(cluster: LocalCluster, path: str = "/", **kwargs: Any) -> tuple[float, int]:
    started = time.monotonic()
    status = get(address(cluster), path, **kwargs).status
    return time.monotonic() - started, status


# ---- serving and telemetry ---------------------------------------------------------------


def test_it_serves_the_program_and_health_saying_who_answered(cluster: LocalCluster) -> None:
    answer = get(address(cluster), "/")
    assert answer.status == 200
    assert json.loads(answer.body) == {"replica": NODE, "work_ms": 5.0}
    assert answer.headers["X-Distlab-Node"] == NODE

    health = get(address(cluster), "/health")
    assert health.status == 200
    assert json.loads(health.body) == {"node": NODE, "ok": True}
    assert health.headers["X-Distlab-Node"] == NODE

    missing = get(address(cluster), "/nowhere")
    assert missing.status == 404
    assert missing.headers["X-Distlab-Node"] == NODE


def test_it_reports_its_state(cluster: LocalCluster) -> None:
    state = cluster.ctl(NODE, {"op": "state"})
    assert state["ok"] is True
    assert state["node"] == NODE
    assert state["role"] == "replica"
    assert state["pattern"] == PATTERN
    assert state["pid"] == cluster.nodes[NODE].pid
    assert state["uptime_s"] > 0
    assert state["in_flight"] == 0
    assert state["faults"] == {}
    assert state["config"] == {"work_ms": 5.0}
    assert state["config_schema"]["work_ms"]["type"] == "float"
    assert state["peers"] == cluster.peers()


def test_each_request_becomes_a_request_event_naming_the_caller(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    get(address(cluster), "/", caller=OTHER)
    event = cluster.wait_event(NODE, "request", mark, src=OTHER)
    assert event["v"] == 1
    assert isinstance(event["ts"], float) and abs(event["ts"] - time.time()) < 60
    assert event["node"] == NODE
    assert event["dst"] == NODE
    assert event["method"] == "GET"
    assert event["route"] == "/"
    assert event["status"] == 200
    assert 4 <= event["ms"] < 1000  # the replica works 5 ms
    assert "fault" not in event and "error" not in event


def test_the_trace_id_comes_from_traceparent_then_traceresponse_and_only_if_well_formed() -> None:
    sent = {"TraceParent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    answered = {"traceresponse": "00-" + "1" * 32 + "-" + "2" * 16 + "-00"}
    assert trace_id(sent, answered) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id({}, answered) == "1" * 32
    assert trace_id(None, None) is None
    for bad in ("00-" + "0" * 32 + "-" + "2" * 16 + "-01", "00-XYZ-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"):  # fmt: skip
        assert trace_id({"traceparent": bad}) is None, bad


def test_started_is_the_first_event(cluster: LocalCluster) -> None:
    first = cluster.events(NODE)[0]
    assert first["type"] == "state" and first["event"] == "started"
    assert first["pid"] == cluster.nodes[NODE].pid
    assert first["role"] == "replica" and first["pattern"] == PATTERN
    assert first["listen"] == address(cluster)


# ---- faults ------------------------------------------------------------------------------


def test_latency_delays_requests_until_cleared(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    fault(cluster, kind="latency", ms=300)
    assert cluster.ctl(NODE, {"op": "state"})["faults"] == {
        "latency": {"ms": 300.0, "jitter_ms": 0.0}
    }
    elapsed, status = timed_get(cluster, "/health")
    assert status == 200 and elapsed >= 0.29
    cluster.wait_event(NODE, "request", mark, route="/health", fault="latency")
    cluster.wait_event(NODE, "state", mark, event="fault", kind="latency")

    reply = cluster.ctl(NODE, {"op": "clear", "kind": "latency"})
    assert reply == {"ok": True, "cleared": ["latency"], "faults": {}}
    elapsed, status = timed_get(cluster, "/health")
    assert status == 200 and elapsed < 0.2
    cluster.wait_event(NODE, "state", mark, event="fault_cleared", kind="latency")


def test_latency_jitter_stays_within_its_bounds(cluster: LocalCluster) -> None:
    fault(cluster, kind="latency", ms=100, jitter_ms=50)
    times = [timed_get(cluster, "/health")[0] for _ in range(6)]
    assert all(0.049 <= t < 0.5 for t in times), times


def test_errors_answer_with_the_status_health_checks_included(cluster: LocalCluster) -> None:
    fault(cluster, kind="errors", rate=1.0, status=500)
    answer = get(address(cluster), "/")
    assert answer.status == 500
    assert json.loads(answer.body)["fault"] == "errors"
    assert get(address(cluster), "/health").status == 500

    fault(cluster, kind="errors", rate=0.5)  # replaces the previous one; status 503
    statuses = {get(address(cluster), "/health").status for _ in range(40)}
    assert statuses == {200, 503}

    cluster.ctl(NODE, {"op": "clear", "kind": "errors"})
    assert get(address(cluster), "/health").status == 200


def test_drop_holds_requests_until_the_caller_gives_up(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    fault(cluster, kind="drop", rate=1.0)
    with pytest.raises(TimeoutError):
        get(address(cluster), "/health", timeout=0.3)
    event = cluster.wait_event(NODE, "request", mark, route="/health")
    assert event["status"] == 0
    assert event["error"] == "dropped" and event["fault"] == "drop"
    assert event["ms"] >= 250

    cluster.ctl(NODE, {"op": "clear"})
    assert get(address(cluster), "/health").status == 200


def test_partition_cuts_the_named_peers_at_once(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    fault(cluster, kind="partition", peers=[OTHER])
    started = time.monotonic()
    with pytest.raises(OSError):  # the connection is closed without an answer
        get(address(cluster), "/health", caller=OTHER)
    assert time.monotonic() - started < 0.5
    assert get(address(cluster), "/health").status == 200  # callers not named get through
    event = cluster.wait_event(NODE, "request", mark, src=OTHER)
    assert (event["status"], event["error"], event["fault"]) == (0, "partitioned", "partition")

    fault(cluster, kind="partition", peers=["*"])
    with pytest.raises(OSError):
        get(address(cluster), "/health")

    cluster.ctl(NODE, {"op": "clear", "kind": "partition"})
    assert get(address(cluster), "/health", caller=OTHER).status == 200


def test_clearing_one_kind_keeps_the_others(cluster: LocalCluster) -> None:
    fault(cluster, kind="latency", ms=10)
    fault(cluster, kind="errors", rate=0.1)
    fault(cluster, kind="drop", rate=0.1)
    reply = cluster.ctl(NODE, {"op": "clear", "kind": "errors"})
    assert reply["cleared"] == ["errors"]
    assert set(reply["faults"]) == {"latency", "drop"}
    reply = cluster.ctl(NODE, {"op": "clear"})
    assert reply == {"ok": True, "cleared": ["latency", "drop"], "faults": {}}
    assert cluster.ctl(NODE, {"op": "clear"}) == {"ok": True, "cleared": [], "faults": {}}


# ---- control messages --------------------------------------------------------------------


def test_config_changes_are_applied_and_announced(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    reply = cluster.ctl(NODE, {"op": "config", "set": {"work_ms": 0}})
    assert reply == {"ok": True, "config": {"work_ms": 0.0}}
    event = cluster.wait_event(NODE, "state", mark, event="config")
    assert (event["key"], event["value"], event["previous"]) == ("work_ms", 0.0, 5.0)


def test_peers_replace_the_address_book(cluster: LocalCluster) -> None:
    mark = cluster.mark()
    peers = [*cluster.peers(), {"name": "replica-9", "role": "replica", "address": "x:9"}]
    reply = cluster.ctl(NODE, {"op": "peers", "set": peers})
    assert reply == {"ok": True, "peers": peers}
    assert cluster.ctl(NODE, {"op": "state"})["peers"] == peers
    event = cluster.wait_event(NODE, "state", mark, event="peers")
    assert event["peers"] == [NODE, OTHER, "replica-9"]
    fault(cluster, kind="partition", peers=["replica-9"])  # now a known name


BAD_MESSAGES: list[tuple[dict[str, Any] | list[Any], str]] = [
    (["state"], "a control message is a JSON object"),
    ({}, "unknown op None"),
    ({"op": "reboot"}, "unknown op 'reboot'"),
    ({"op": "state", "verbose": True}, "state: unknown field 'verbose'"),
    ({"op": "fault"}, "fault: kind is required"),
    ({"op": "fault", "kind": "meteor"}, "unknown fault kind 'meteor'"),
    ({"op": "fault", "kind": "kill"}, "'kill' is done by the engine"),
    ({"op": "fault", "kind": "latency"}, "latency: ms is required"),
    ({"op": "fault", "kind": "latency", "ms": -1}, "ms must be between 0 and 30000"),
    ({"op": "fault", "kind": "latency", "ms": 30001}, "ms must be between 0 and 30000"),
    ({"op": "fault", "kind": "latency", "ms": "100"}, "ms must be a number"),
    ({"op": "fault", "kind": "latency", "ms": True}, "ms must be a number"),
    ({"op": "fault", "kind": "latency", "ms": 10, "jitter_ms": 40000}, "jitter_ms must be"),
    ({"op": "fault", "kind": "latency", "ms": 10, "duration": 5}, "unknown parameter 'duration'"),
    ({"op": "fault", "kind": "errors", "rate": 1.5}, "rate must be between 0 and 1"),
    ({"op": "fault", "kind": "errors", "status": 404}, "status must be 500 or 503"),
    ({"op": "fault", "kind": "drop", "rate": -0.1}, "rate must be between 0 and 1"),
    ({"op": "fault", "kind": "partition"}, "peers must be a non-empty list"),
    ({"op": "fault", "kind": "partition", "peers": []}, "peers must be a non-empty list"),
    ({"op": "fault", "kind": "partition", "peers": OTHER}, "peers must be a non-empty list"),
    ({"op": "fault", "kind": "partition", "peers": ["nobody"]}, "unknown peer 'nobody'"),
    ({"op": "fault", "kind": "partition", "peers": [NODE]}, "cannot be partitioned from itself"),
    ({"op": "clear", "kind": "meteor"}, "unknown fault kind 'meteor'"),
    ({"op": "clear", "all": True}, "clear: unknown field 'all'"),
    ({"op": "config"}, '"set" must be an object'),
    ({"op": "config", "set": {}}, "'set' names no setting"),
    ({"op": "config", "set": {"colour": "red"}}, "unknown setting 'colour'"),
    ({"op": "config", "set": {"work_ms": "fast"}}, "work_ms must be a number"),
    ({"op": "config", "set": {"work_ms": 1, "colour": 1}}, "unknown setting 'colour'"),
    ({"op": "config", "set": {"work_ms": 10_001}}, "work_ms must be between 0 and 10000"),
    ({"op": "peers", "set": "everyone"}, "peers must be a list"),
    ({"op": "peers", "set": [{"name": "a"}]}, 'exactly "name", "role" and "address"'),
    ({"op": "peers", "set": [{"name": "a", "role": "r", "address": "nowhere"}]}, "host:port"),
    ({"op": "peers", "set": [{"name": "A!", "role": "r", "address": "h:1"}]}, "bad name"),
    (
        {"op": "peers", "set": [{"name": "a", "role": "r", "address": "h:1"}] * 2},
        "'a' is listed twice",
    ),
]


@pytest.mark.parametrize(("message", "error"), BAD_MESSAGES, ids=lambda v: str(v)[:40])
def test_bad_control_messages_are_refused_and_change_nothing(
    cluster: LocalCluster, message: Any, error: str
) -> None:
    fault(cluster, kind="latency", ms=1)  # something to keep
    before = cluster.ctl(NODE, {"op": "state"})
    mark = cluster.mark()
    reply = send(cluster.nodes[NODE].control, message)
    assert reply["ok"] is False
    assert error in reply["error"]
    after = cluster.ctl(NODE, {"op": "state"})
    for key in ("faults", "config", "peers"):
        assert after[key] == before[key]
    # No event either: the stream is ordered, so once a later event has arrived, anything
    # the refused message had emitted would be there before it.
    fault(cluster, kind="latency", ms=2)
    sentinel = cluster.wait_event(NODE, "state", mark, event="fault")
    assert cluster.events(NODE, "state", mark) == [sentinel]


def test_a_message_that_is_not_json_is_refused(cluster: LocalCluster) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(2)
        sock.connect(cluster.nodes[NODE].control)
        sock.sendall(b"{op: state}\n")
        reply = json.loads(sock.makefile("rb").readline())
    assert reply == {"ok": False, "error": "the message is not valid JSON"}


# ---- the control client ------------------------------------------------------------------


def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxes.runtime.ctl", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=10,
    )


def test_ctl_prints_the_reply_and_exits_by_its_outcome(cluster: LocalCluster) -> None:
    path = cluster.nodes[NODE].control
    done = ctl("--socket", path, '{"op": "state"}')
    assert done.returncode == EXIT_OK
    assert json.loads(done.stdout)["node"] == NODE

    done = ctl('{"op": "fault", "kind": "errors", "rate": 2}', env={"DISTLAB_CONTROL": path})
    assert done.returncode == EXIT_NOT_OK
    assert json.loads(done.stdout) == {
        "ok": False,
        "error": "errors: rate must be between 0 and 1, got 2",
    }


def test_ctl_exits_2_when_the_node_cannot_be_reached(tmp_path: Path) -> None:
    done = ctl("--socket", str(tmp_path / "none.sock"), '{"op": "state"}')
    assert done.returncode == EXIT_UNREACHABLE
    assert "cannot reach the node" in done.stderr
    assert done.stdout == ""


def test_ctl_exits_64_on_a_bad_command_line(tmp_path: Path) -> None:
    done = ctl("--socket", str(tmp_path / "n.sock"), "{op: state}")
    assert done.returncode == EXIT_USAGE
    assert "not valid JSON" in done.stderr
    done = ctl('{"op": "state"}', env={"DISTLAB_CONTROL": ""})
    assert done.returncode == EXIT_USAGE
    assert "no socket" in done.stderr


def test_send_raises_oserror_or_timeout_when_there_is_no_answer(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        send(str(tmp_path / "missing.sock"), {"op": "state"})

    stale = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(stale)  # bound, never listening: like a dead node's socket file
    with pytest.raises(ConnectionRefusedError):
        send(stale, {"op": "state"})

    silent = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(silent)
        server.listen()
        with pytest.raises(TimeoutError):
            send(silent, {"op": "state"}, timeout=0.2)


# ---- start-up and shutdown ---------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_node_cleanly(
    start_nodes: Callable[..., LocalCluster], sig: signal.Signals
) -> None:
    cluster = start_nodes(NODE)
    assert get(cluster.nodes[NODE].address, "/").status == 200
    assert cluster.terminate(NODE, sig) == 0
    last = cluster.events(NODE)[-1]
    assert (last["type"], last["event"], last["reason"]) == ("state", "stopped", sig.name)
    assert not Path(cluster.nodes[NODE].control).exists()
    assert_quiet(cluster)


def test_shutdown_waits_briefly_for_requests_in_flight(
    start_nodes: Callable[..., LocalCluster],
) -> None:
    cluster = start_nodes(NODE)
    cluster.ctl(NODE, {"op": "fault", "kind": "latency", "ms": 20_000})
    outcome: list[object] = []

    def slow_request() -> None:
        try:
            outcome.append(get(cluster.nodes[NODE].address, "/", timeout=30).status)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_for(lambda: cluster.ctl(NODE, {"op": "state"})["in_flight"] == 1, 5, what="in flight")
    started = time.monotonic()
    assert cluster.terminate(NODE) == 0
    assert time.monotonic() - started < 4  # a 1.5 s grace, not the 20 s of latency
    thread.join(5)
    assert outcome and isinstance(outcome[0], OSError)  # hung up on, no answer
    assert cluster.events(NODE)[-1]["event"] == "stopped"


def run_node(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DISTLAB_")}
    return subprocess.run(
        [sys.executable, "-m", "sandboxes.runtime.run", *args],
        cwd=REPO,
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_a_bad_environment_exits_2_before_serving() -> None:
    done = run_node({"DISTLAB_NODE": "replica-1"}, PATTERN, "replica.py")
    assert done.returncode == 2
    assert "missing environment: DISTLAB_LISTEN, DISTLAB_CONTROL" in done.stderr
    assert done.stdout == ""


def test_programs_are_found_only_inside_their_pattern_folder() -> None:
    assert program_path(PATTERN, "replica.py") == PATTERNS_DIR / PATTERN / "replica.py"
    with pytest.raises(
        UsageError, match=re.escape("no program 'nothing.py' in pattern 'replicated-lb'")
    ):
        program_path(PATTERN, "nothing.py")
    with pytest.raises(UsageError, match=re.escape("bad pattern id '../etc'")):
        program_path("../etc", "replica.py")
    with pytest.raises(UsageError, match="bad program name"):
        program_path(PATTERN, "../balancer.py")


def test_the_environment_is_checked() -> None:
    env = {"DISTLAB_NODE": "lb", "DISTLAB_LISTEN": "127.0.0.1:1", "DISTLAB_CONTROL": "/tmp/c"}
    peers = [{"name": "lb", "role": "balancer", "address": "127.0.0.1:1"}]
    node, control = node_from_environment(PATTERN, {**env, "DISTLAB_PEERS": json.dumps(peers)})
    assert (node.name, node.role, node.listen, control) == (
        "lb",
        "balancer",
        "127.0.0.1:1",
        "/tmp/c",
    )
    with pytest.raises(UsageError, match="DISTLAB_LISTEN: address must be host:port"):
        node_from_environment(PATTERN, {**env, "DISTLAB_LISTEN": "8080"})
    with pytest.raises(UsageError, match="DISTLAB_PEERS"):
        node_from_environment(PATTERN, {**env, "DISTLAB_PEERS": "[{}]"})
    with pytest.raises(UsageError, match="DISTLAB_PEERS"):
        node_from_environment(PATTERN, {**env, "DISTLAB_PEERS": "not json"})


def test_a_program_that_fails_to_set_up_exits_1_with_a_failed_event(tmp_path: Path) -> None:
    env = {
        "DISTLAB_NODE": "lb",
        "DISTLAB_LISTEN": "127.0.0.1:1",
        "DISTLAB_CONTROL": str(tmp_path / "c.sock"),
        "DISTLAB_PARAMS": "soon",
    }
    done = run_node(env, PATTERN, "balancer.py")
    assert done.returncode == 1
    event = json.loads(done.stdout)
    assert (event["type"], event["event"]) == ("state", "failed")
    assert event["error"] == "ValueError: DISTLAB_PARAMS must be JSON, got 'soon'"
    assert "Traceback" in done.stderr


def test_a_port_in_use_exits_1_with_a_failed_event(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "DISTLAB_NODE": "replica-1",
            "DISTLAB_LISTEN": f"127.0.0.1:{port}",
            "DISTLAB_CONTROL": str(tmp_path / "c.sock"),
        }
        done = run_node(env, PATTERN, "replica.py")
    assert done.returncode == 1
    event = json.loads(done.stdout.splitlines()[-1])
    assert (event["type"], event["event"]) == ("state", "failed")
    assert "could not start" in event["error"]
