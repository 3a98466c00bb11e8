"""The broker: one topic, ``orders``, with two subscriptions, all in memory.

    POST /topics/orders              publish: a copy of the message goes to EVERY subscription
    GET  /subs/{sub}/receive         take up to ``max`` visible messages (waits up to ``wait_s``)
    POST /subs/{sub}/ack             done with these receipts: the messages are deleted
    POST /subs/{sub}/nack            give these back at once (the consumer could not process them)
    POST /orders/{order}/effect      the orders table: record an order's effect (see below)
    POST /orders/{order}/done        ...and that its processing finished

A subscription is a queue (the chapter's work queue, SQS-style):

- A message received is *in flight*: invisible to other consumers for the visibility
  timeout. Acknowledged in time, it is deleted. Not acknowledged in time (its consumer died,
  or is just slow), it becomes visible again and the next receive redelivers it.
- Each receive counts. A message that comes back after ``max_receives`` receives goes to
  the subscription's dead-letter queue instead: a poison message stops looping.
- ``max_depth`` bounds every subscription: when one is full, a publish is refused (503),
  and the back-pressure reaches the producer.

``work`` (competing workers) and ``audit`` (the auditor) are independent: each has its own
copy, depth and consumers, so a slow auditor backs up ``audit`` only.

The orders table stands in for the database the workers share (it lives here only to keep
the sandbox small). A worker records the effect of an order (charging it, say) by order id;
with ``only_if_new`` the record is made only when the order has no effect yet, in one step,
as a real consumer stores its idempotency key in the same transaction as the effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter, deque

from sandboxes.runtime.node import Node, Request, Response

SUBSCRIPTIONS = ("work", "audit")
EVENTS_PER_S = 3  # at most so many events of a kind a second; the rest are counted in gauges


class Message:
    def __init__(self, message_id: int, body: dict[str, object], published: float) -> None:
        self.id, self.body, self.published = message_id, body, published
        self.receives = 0  # how many times it was received
        self.last_consumer = ""  # who received it last (and why it came back)
        self.last_received = 0.0


class Subscription:
    """One queue of the topic: its own copy of every message."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready: deque[Message] = deque()  # visible, oldest first
        self.in_flight: dict[str, tuple[Message, float]] = {}  # receipt -> (message, deadline)
        self.dead: deque[Message] = deque()  # the dead-letter queue
        self.arrived = asyncio.Event()  # set when messages arrive (for long polls)
        self.totals: Counter[str] = Counter()  # delivered, acked, redelivered, dead-lettered
        self.consumers: dict[str, Counter[str]] = {}  # per consumer: in flight, acked

    def wake(self) -> None:
        self.arrived.set()
        self.arrived = asyncio.Event()


