"""A worker: one of several competing consumers of the ``work`` subscription.

It pulls one order at a time from ``broker`` and processes it::

    receive an order                      (a long poll: waits up to 1 s for one)
    ack = "before processing": acknowledge now         -> at-most-once
    charge the order: record its effect in the orders table, by order id
        dedupe on: only if this order has no effect yet (an idempotent consumer)
    spend work_ms on the rest (packing, say)
    mark the order done
    ack = "after processing": acknowledge now          -> at-least-once

A malformed order cannot be processed: the worker gives it back at once (a nack), and the
broker dead-letters it after its maximum receives.

If the worker dies (or is merely slower than the visibility timeout) after the charge and
before the acknowledgement, the broker redelivers the order to another worker: it is
charged twice, unless the workers deduplicate by order id. Acknowledging before processing
avoids that, and loses the order instead.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from sandboxes.runtime.node import CallError, Node

BROKER = "broker"
ACK_MODES = ("after processing", "before processing")


def setup(node: Node) -> None:
    node.setting("work_ms", float(node.param("work_ms", 100)), minimum=0, maximum=10000)
    node.setting("ack", ACK_MODES[0], choices=list(ACK_MODES))
    node.setting("dedupe", True)
    counts: Counter[str] = Counter()

    async def broker(path: str, route: str, receipt: str | None = None) -> int:
        """A POST to the broker; its status (0: no answer)."""
        body = {"receipts": [receipt]} if receipt else None
        try:
            reply = await node.call(BROKER, path, method="POST", json=body, route=route)
        except CallError:
            return 0
        return reply.status

    async def process(message: dict[str, object]) -> None:
        order, receipt = message["body"], str(message["receipt"])
        order_id = order.get("order") if isinstance(order, dict) else None
        if not isinstance(order, dict) or not isinstance(order.get("amount"), int):
            counts["malformed"] += 1  # cannot be processed: give it back at once
            await broker("/subs/work/nack", "/subs/work/nack", receipt)
            return
        acked_first = node.config["ack"] == "before processing"
        if acked_first:
            await broker("/subs/work/ack", "/subs/work/ack", receipt)
        # The effect, by order id. With dedupe the check and the record are one step.
        query = "?only_if_new=1" if node.config["dedupe"] else ""
        try:
            reply = await node.call(
                BROKER,
                f"/orders/{order_id}/effect{query}",
                method="POST",
                route="/orders/{order}/effect",
            )
            effect = reply.json() if reply.status == 200 else {}
        except CallError:
            effect = {}
        if effect.get("applied") is False:  # already charged once: skip the work
            node.event("duplicate_skipped", order=order_id, receives=message["receives"])
            counts["duplicates"] += 1
        else:
            if effect.get("times", 1) > 1:
                node.event("duplicate_effect", order=order_id, times=effect["times"])
                counts["duplicates"] += 1
            await asyncio.sleep(node.config["work_ms"] / 1000)  # the rest of the work
            await broker(f"/orders/{order_id}/done", "/orders/{order}/done")
            counts["completed"] += 1
        acked = acked_first or await broker("/subs/work/ack", "/subs/work/ack", receipt)
        if acked == 410:
            counts["late_acks"] += 1  # too slow: it was redelivered meanwhile

    @node.task
    async def consume() -> None:
        while True:
            try:
                reply = await node.call(
                    BROKER, "/subs/work/receive", params={"max": "1", "wait_s": "1"}, timeout=3
                )
            except CallError:
                await asyncio.sleep(0.5)  # the broker does not answer: try again soon
                continue
            if reply.status != 200:
                await asyncio.sleep(0.5)
                continue
            for message in reply.json()["messages"]:
                node.gauge("holding", 1)
                await process(message)
                node.gauge("holding", 0)

    @node.task
    async def report() -> None:
        while True:
            for name in ("completed", "duplicates", "malformed", "late_acks"):
                node.gauge(name, counts[name])
            await asyncio.sleep(1.0)
