"""A replica: one of several identical servers behind the load balancer.

It answers ``GET /`` after a simulated amount of work and says who it is, so every
response shows which replica served it. It keeps no state between requests: that is what
makes replicas interchangeable, and what lets the balancer send a request to any of them.
"""

from __future__ import annotations

import asyncio

from sandboxes.runtime.node import Node, Request, Response


def setup(node: Node) -> None:
    # How long one request takes, in milliseconds (pattern.yaml sets the default).
    node.setting(
        "work_ms", node.env_float("DISTLAB_REPLICA_WORK_MS", 5.0), minimum=0, maximum=10_000
    )

    @node.route("/")
    async def serve(request: Request) -> Response:
        work_ms = node.config["work_ms"]
        await asyncio.sleep(work_ms / 1000)  # stands in for real work
        return node.json({"replica": node.name, "work_ms": work_ms})
