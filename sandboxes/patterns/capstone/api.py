"""An API replica of the capstone: the place where most of the course's patterns meet.

    GET  /product/{key}   read the product from its shard, add recommendations
    POST /order/{key}     write the order to its shard, publish an event to the queue

For every request, in order::

    wait for one of params.workers workers     (a small pool: a slow call holds one)
    the store: the shard that owns the key     (crc32(key) % 4: shard-a … shard-d)
        through a circuit breaker              (one per shard, one for the whole store, or off)
        with up to `attempts` attempts         (retries on a 5xx or no answer, jittered backoff)
    reads: the recommender, through the bulkhead (at most params.recommender_slots calls at
        once, else none at all) and its own breaker; a failure is not an error: the page
        shows no recommendations (the fallback)
    orders: publish {"order", "key"} to the queue and answer without waiting for consumers

Every request is a span (a trace begins here: W3C ``traceparent``, as in chapter 9), each
call it makes is a child span whose id goes to the callee in ``traceparent``, and every
request writes one log line. Spans and lines are shipped to ``collector`` twice a second
from a bounded buffer, beside the requests and never in their way.

A breaker opens when ``params.breaker_failures`` calls through it failed within
``params.breaker_window_s``; after ``params.breaker_open_s`` it lets one trial call through
(half-open): success closes it, failure opens it again.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
import zlib
from collections import Counter, deque
from typing import Any

from sandboxes.runtime.node import CallError, Node, Request, Response

SCOPES = ("per shard", "one for the store", "off")


class Breaker:
    """Closed → open after too many failures; open → half-open after a cool-down; one
    trial call decides: closed again, or open again."""

    def __init__(self, node: Node, name: str) -> None:
        self.node, self.name = node, name
        self.state, self.since, self.trial = "closed", 0.0, False
        self.failures: deque[float] = deque()  # when each recent failure happened

    def move(self, state: str, **why: Any) -> None:
        self.state, self.since, self.trial = state, time.monotonic(), False
        self.failures.clear()
        event = {"open": "breaker_opened", "half-open": "breaker_half_open"}
        self.node.event(event.get(state, "breaker_closed"), target=self.name, **why)

    def allow(self) -> bool:
        if self.state == "open" and time.monotonic() - self.since >= self.node.param(
            "breaker_open_s", 5
        ):
            self.move("half-open")
        if self.state == "open" or (self.state == "half-open" and self.trial):
            return False  # fail fast: no call
        self.trial = self.state == "half-open"  # the one trial call is on its way
        return True

    def record(self, ok: bool) -> None:
        if self.state == "half-open" and ok:
            self.move("closed")
        elif self.state == "half-open":
            self.move("open", reason="the trial call failed")
        elif self.state == "closed" and not ok:
            now = time.monotonic()
            self.failures.append(now)
            while self.failures[0] < now - self.node.param("breaker_window_s", 5):
                self.failures.popleft()
            if len(self.failures) >= self.node.param("breaker_failures", 10):
                window = self.node.param("breaker_window_s", 5)
                self.move("open", reason=f"{len(self.failures)} failures within {window} s")


def setup(node: Node) -> None:
    shards = sorted(p.name for p in node.peers_with_role("shard"))
    workers = asyncio.Semaphore(int(node.param("workers", 4)))
    slots = int(node.param("recommender_slots", 2))
    node.setting("bulkhead", True)
    node.setting("attempts", 1, minimum=1, maximum=3)

    breakers: dict[str, Breaker] = {}

    def new_breakers(scope: str = "", previous: str = "") -> None:
        breakers.clear()
        breakers.update({s: Breaker(node, s) for s in shards})
        breakers["store"] = Breaker(node, "store")

    new_breakers()
    node.setting("breakers", "per shard", choices=list(SCOPES), on_change=new_breakers)
    recommender = Breaker(node, "recommender")
    recommending = 0  # calls in the recommender's compartment
    counts: Counter[str] = Counter()  # since the last second
    busy = waiting = 0
    buffer: list[dict[str, Any]] = []  # spans and log lines waiting to be shipped

    def keep(item: dict[str, Any]) -> None:
        buffer.append(item)
        del buffer[: -int(node.param("buffer_max", 2000))]  # the collector is away: drop the oldest

    def span(trace: str, span_id: str, parent: str | None, name: str, started: float,
             ok: bool) -> None:  # fmt: skip
        keep({"span": {"trace_id": trace, "span_id": span_id, "parent_id": parent,
                       "service": node.name, "name": name, "kind": "client" if parent else "server",
                       "start": round(started, 4), "ms": round((time.time() - started) * 1000, 1),
                       "status": "ok" if ok else "error", "sampling": "head 100%"}})  # fmt: skip

    def log(level: str, message: str, trace: str, span_id: str) -> None:
        keep({"log": {"ts": round(time.time(), 3), "service": node.name, "level": level,
                      "msg": message, "trace_id": trace, "span_id": span_id}})  # fmt: skip

    async def traced_call(trace: str, parent: str, peer: str, path: str, **kw: Any) -> Any:
        """A call as a child span; the callee gets the trace in ``traceparent``."""
        span_id, started = secrets.token_hex(8), time.time()
        headers = {"traceparent": f"00-{trace}-{span_id}-01"}
        try:
            reply = await node.call(peer, path, headers=headers, **kw)
        except CallError as exc:
            span(trace, span_id, parent, f"call {peer}", started, False)
            return exc.reason
        span(trace, span_id, parent, f"call {peer}", started, reply.status < 500)
        return reply

    async def store(trace: str, parent: str, key: str, method: str, body: Any = None) -> Any:
        """The shard that owns ``key``, through its breaker, with retries: a reply, or
        a reason for the failure."""
        shard = shards[zlib.crc32(key.encode()) % len(shards)]
        scope = node.config["breakers"]
        breaker = None if scope == "off" else breakers[shard if scope == "per shard" else "store"]
        outcome: Any = "no attempt"
        for attempt in range(node.config["attempts"]):
            if attempt:
                counts["retries_per_s"] += 1
                await asyncio.sleep(random.uniform(0, 0.05 * 2 ** (attempt - 1)))
            if breaker and not breaker.allow():
                return f"breaker open ({breaker.name})"
            outcome = await traced_call(
                trace, parent, shard, f"/kv/{key}", method=method, json=body, route="/kv/{key}",
                timeout=float(node.param("shard_timeout_s", 0.5)),
            )  # fmt: skip
            ok = not isinstance(outcome, str) and outcome.status < 500
            if breaker:
                breaker.record(ok)
            if ok:
                return outcome
        return outcome if isinstance(outcome, str) else f"{shard}: status {outcome.status}"

    async def recommendations(trace: str, parent: str) -> tuple[list[Any], str]:
        """Recommendations, or none and why (the fallback): never an error for the user."""
        nonlocal recommending
        if node.config["bulkhead"] and recommending >= slots:
            return [], "bulkhead full"
        if not recommender.allow():
            return [], "breaker open"
        recommending += 1
        try:
            reply = await traced_call(
                trace, parent, "recommender", "/",
                timeout=float(node.param("recommender_timeout_s", 1.0)),
            )  # fmt: skip
        finally:
            recommending -= 1
        ok = not isinstance(reply, str) and reply.status < 500
        recommender.record(ok)
        return (reply.json().get("items", []), "") if ok else ([], "recommender failed")

    async def serve(request: Request, name: str) -> Response:
        """One request, as a span: wait for a worker, then do the work of ``name``."""
        nonlocal busy, waiting
        trace, span_id, started = secrets.token_hex(16), secrets.token_hex(8), time.time()
        key = request.match_info["key"]
        waiting += 1
        async with workers:
            waiting, busy = waiting - 1, busy + 1
            try:
                if name == "product":
                    reply = await store(trace, span_id, key, "GET")
                    items, fallback = await recommendations(trace, span_id)
                    if fallback:
                        counts["fallbacks_per_s"] += 1
                    answer = {"product": key, "recommendations": items, "fallback": fallback}
                else:
                    body = await request.json() if request.can_read_body else {}
                    reply = await store(trace, span_id, key, "PUT", {"value": body.get("value")})
                    if not isinstance(reply, str):
                        order = {"order": body.get("value"), "key": key, "trace_id": trace}
                        published = await traced_call(
                            trace, span_id, "queue", "/publish", method="POST", json=order,
                            timeout=float(node.param("queue_timeout_s", 0.5)),
                        )  # fmt: skip
                        if isinstance(published, str) or published.status != 200:
                            reply = "queue: " + (published if isinstance(published, str) else
                                                 f"status {published.status}")  # fmt: skip
                    answer = {"order": body.get("value"), "key": key, "queued": True}
            finally:
                busy -= 1
        failed = isinstance(reply, str)
        span(trace, span_id, None, f"{request.method} /{name}/{{key}}", started, not failed)
        told = {"traceresponse": f"00-{trace}-{span_id}-01"}  # the caller learns the trace
        if failed:
            log("error", f"{name} {key} failed: {reply}", trace, span_id)
            return node.json({"error": reply, "trace_id": trace}, status=503, headers=told)
        log("info", f"{name} {key} done", trace, span_id)
        return node.json({**answer, "trace_id": trace}, headers=told)

    @node.route("/product/{key}")
    async def product(request: Request) -> Response:
        return await serve(request, "product")

    @node.route("/order/{key}", method="POST")
    async def order(request: Request) -> Response:
        return await serve(request, "order")

    @node.task
    async def ship() -> None:
        """Twice a second: what the buffer holds to the collector; kept when that fails."""
        while True:
            await asyncio.sleep(0.5)
            if not buffer:
                continue
            batch = buffer[:500]
            del buffer[:500]
            try:
                reply = await node.call("collector", "/ingest", method="POST", timeout=1,
                                        json={"items": batch})  # fmt: skip
                shipped = reply.status == 200
            except CallError:
                shipped = False
            if not shipped:  # back in front, within the bound
                buffer[:0] = batch
                del buffer[: -int(node.param("buffer_max", 2000))]

    @node.task
    async def report() -> None:
        await asyncio.sleep(0.5)  # once the runtime has said "started", which resets states
        while True:
            node.set_state("recommender_breaker", recommender.state)
            scope = node.config["breakers"]
            shown = [] if scope == "off" else shards if scope == "per shard" else ["store"]
            rows = [{"breaker": b, "state": breakers[b].state,
                     "failures": len(breakers[b].failures)} for b in shown]  # fmt: skip
            rows.append({"breaker": "recommender", "state": recommender.state,
                         "failures": len(recommender.failures)})  # fmt: skip
            node.table("breakers", rows)
            node.gauge("open_breakers", sum(r["state"] != "closed" for r in rows))
            node.gauge("workers_busy", busy)
            node.gauge("waiting", waiting)
            for name in ("retries_per_s", "fallbacks_per_s"):
                node.gauge(name, counts[name])
            counts.clear()
            await asyncio.sleep(1.0)
