"""The client: users of the ``api`` service, with client-side discovery and balancing.

It sends ``GET /`` open-loop at ``rps`` requests a second (20), each with a 1-second
timeout, round robin over the instances in *its own copy* of the instance list. How that
copy is kept up to date is the live setting ``mode``, the chapter's two clients:

- ``watch``: the registry tells it about every change. It reads the list once, then keeps
  a long poll open (``GET /watch?index=N``, answered when the list changes) and applies
  each new list as soon as it arrives, whatever it holds, even an empty one.
- ``dns-cache``: it resolves ``_api._tcp.sandbox.internal`` (SRV, with the A records) by
  asking the ``dns`` node over UDP, real DNS, and keeps the answer for the records' TTL
  (10 s). Only when the TTL has run out does it ask again. An empty answer is cached too,
  for the time the zone's SOA record allows (negative caching).

When its source cannot be reached (the registry down, no DNS answer), it keeps the list it
has and tries again: a stale list beats no list. It does not remember which instances just
failed: a request to a dead instance fails until the list drops it. When the list is
empty there is nobody to call, and the request fails at once (recorded as a call to
``api`` that got no answer, ``error: no-instance``).

The runtime calls peers by name (so its telemetry and faults see every call): the client
calls the instance the list names. The list also holds each instance's address (from the
registry, or from the SRV and A records), which is what a real client would connect to.

It reports the table ``client_view`` (its list: instance, address, requests and failures
in the last 5 s), the gauges ``instances_known`` and ``list_age_s`` (how old its
knowledge may be: 0 while a watch is open, else the seconds since its source last
answered), the state ``discovery`` (its mode), and the event ``list_updated``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import random
import time
from collections import Counter, deque
from pathlib import Path
from types import ModuleType
from typing import Any

from sandboxes.runtime.node import CallError, Node, split_address

REGISTRY, DNS, SERVICE = "registry", "dns", "api"


def dns_wire() -> ModuleType:
    """dns.py beside this file: the DNS server, whose wire-format helpers we reuse."""
    path = Path(__file__).with_name("dns.py")
    spec = importlib.util.spec_from_file_location("service_discovery_dns", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wire = dns_wire()


class Reply(asyncio.DatagramProtocol):
    """Waits for one UDP datagram (or the ICMP error that says nobody listens)."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


class InstanceList:
    """The client's copy of the list, where it came from, and when."""

    def __init__(self) -> None:
        self.instances: list[dict[str, str]] = []  # [{"instance", "address"}]
        self.heard_at = time.monotonic()  # when its source last answered
        self.expires_at = 0.0  # dns-cache: when the cached answer's TTL runs out
        self.watching = False  # watch: a long poll is open and the registry answers
        self.index: int | None = None  # watch: the registry's version of the list
        self.waiting: asyncio.Future[Any] | None = None  # watch: the open long poll


