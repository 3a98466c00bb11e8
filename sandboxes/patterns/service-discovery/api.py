"""An instance of the ``api`` service: it answers requests, and keeps itself registered.

Self-registration, as in the chapter: every ``heartbeat_s`` (2 s) it tells the registry
"I am alive, at this address" (``POST /heartbeat``). The first heartbeat registers it;
the following ones renew its lease. A heartbeat that gets no answer within a second
counts as failed; the next one is sent on schedule anyway.

A crash sends nothing, of course: the registry only notices when the lease runs out. A
clean stop (scaling down) deregisters at once with ``DELETE /heartbeat``.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

from sandboxes.runtime.node import CallError, Node, Request, Response

REGISTRY = "registry"


def setup(node: Node) -> None:
    interval_s = float(node.param("heartbeat_s", 2))
    work_s = float(node.param("api_work_ms", 5)) / 1000
    address = next(p.address for p in node.peers if p.name == node.name)

    @node.route("/")
    async def hello(request: Request) -> Response:
        await asyncio.sleep(work_s)  # stands in for real work
        return node.json({"instance": node.name, "id": request.query.get("id")})

    @node.task
    async def heartbeat() -> None:
        beat = {"instance": node.name, "address": address}
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while True:
                # A failed heartbeat: the call event says why; the lease is still running.
                with suppress(CallError):
                    await node.call(REGISTRY, "/heartbeat", method="POST", params=beat, timeout=1.0)
                next_at = max(next_at + interval_s, loop.time())  # on schedule, every 2 s
                await asyncio.sleep(next_at - loop.time())
        except asyncio.CancelledError:  # a clean stop: say goodbye, do not wait long
            with suppress(CallError):
                goodbye = {"instance": node.name}
                await node.call(
                    REGISTRY, "/heartbeat", method="DELETE", params=goodbye, timeout=0.5
                )
            raise
