"""The auditor: the one consumer of the ``audit`` subscription, which gets a copy of every
order published. It pulls up to 20 at a time, records each order id, and acknowledges the
batch. It sees every order, whatever the workers do with theirs: a redelivered copy is
recorded once (the gauge ``audited`` counts distinct orders).
"""

from __future__ import annotations

import asyncio
import contextlib

from sandboxes.runtime.node import CallError, Node

BROKER = "broker"


def setup(node: Node) -> None:
    seen: set[str] = set()

    @node.task
    async def consume() -> None:
        while True:
            try:
                reply = await node.call(
                    BROKER, "/subs/audit/receive", params={"max": "20", "wait_s": "1"}, timeout=3
                )
            except CallError:
                await asyncio.sleep(0.5)  # cut off from the broker: try again soon
                continue
            if reply.status != 200:
                await asyncio.sleep(0.5)
                continue
            messages = reply.json()["messages"]
            if not messages:
                continue
            for message in messages:
                body = message["body"]
                seen.add(str(body.get("order")) if isinstance(body, dict) else "?")
            receipts = [m["receipt"] for m in messages]
            with contextlib.suppress(CallError):  # if not acknowledged, they come back
                await node.call(
                    BROKER, "/subs/audit/ack", method="POST", json={"receipts": receipts}
                )

    @node.task
    async def report() -> None:
        while True:
            node.gauge("audited", len(seen))
            await asyncio.sleep(1.0)
