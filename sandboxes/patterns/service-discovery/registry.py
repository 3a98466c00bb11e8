"""The registry: service name → live instances, each holding a lease renewed by heartbeats.

The chapter's ``Registry`` class, served over HTTP:

- ``POST /heartbeat?instance=api-2&address=10.77.0.5:8080``: an instance
  says it is alive. An unknown instance is registered; a known one has its lease renewed
  until ``lease_ttl_s`` from now. There is no separate "register" call: the first
  heartbeat registers (self-registration).
- ``DELETE /heartbeat?instance=api-2``: a clean shutdown deregisters at once, instead of
  leaving the lease to run out.
- ``GET /watch?index=N``: the instance list. With ``index`` (the list's version the
  caller already has) it is a *long poll*: the answer waits until the list changes, or
  at most ``watch_wait_s`` (then it says "no change"). That is how a client is "told about
  every change" without asking over and over.

Every 0.25 s the registry forgets the instances whose lease has run out: a crashed
instance never says goodbye, its heartbeats just stop. The registry cannot tell a dead
instance from a frozen one, or from one whose heartbeats do not get through.

Two details a real registry has too:

- A heartbeat counts only if its answer reaches the instance. One that arrives after the
  instance gave up waiting (a slow network) is ignored, so both sides agree it failed.
- The list lives in memory. A restarted registry starts empty and waits one and a half
  heartbeat intervals before it answers ``/watch`` (503 meanwhile), so the live
  instances have re-registered before it tells anyone who exists: an empty list from a
  registry that just started would be a lie.

It reports its lease table (instance, address, seconds since the last heartbeat, seconds
until the lease runs out), the gauge ``leases``, and the events ``registered``,
``lease_expired`` and ``deregistered``.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from typing import Any

from sandboxes.runtime.node import Node, Request, Response


class Registry:
    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.deadlines: dict[str, float] = {}  # instance → when its lease runs out
        self.addresses: dict[str, str] = {}  # instance → host:port
        self.last_heartbeat: dict[str, float] = {}
        self.index = 0  # the list's version: +1 on every change
        self.changed = asyncio.Event()  # set (and replaced) on every change

    def heartbeat(self, instance: str, address: str, now: float) -> bool:
        """Renew (or create) the lease; True when the instance is new."""
        is_new = instance not in self.deadlines
        self.deadlines[instance] = now + self.lease_s
        self.last_heartbeat[instance] = now
        if is_new or self.addresses.get(instance) != address:
            self.addresses[instance] = address
            self.notify()
        return is_new

    def remove(self, instance: str) -> None:
        for table in (self.deadlines, self.addresses, self.last_heartbeat):
            table.pop(instance, None)
        self.notify()

    def expire(self, now: float) -> list[str]:
        dead = [i for i, deadline in self.deadlines.items() if deadline <= now]
        for instance in dead:
            self.remove(instance)
        return dead

    def instances(self) -> list[dict[str, str]]:
        return [{"instance": i, "address": self.addresses[i]} for i in sorted(self.deadlines)]

    def notify(self) -> None:
        self.index += 1
        self.changed.set()  # wakes every waiting watch
        self.changed = asyncio.Event()


def setup(node: Node) -> None:
    lease_s = float(node.param("lease_ttl_s", 6))
    wait_s = float(node.param("watch_wait_s", 5))
    warm_up_s = 1.5 * float(node.param("heartbeat_s", 2))
    started = time.monotonic()
    registry = Registry(lease_s)

    def caller_gone(request: Request) -> bool:
        return request.transport is None or request.transport.is_closing()

    @node.route("/heartbeat", method="POST")
    async def heartbeat(request: Request) -> Response:
        instance, address = request.query["instance"], request.query["address"]
        if caller_gone(request):  # it gave up waiting: for it, this heartbeat failed
            return node.json({"error": "too late"}, status=408)
        if registry.heartbeat(instance, address, time.monotonic()):
            node.event("registered", target=instance, address=address)
        return node.json({"instance": instance, "lease_s": lease_s})

    @node.route("/heartbeat", method="DELETE")
    async def deregister(request: Request) -> Response:
        instance = request.query.get("instance", "")
        if instance in registry.deadlines:
            registry.remove(instance)
            node.event("deregistered", target=instance)
        return node.json({"instance": instance, "registered": False})

    @node.route("/watch")
    async def watch(request: Request) -> Response:
        if time.monotonic() - started < warm_up_s:
            return node.json({"error": "just started: waiting for heartbeats"}, status=503)
        known = request.query.get("index")
        if known is not None and int(known) == registry.index:
            # A long poll: wait for the next change, or say "no change" after wait_s.
            with suppress(TimeoutError):
                await asyncio.wait_for(registry.changed.wait(), wait_s)
        return node.json({"index": registry.index, "instances": registry.instances()})

    def lease_rows(now: float) -> list[dict[str, Any]]:
        return [
            {
                "instance": instance,
                "address": registry.addresses[instance],
                "last_heartbeat": f"{now - registry.last_heartbeat[instance]:.1f} s ago",
                "expires_in": f"{registry.deadlines[instance] - now:.1f} s",
            }
            for instance in sorted(registry.deadlines)
        ]

    @node.task
    async def expire_leases() -> None:
        while True:
            now = time.monotonic()
            for instance in registry.expire(now):
                node.event("lease_expired", target=instance, lease_s=lease_s)
            node.gauge("leases", len(registry.deadlines))
            node.table("lease_table", lease_rows(now))
            await asyncio.sleep(0.25)

    @node.status
    def status() -> dict[str, Any]:
        return {"index": registry.index, "leases": lease_rows(time.monotonic())}
