"""The queue: orders wait here until a consumer takes them.

The API publishes an event for every order (``POST /publish``) and answers its user at
once; the consumers take events when they are ready (``GET /take?max=N``, a long poll: it
answers as soon as there is something, or empty after ``wait_s``). So a slow or stopped
consumer costs the users nothing: the queue just gets deeper, and the depth is the gauge
to watch. It answers 503 once ``params.max_depth`` events wait (back-pressure).

Simpler than chapter 7's broker: one queue, and a taken event is gone (no acknowledgement,
no visibility timeout), so a consumer killed while holding events loses them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from sandboxes.runtime.node import Node, Request, Response


def setup(node: Node) -> None:
    max_depth = int(node.param("max_depth", 10000))
    waiting: deque[tuple[float, Any]] = deque()  # (when published, event)

    @node.route("/publish", method="POST")
    async def publish(request: Request) -> Response:
        if len(waiting) >= max_depth:
            return node.json({"error": "queue full"}, status=503)
        waiting.append((time.time(), await request.json()))
        return node.json({"queued": True, "depth": len(waiting)})

    @node.route("/take")
    async def take(request: Request) -> Response:
        most = int(request.query.get("max", "1"))
        deadline = time.monotonic() + float(request.query.get("wait_s", "1"))
        while not waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # a long poll, checked every 50 ms
        events = [waiting.popleft()[1] for _ in range(min(most, len(waiting)))]
        return node.json({"events": events})

    @node.task
    async def report() -> None:
        while True:
            node.gauge("depth", len(waiting))
            node.gauge("oldest_s", round(time.time() - waiting[0][0], 1) if waiting else 0)
            await asyncio.sleep(0.5)
