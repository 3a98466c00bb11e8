"""The app: the service the sidecar stands beside.

It answers ``GET /`` after a little simulated work, and that is all it does: it has no
timeouts, no retries and no metrics of its own. Whatever it lacks, the sidecar adds.

In a real pod the app would listen on ``localhost`` only, so that the sidecar, sharing its
network namespace, is the only way in. Here every node has its own address, so the app
plays that part itself: it answers only its sidecar (the caller's ``X-Distlab-From``).
"""

from __future__ import annotations

import asyncio

from sandboxes.runtime.node import FROM_HEADER, Node, Request, Response


def setup(node: Node) -> None:
    work_s = float(node.param("app_work_ms", 5)) / 1000  # pattern.yaml, `params`

    @node.route("/")
    async def hello(request: Request) -> Response:
        caller = request.headers.get(FROM_HEADER)
        if caller not in {p.name for p in node.peers_with_role("sidecar")}:
            return node.json({"error": "only reachable through the sidecar"}, status=403)
        await asyncio.sleep(work_s)  # stands in for real work
        return node.json({"app": node.name, "id": request.query.get("id")})
