"""The producer: publishes order messages to the broker's ``orders`` topic at ``rps``.

Open-loop, like a shop's checkout: an order leaves on schedule whether or not earlier
publishes were answered (at most ``max_in_flight`` unanswered at once). Each message carries
its order id, the idempotency key the workers deduplicate by. ``malformed_pct`` of them
are malformed (no valid amount): no worker can process those.

A publish the broker refuses (503: a subscription is full) is an error the producer sees:
back-pressure. Once a second it writes a ``traffic`` summary, as the shared traffic
generator does.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter

from sandboxes.runtime.node import CallError, Node

BROKER = "broker"


def setup(node: Node) -> None:
    profile = node.env_json("DISTLAB_TRAFFIC", {})  # the traffic profile from pattern.yaml
    timeout_s = float(profile.get("timeout_s", 2.0))
    max_in_flight = int(profile.get("max_in_flight", 200))
    node.setting("rps", float(profile.get("rps", 10)), minimum=0, maximum=100)
    node.setting("malformed_pct", 0.0, minimum=0, maximum=100)
    orders = itertools.count(1)
    in_flight: set[asyncio.Task[None]] = set()
    counts: Counter[str] = Counter()

    async def publish(order_id: int) -> None:
        message: dict[str, object] = {"order": f"o-{order_id}", "amount": random.randint(5, 500)}
        if random.uniform(0, 100) < node.config["malformed_pct"]:
            message["amount"] = "twelve"  # a poison message
        try:
            reply = await node.call(
                BROKER, "/topics/orders", method="POST", json=message, timeout=timeout_s
            )
        except CallError:
            counts["failed"] += 1
            return
        counts["ok" if reply.status < 400 else "errors"] += 1

    @node.task
    async def drive() -> None:
        while True:  # publish once the broker answers
            try:
                if (await node.call(BROKER, "/health", timeout=1.0)).status == 200:
                    break
            except CallError:
                pass
            await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            rate = node.config["rps"]
            if rate <= 0:
                await asyncio.sleep(0.1)
                next_at = loop.time()
                continue
            next_at = max(next_at + 1 / rate, loop.time() - 1.0)  # catch up a second at most
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if len(in_flight) >= max_in_flight:
                counts["skipped"] += 1
                continue
            counts["sent"] += 1
            task = loop.create_task(publish(next(orders)))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    @node.task
    async def summarise() -> None:
        while True:
            await asyncio.sleep(1.0)
            node.gauge("in_flight", len(in_flight))
            node.emit(
                "traffic",
                rps=node.config["rps"],
                in_flight=len(in_flight),
                served_by={BROKER: counts["ok"] + counts["errors"]},
                **{k: counts[k] for k in ("sent", "skipped", "ok", "errors", "failed")},
            )
            counts.clear()