def setup(node: Node) -> None:
    node.setting("visibility_s", float(node.param("visibility_s", 5)), minimum=1, maximum=60)
    node.setting("max_receives", int(node.param("max_receives", 3)), minimum=1, maximum=20)
    node.setting("max_depth", int(node.param("max_depth", 10000)), minimum=10, maximum=100000)

    subs = {name: Subscription(name) for name in SUBSCRIPTIONS}
    ids = itertools.count(1)
    effects: Counter[str] = Counter()  # the orders table: effects per order id
    done: set[str] = set()  # orders whose processing finished
    said: Counter[str] = Counter()  # events announced this second, by kind
    held: Counter[str] = Counter()  # ...and the ones held back

    def announce(kind: str, **fields: object) -> None:
        if said[kind] < EVENTS_PER_S:
            said[kind] += 1
            node.event(kind, **fields)
        else:
            held[kind] += 1

    def give_back(sub: Subscription, message: Message, why: str) -> None:
        """A delivery failed (expired, or refused by its consumer): again, or dead-letter."""
        if message.receives >= node.config["max_receives"]:
            sub.dead.append(message)
            sub.totals["dead_lettered"] += 1
            announce(
                "dead_lettered",
                subscription=sub.name,
                order=message.body.get("order", "?"),
                receives=message.receives,
            )
        else:
            message.last_consumer += f" ({why})"
            sub.ready.appendleft(message)  # first in line again
            sub.wake()

    # ---- publishing -------------------------------------------------------------------

    @node.route("/topics/orders", method="POST")
    async def publish(request: Request) -> Response:
        body = await request.json()
        limit = node.config["max_depth"]
        for sub in subs.values():
            if len(sub.ready) >= limit:
                return node.json({"error": f"{sub.name} is full ({limit} messages)"}, status=503)
        message_id = next(ids)
        for sub in subs.values():  # fan-out: every subscription gets its own copy
            sub.ready.append(Message(message_id, body, time.time()))
            sub.wake()
        return node.json({"id": message_id})

    # ---- consuming --------------------------------------------------------------------

    def subscription(request: Request) -> Subscription | None:
        return subs.get(request.match_info["sub"])

    @node.route("/subs/{sub}/receive")
    async def receive(request: Request) -> Response:
        sub = subscription(request)
        if sub is None:
            return node.json({"error": "no such subscription"}, status=404)
        consumer = request.headers.get("X-Distlab-From", "?")
        wanted = max(1, min(50, int(request.query.get("max", "1"))))
        wait_s = max(0.0, min(5.0, float(request.query.get("wait_s", "1"))))
        if not sub.ready:  # a long poll: wait for a message, or answer empty
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.arrived.wait(), wait_s)
        now = time.time()
        out = []
        while sub.ready and len(out) < wanted:
            message = sub.ready.popleft()
            message.receives += 1
            if message.receives > 1:
                sub.totals["redelivered"] += 1
                announce(
                    "redelivered",
                    subscription=sub.name,
                    order=message.body.get("order", "?"),
                    consumer=consumer,
                    previous=message.last_consumer,
                    receives=message.receives,
                    after_s=round(now - message.last_received, 2),
                )
            message.last_consumer, message.last_received = consumer, now
            receipt = f"{message.id}.{message.receives}"
            sub.in_flight[receipt] = (message, now + node.config["visibility_s"])
            sub.totals["delivered"] += 1
            sub.consumers.setdefault(consumer, Counter())["in_flight"] += 1
            out.append({"receipt": receipt, "receives": message.receives, "body": message.body})
        return node.json({"messages": out})

    async def settle(request: Request, acked: bool) -> Response:
        sub = subscription(request)
        if sub is None:
            return node.json({"error": "no such subscription"}, status=404)
        receipts = (await request.json()).get("receipts", [])
        late = 0
        for receipt in receipts:
            held_message = sub.in_flight.pop(str(receipt), None)
            if held_message is None:
                late += 1  # its visibility timeout passed: it is someone else's now
                continue
            message = held_message[0]
            sub.consumers.setdefault(message.last_consumer, Counter())["in_flight"] -= 1
            if acked:
                sub.totals["acked"] += 1
                sub.consumers[message.last_consumer]["acked"] += 1
            else:
                give_back(sub, message, "refused")
        if late:
            return node.json({"error": f"{late} receipt(s) expired", "late": late}, status=410)
        return node.json({"settled": len(receipts)})

    @node.route("/subs/{sub}/ack", method="POST")
    async def ack(request: Request) -> Response:
        return await settle(request, acked=True)

    @node.route("/subs/{sub}/nack", method="POST")
    async def nack(request: Request) -> Response:
        return await settle(request, acked=False)

    # ---- the orders table (the workers' shared database) ----------------------------------

    @node.route("/orders/{order}/effect", method="POST")
    async def effect(request: Request) -> Response:
        order = request.match_info["order"]
        if request.query.get("only_if_new") == "1" and effects[order]:
            return node.json({"order": order, "applied": False, "times": effects[order]})
        effects[order] += 1
        return node.json({"order": order, "applied": True, "times": effects[order]})

    @node.route("/orders/{order}/done", method="POST")
    async def finished(request: Request) -> Response:
        done.add(request.match_info["order"])
        return node.json({"order": request.match_info["order"]})

    # ---- time passing, and what the lab shows ------------------------------------------

    @node.task
    async def expire() -> None:
        """Every 0.1 s: deliveries whose visibility timeout passed come back (or die)."""
        while True:
            await asyncio.sleep(0.1)
            now = time.time()
            for sub in subs.values():
                for receipt, (message, deadline) in list(sub.in_flight.items()):
                    if deadline <= now:
                        del sub.in_flight[receipt]
                        sub.consumers.setdefault(message.last_consumer, Counter())["in_flight"] -= 1
                        give_back(sub, message, "not acknowledged in time")

    @node.task
    async def report() -> None:
        while True:
            now = time.time()
            work, audit = subs["work"], subs["audit"]
            node.gauge("work_depth", len(work.ready))
            node.gauge("work_in_flight", len(work.in_flight))
            node.gauge("audit_depth", len(audit.ready))
            node.gauge("audit_in_flight", len(audit.in_flight))
            node.gauge("dead_letter_depth", len(work.dead) + len(audit.dead))
            node.gauge(
                "oldest_work_s", round(now - work.ready[0].published, 1) if work.ready else 0
            )
            node.gauge("redelivered", work.totals["redelivered"] + audit.totals["redelivered"])
            node.gauge(
                "dead_lettered", work.totals["dead_lettered"] + audit.totals["dead_lettered"]
            )
            node.gauge("orders_completed", len(done))
            node.gauge("duplicate_effects", sum(n - 1 for n in effects.values() if n > 1))
            node.table(
                "subscriptions",
                [
                    {
                        "subscription": sub.name,
                        "depth": len(sub.ready),
                        "in_flight": len(sub.in_flight),
                        "lag": len(sub.ready) + len(sub.in_flight),
                        "oldest_s": round(now - sub.ready[0].published, 1) if sub.ready else 0,
                        "redelivered": sub.totals["redelivered"],
                        "dead_letter": len(sub.dead),
                    }
                    for sub in subs.values()
                ],
            )
            node.table(
                "consumers",
                [
                    {
                        "consumer": name,
                        "subscription": sub.name,
                        "in_flight": counts["in_flight"],
                        "acked": counts["acked"],
                    }
                    for sub in subs.values()
                    for name, counts in sorted(sub.consumers.items())
                ][:50],
            )
            for kind, count in held.items():
                if count:
                    node.event("held_back", kind=kind, count=count)
            said.clear()
            held.clear()
            await asyncio.sleep(1.0)
