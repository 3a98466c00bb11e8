"""Node states as the supervisor last saw them, so that a page showing a sandbox does not
ask the engine (a Docker API call) on every request.

The supervisor asks the engine about every running sandbox once a second anyway; it
stores the answer here (``status_store``). The sandbox panel reads it (``node_statuses``)
while it is younger than ``FRESH_S`` and asks the engine itself otherwise (no supervisor,
or the cache away). Whatever changes a node's state through the engine (a kill, pause or
partition, their reverts, scaling) forgets the stored answer (``status_forget``), so the
next page after a learner's action asks the engine again rather than show the old state.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from django.core.cache import cache

from apps.labs.engine.base import Engine, NodeStatus

FRESH_S = 3.0


def status_cache_key(sandbox_id: str) -> str:
    return f"labs:status:{sandbox_id}"


def status_store(sandbox_id: str, statuses: list[NodeStatus]) -> None:
    cache.set(
        status_cache_key(sandbox_id),
        {"ts": time.time(), "nodes": [asdict(s) for s in statuses]},
        timeout=int(FRESH_S * 4),
    )


def status_forget(sandbox_id: str) -> None:
    cache.delete(status_cache_key(sandbox_id))


def _stored(sandbox_id: str) -> list[NodeStatus] | None:
    stored: Any = cache.get(status_cache_key(sandbox_id))
    if not isinstance(stored, dict) or time.time() - float(stored.get("ts", 0)) > FRESH_S:
        return None
    try:
        return [NodeStatus(**node) for node in stored["nodes"]]
    except (KeyError, TypeError):
        return None


def node_statuses(engine: Engine, sandbox_id: str) -> list[NodeStatus]:
    """The sandbox's nodes: as the supervisor saw them within ``FRESH_S``, else the
    engine's answer now."""
    stored = _stored(sandbox_id)
    return stored if stored is not None else engine.status(sandbox_id)
