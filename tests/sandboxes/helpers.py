"""Helpers for the sandbox tests: HTTP on loopback, counting, a quiet-node check."""

from __future__ import annotations

import http.client
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from sandboxes.runtime.node import FROM_HEADER
from sandboxes.runtime.testing import LocalCluster

PATTERN = "replicated-lb"


def assert_quiet(cluster: LocalCluster) -> None:
    """Nodes write nothing to stderr unless something is wrong (tracebacks, warnings)."""
    noisy = {name: node.stderr() for name, node in cluster.nodes.items() if node.stderr()}
    assert not noisy, f"nodes wrote to stderr: {noisy}"
    bad = {name: node.bad_lines for name, node in cluster.nodes.items() if node.bad_lines}
    assert not bad, f"non-telemetry lines on stdout: {bad}"


class Answer:
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def get(
    address: str, path: str = "/", *, caller: str | None = None, timeout: float = 2.0
) -> Answer:
    """GET http://address/path (no proxy, one connection); ``caller`` sets X-Distlab-From.
    Raises OSError (http.client errors included) when there is no answer."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("GET", path, headers={FROM_HEADER: caller} if caller else {})
        response = connection.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()


def put_back(cluster: LocalCluster, names: Iterable[str]) -> None:
    """After a test: every node running again (a paused one resumed, a stopped one
    restarted at its address) and its runtime faults cleared."""
    for name in names:
        node = cluster.nodes[name]
        if node.running:
            os.kill(node.pid, signal.SIGCONT)  # harmless unless the test paused it
        else:
            cluster.restart(name)
        cluster.ctl(name, {"op": "clear"})


def configure(cluster: LocalCluster, name: str, **settings: Any) -> None:
    """Change a node's live settings; the node must accept them."""
    reply = cluster.ctl(name, {"op": "config", "set": settings})
    assert reply["ok"], reply


def fault(cluster: LocalCluster, name: str, **message: Any) -> None:
    """Set a runtime fault on a node (``kind="latency", ms=200``); it must be accepted."""
    reply = cluster.ctl(name, {"op": "fault", **message})
    assert reply["ok"], reply


# The fields each line type carries besides v, ts, node and type (TELEMETRY.md).
REQUIRED = {
    "request": {"src", "dst", "method", "route", "status", "ms"},
    "call": {"src", "dst", "method", "route", "status", "ms", "error"},
    "state": {"event"},
    "gauges": {"values"},
    "table": {"table", "rows"},
    "traffic": {"rps", "sent", "skipped", "ok", "errors", "failed", "in_flight", "served_by"},
}


def assert_well_formed(cluster: LocalCluster, names: Iterable[str] | None = None) -> None:
    """Every line each node wrote is telemetry of schema 1, with its type's fields, about
    itself, recent, and a call without an answer says why."""
    now = time.time()
    for name in names if names is not None else cluster.nodes:
        events = cluster.events(name)
        assert events and not cluster.nodes[name].bad_lines, name
        for event in events:
            assert event["v"] == 1 and event["node"] == name, event
            assert isinstance(event["ts"], float) and now - 300 < event["ts"] <= now + 1
            assert REQUIRED.get(event["type"], set()) <= set(event), event
            if event["type"] == "request":
                assert event["dst"] == name, event
            if event["type"] == "call":
                assert event["src"] == name, event
                assert (event["status"] == 0) == (event["error"] is not None), event


def served(calls: Iterable[Mapping[str, Any]], route: str = "/") -> Counter[str]:
    """How many successful calls on ``route`` went to each destination."""
    return Counter(c["dst"] for c in calls if c["route"] == route and c["status"] == 200)
