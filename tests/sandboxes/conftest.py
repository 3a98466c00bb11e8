"""Nodes of the replicated-lb pattern run as real subprocesses on 127.0.0.1 ports.

Set DISTLAB_NODE_PYTHON to run the nodes with another interpreter (for example one with
Debian's aiohttp 3.8) while the tests themselves run here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from apps.labs.patterns import Pattern, load_pattern
from sandboxes.runtime.testing import LocalCluster
from tests.sandboxes.helpers import PATTERN


@pytest.fixture(scope="session")
def pattern() -> Pattern:
    return load_pattern(PATTERN)


@pytest.fixture
def start_nodes(pattern: Pattern) -> Iterator[Callable[..., LocalCluster]]:
    """Start some of the pattern's nodes (by name) for one test; stopped afterwards."""
    clusters: list[LocalCluster] = []

    def start(*names: str) -> LocalCluster:
        cluster = LocalCluster(PATTERN, [pattern.node(name) for name in names])
        clusters.append(cluster)
        cluster.start()
        cluster.wait_started()
        return cluster

    yield start
    for cluster in clusters:
        cluster.close()
