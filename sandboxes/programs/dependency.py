"""A dependency of the API: ``fast`` (user profiles, say) or ``flaky`` (recommendations).

It answers ``GET /`` after ``DISTLAB_WORK_MS`` milliseconds (5 for fast, 20 for flaky) and
nothing more. It has no resiliency of its own: what makes ``flaky`` slow, failing, dead or
frozen are the faults you inject (latency, errors, kill, pause).
"""

from __future__ import annotations

import asyncio

from sandboxes.runtime.node import Node, Request, Response


def setup(node: Node) -> None:
    work_s = node.env_float("DISTLAB_WORK_MS", 5.0) / 1000

    @node.route("/")
    async def answer(request: Request) -> Response:
        await asyncio.sleep(work_s)  # the work it does for each call
        return node.json({"from": node.name, "items": ["book", "lamp"]})