def setup(node: Node) -> None:
    profile = node.env_json("DISTLAB_TRAFFIC", {})
    timeout_s = float(profile.get("timeout_s", 1.0))
    max_in_flight = int(profile.get("max_in_flight", 200))
    wait_s = float(node.param("watch_wait_s", 5))
    known = InstanceList()

    def mode_changed(new: str, previous: str) -> None:
        node.set_state("discovery", new)
        known.index, known.expires_at, known.watching = None, 0.0, False  # start afresh
        if known.waiting is not None:
            known.waiting.cancel()  # a long poll of the registry still open

    node.setting("rps", float(profile.get("rps", 20)), minimum=0, maximum=100)
    node.setting("mode", "watch", choices=["watch", "dns-cache"], on_change=mode_changed)
    node.set_state("discovery", node.config["mode"])

    def apply(instances: list[dict[str, str]], source: str) -> None:
        """Take a new list as it is (an empty one included) and say what changed."""
        before = {i["instance"] for i in known.instances}
        after = {i["instance"] for i in instances}
        known.instances = sorted(instances, key=lambda i: i["instance"])
        if before != after:
            change = [f"+{n}" for n in sorted(after - before)]
            change += [f"-{n}" for n in sorted(before - after)]
            names = ", ".join(sorted(after)) or "nobody"
            node.event("list_updated", source=source, instances=names,
                       change=" ".join(change), count=len(after))  # fmt: skip

    # ---- mode "watch": a long poll on the registry ---------------------------------------

    async def watch_once() -> None:
        params = {"index": str(known.index)} if known.index is not None else {}
        call = asyncio.ensure_future(
            node.call(REGISTRY, "/watch", params=params, timeout=wait_s + 3)
        )
        known.waiting = call  # a switch of mode cancels it (mode_changed)
        try:
            reply = await call
        except CallError:
            reply = None
        except asyncio.CancelledError:
            if call.cancelled() and node.config["mode"] != "watch":
                return  # switched to dns-cache while waiting: stop watching
            raise
        if reply is None or reply.status != 200:
            known.watching = False  # keep the list we have, try again shortly
            await asyncio.sleep(0.5)
            return
        body = reply.json()
        known.watching, known.heard_at = True, time.monotonic()
        if body["index"] != known.index:
            known.index = body["index"]
            apply(body["instances"], "registry")

    # ---- mode "dns-cache": ask DNS, keep the answer for its TTL ---------------------------

    async def resolve() -> tuple[list[dict[str, str]], int]:
        """Ask the dns node for the SRV records; return (instances, seconds to cache)."""
        started = time.monotonic()
        route = f"/SRV/{wire.SERVICE}"
        status, error = 0, None
        try:
            if node.faults.cuts(DNS):
                raise ConnectionError("partitioned")
            host, port = split_address(next(p.address for p in node.peers if p.name == DNS))
            query_id = random.randrange(65536)
            loop = asyncio.get_running_loop()
            transport, reply = await loop.create_datagram_endpoint(Reply, remote_addr=(host, port))
            try:
                transport.sendto(wire.build_query(query_id, wire.SERVICE, wire.TYPE_SRV))
                message = wire.parse_message(await asyncio.wait_for(reply.answer, 1.0))
            finally:
                transport.close()
            status = wire.STATUS.get(message["rcode"], 503)
        except TimeoutError:
            error = "timeout"
        except ConnectionRefusedError:
            error = "connect"
        except ConnectionError:
            error = "partitioned"
        except (OSError, ValueError, StopIteration):
            error = "error"
        ms = round((time.monotonic() - started) * 1000, 2)
        node.emit("call", src=node.name, dst=DNS, method="DNS", route=route, status=status,
                  ms=ms, error=error)  # fmt: skip
        if error is not None or status != 200:
            raise CallError(DNS, error or f"rcode {message['rcode']}")
        # SRV: (priority, weight, port, target); the A records give each target's address.
        addresses = {r.name: r.data for r in message["additional"] if r.type == wire.TYPE_A}
        instances = []
        for srv in message["answers"]:
            _priority, _weight, port, target = srv.data
            host = addresses.get(target, target)
            instances.append({"instance": target.split(".")[0], "address": f"{host}:{port}"})
        if message["answers"]:
            ttl = min(r.ttl for r in message["answers"])
        else:  # no data: cache the absence for the SOA's minimum (RFC 2308)
            ttl = min([r.data[-1] for r in message["authority"]] or [0])
        return instances, ttl

    async def refresh_cache() -> None:
        if time.monotonic() < known.expires_at:
            await asyncio.sleep(0.1)  # still fresh: use the cached answer
            return
        try:
            instances, ttl = await resolve()
        except CallError:
            await asyncio.sleep(1.0)  # keep the stale answer; ask again in a second
            return
        if node.config["mode"] != "dns-cache":
            return
        now = time.monotonic()
        known.heard_at, known.expires_at = now, now + ttl
        apply(instances, "DNS")

    @node.task
    async def discover() -> None:
        while True:
            if node.config["mode"] == "watch":
                await watch_once()
            else:
                await refresh_cache()

    # ---- the users' requests, round robin over the list ----------------------------------

    turn = itertools.count()
    in_flight: set[asyncio.Task[None]] = set()
    counts: Counter[str] = Counter()  # for the traffic summary
    recent: deque[tuple[float, str, bool]] = deque()  # (when, instance, failed): last 5 s

    async def one_request(request_id: int) -> None:
        routable = {p.name for p in node.peers}  # the sandbox routes by name (see above)
        candidates = [i for i in known.instances if i["instance"] in routable]
        if not candidates:  # nobody to call: fails at once, as "no healthy upstream"
            node.emit("call", src=node.name, dst=SERVICE, method="GET", route="/", status=0,
                      ms=0.0, error="no-instance")  # fmt: skip
            counts["failed"] += 1
            return
        instance = candidates[next(turn) % len(candidates)]["instance"]
        failed = True
        try:
            reply = await node.call(
                instance, "/", params={"id": str(request_id)}, timeout=timeout_s
            )
            failed = reply.status >= 400
            counts["errors" if failed else "ok"] += 1
        except CallError:
            counts["failed"] += 1
        recent.append((time.monotonic(), instance, failed))

    @node.task
    async def drive() -> None:
        while not known.instances:  # users arrive once there is someone to call
            await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        ids = itertools.count(1)
        try:
            while True:
                rps = node.config["rps"]
                if rps <= 0:
                    await asyncio.sleep(0.1)
                    next_at = loop.time()
                    continue
                next_at = max(next_at + 1 / rps, loop.time() - 1.0)  # at most 1 s to catch up
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                if len(in_flight) >= max_in_flight:
                    counts["skipped"] += 1
                    continue
                counts["sent"] += 1
                task = loop.create_task(one_request(next(ids)))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            for task in in_flight:
                task.cancel()

    def view_rows(now: float) -> list[dict[str, Any]]:
        while recent and recent[0][0] < now - 5:
            recent.popleft()
        sent = Counter(name for _, name, _ in recent)
        failed = Counter(name for _, name, bad in recent if bad)
        return [
            {
                "instance": i["instance"],
                "address": i["address"],
                "requests_5s": sent[i["instance"]],
                "failed_5s": failed[i["instance"]],
            }
            for i in known.instances
        ]

    @node.task
    async def report() -> None:
        summary_at = time.monotonic() + 1
        while True:
            now = time.monotonic()
            fresh = node.config["mode"] == "watch" and known.watching
            node.gauge("list_age_s", 0.0 if fresh else round(now - known.heard_at, 1))
            node.gauge("instances_known", len(known.instances))
            node.gauge("in_flight", len(in_flight))
            node.table("client_view", view_rows(now))
            if now >= summary_at:
                summary_at = now + 1
                totals = {k: counts[k] for k in ("sent", "skipped", "ok", "errors", "failed")}
                node.emit("traffic", rps=node.config["rps"], in_flight=len(in_flight),
                          served_by={}, **totals)  # fmt: skip
                counts.clear()
            await asyncio.sleep(0.25)
