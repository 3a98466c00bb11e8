"""Helpers for the sandbox tests: HTTP on loopback, counting, a quiet-node check."""

from __future__ import annotations

import http.client
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


def served(calls: Iterable[Mapping[str, Any]], route: str = "/") -> Counter[str]:
    """How many successful calls on ``route`` went to each destination."""
    return Counter(c["dst"] for c in calls if c["route"] == route and c["status"] == 200)
