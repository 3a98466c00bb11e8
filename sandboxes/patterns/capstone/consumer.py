"""A consumer: takes order events from the queue and does the slow work after the fact
(emails, stock, invoices), ``params.consume_ms`` per event, one at a time.

Nobody waits for it: when consumers stop, users see nothing, the queue just grows; when
they come back they drain it at their own pace (about 1000 / consume_ms events a second
each, minus what keeps arriving). Gauge ``consumed_per_s``.
"""

from __future__ import annotations

import asyncio

from sandboxes.runtime.node import CallError, Node


def setup(node: Node) -> None:
    work_s = float(node.param("consume_ms", 100)) / 1000
    consumed = 0

    @node.task
    async def consume() -> None:
        nonlocal consumed
        while True:
            try:
                reply = await node.call("queue", "/take", params={"max": "5", "wait_s": "1"},
                                        timeout=3)  # fmt: skip
                events = reply.json().get("events", []) if reply.status == 200 else None
            except CallError:
                events = None
            if events is None:
                await asyncio.sleep(0.5)  # the queue is away or failing: try again soon
                continue
            for _ in events:
                await asyncio.sleep(work_s)  # stands in for the real work
                consumed += 1

    @node.task
    async def report() -> None:
        nonlocal consumed
        while True:
            await asyncio.sleep(1.0)
            node.gauge("consumed_per_s", consumed)
            consumed = 0
