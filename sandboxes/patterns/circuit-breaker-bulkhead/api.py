"""The API node: one pool of workers, two dependencies, and the chapter's four patterns.

    GET /fast   calls `fast`   (user profiles, say: about 5 ms)
    GET /flaky  calls `flaky`  (recommendations, say: about 20 ms, until you break it)

Every request goes the chapter's way ("Putting them together")::

    wait for a free worker            one shared pool of 16: a request queues until one is free
    bulkheads on: take a slot of the dependency's compartment, or answer 503 at once
    for each attempt (1, or up to 3 with retries):
        breaker on (flaky only) and not allowing calls: answer at once with the fallback
        call the dependency, waiting at most the timeout (1 s)
        an answer that is not a 5xx: relay it
        failed: retry if attempts are left (and the budget allows), after a jittered backoff
    out of attempts: the dependency's 5xx, or 504 (it timed out), or 502 (no connection)

Nothing here notices that a caller hung up: a request that waited 3 s for a worker is still
served, although the client gave up after 2 s, and the queue keeps growing. That is the
cascade of the chapter.

Live settings (pattern.yaml's controls): ``bulkheads``, ``fast_slots``, ``flaky_slots``,
``breaker`` and its thresholds (``failure_rate_pct``, ``window_s``, ``min_calls``,
``open_s``, ``trial_calls``), ``retries`` and ``timeout_s``. What the lab shows: the
breaker's state (a badge on api), the pool and the compartments (gauges), and per second
the calls a bulkhead rejected, the ones the breaker answered with its fallback, and retries.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque

from sandboxes.runtime.node import CallError, Node, Request, Response

RETRY_MODES = ("off", "3 attempts", "3 with 10% budget")
PER_SECOND = ("bulkhead_rejected_per_s", "fallbacks_per_s", "retries_per_s")


def backoff_with_full_jitter(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0, 1, ...): a random point between
    zero and a ceiling that doubles with each attempt (the chapter's retry.py)."""
    return random.uniform(0, min(cap, base * 2**attempt))


class RetryBudget:
    """Retries may add at most ``ratio`` extra calls per request, on average. A small
    bucket of tokens: each request adds ``ratio``, each retry spends 1 (as in the chapter)."""

    def __init__(self, ratio: float = 0.1, max_tokens: float = 10) -> None:
        self.ratio, self.max_tokens, self.tokens = ratio, max_tokens, max_tokens

    def on_request(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def allow_retry(self) -> bool:
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Bulkhead:
    """At most ``limit`` calls in flight to one dependency; a call that finds its
    compartment full is rejected at once, never queued. (One event loop runs everything,
    so a counter is as good as a semaphore, and the limit can change live.)"""

    def __init__(self) -> None:
        self.in_use = 0

    def enter(self, limit: int) -> bool:
        if self.in_use >= limit:
            return False
        self.in_use += 1
        return True

    def leave(self) -> None:
        self.in_use -= 1


class CircuitBreaker:
    """The chapter's breaker (breaker.py), its thresholds read live from the settings.
    Opens when at least ``failure_rate_pct`` of the calls that ended in the last
    ``window_s`` seconds failed, and there were at least ``min_calls``. After ``open_s`` it
    lets ``trial_calls`` calls through: all succeed -> closed, one fails -> open again.
    Switched off, it lets everything through and counts nothing."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.move("off", announce=False)  # announced once the node runs

    def move(self, state: str, announce: bool = True) -> None:
        self.state, self.since = state, time.monotonic()
        self.results: deque[tuple[float, bool]] = deque()  # (time, ok) of recent calls
        self.trials = self.trial_successes = 0
        if announce:
            self.node.set_state("breaker", state)  # a badge on api, a line in the event log

    def allow(self) -> float | None:
        """May a call go to the dependency now? A ticket (the current state's start) to
        hand back to ``record``, or None: answer with the fallback."""
        settings = self.node.config
        if self.state == "open" and time.monotonic() - self.since >= settings["open_s"]:
            self.move("half-open")  # the cool-down is over: try a few calls
        if self.state == "open":
            return None
        if self.state == "half-open":
            if self.trials >= settings["trial_calls"]:
                return None  # enough trials are on their way
            self.trials += 1
        return self.since

    def record(self, ticket: float, ok: bool) -> None:
        """How a call it allowed ended. A call that started in an earlier state (before
        the breaker opened, say) no longer counts."""
        if self.state == "off" or ticket != self.since:
            return
        settings = self.node.config
        if self.state == "half-open":
            if not ok:
                self.open("a trial call failed")
            else:
                self.trial_successes += 1
                if self.trial_successes >= settings["trial_calls"]:
                    self.move("closed")
            return
        now = time.monotonic()
        self.results.append((now, ok))
        while self.results[0][0] <= now - settings["window_s"]:
            self.results.popleft()
        calls = len(self.results)
        failures = sum(1 for _, good in self.results if not good)
        too_many = failures * 100 >= settings["failure_rate_pct"] * calls
        if calls >= settings["min_calls"] and too_many:
            self.open(f"{failures} of the last {calls} calls failed")

    def open(self, reason: str) -> None:
        self.node.event("breaker_opened", target="flaky", reason=reason)
        self.move("open")


def setup(node: Node) -> None:
    workers = int(node.param("workers", 16))
    node.setting("bulkheads", False)
    node.setting("fast_slots", int(node.param("fast_slots", 8)), minimum=1, maximum=workers)
    node.setting("flaky_slots", int(node.param("flaky_slots", 6)), minimum=1, maximum=workers)
    node.setting("failure_rate_pct", 50, minimum=10, maximum=100)
    node.setting("window_s", 5.0, minimum=1, maximum=30)
    node.setting("min_calls", 10, minimum=1, maximum=100)
    node.setting("open_s", 5.0, minimum=1, maximum=60)
    node.setting("trial_calls", 3, minimum=1, maximum=10)
    node.setting("retries", "off", choices=list(RETRY_MODES))
    node.setting("timeout_s", float(node.param("timeout_s", 1.0)), minimum=0.1, maximum=5)

    pool = asyncio.Semaphore(workers)  # the one shared pool of workers
    busy = waiting = 0
    bulkheads = {"fast": Bulkhead(), "flaky": Bulkhead()}
    budgets = {"fast": RetryBudget(0.1), "flaky": RetryBudget(0.1)}  # one per dependency
    breaker = CircuitBreaker(node)  # on calls to flaky only
    counts: Counter[str] = Counter()  # since the last second

    def switch_breaker(on: bool, previous: bool) -> None:
        breaker.move("closed" if on else "off")  # switched on, it starts closed and empty

    node.setting("breaker", False, on_change=switch_breaker)

    def show_levels() -> None:
        node.gauge("workers_busy", busy)
        node.gauge("waiting", waiting)
        node.gauge("fast_slots_used", bulkheads["fast"].in_use)
        node.gauge("flaky_slots_used", bulkheads["flaky"].in_use)

    async def call_with_retries(dependency: str) -> Response:
        """Attempts (through the breaker, for flaky), retries with backoff and jitter."""
        mode = node.config["retries"]
        attempts = 1 if mode == "off" else 3
        budget = budgets[dependency]
        budget.on_request()
        failure: Response | None = None
        for attempt in range(attempts):
            if attempt:
                if mode == "3 with 10% budget" and not budget.allow_retry():
                    break  # the budget is spent: give up now
                counts["retries_per_s"] += 1
                await asyncio.sleep(backoff_with_full_jitter(attempt - 1))
            ticket = breaker.allow() if dependency == "flaky" else 0.0
            if ticket is None:  # open: fail fast, with the fallback (no recommendations)
                counts["fallbacks_per_s"] += 1
                return node.json({"items": [], "fallback": "breaker open"})
            try:
                reply = await node.call(dependency, "/", timeout=node.config["timeout_s"])
            except CallError as exc:
                status = 504 if exc.reason == "timeout" else 502
                failure = node.json({"error": f"{dependency}: {exc.reason}"}, status=status)
            else:
                if reply.status < 500:
                    if dependency == "flaky":
                        breaker.record(ticket, ok=True)
                    return node.relay(reply)
                failure = node.relay(reply)
            if dependency == "flaky":
                breaker.record(ticket, ok=False)
        assert failure is not None
        return failure

    async def serve(dependency: str) -> Response:
        nonlocal busy, waiting
        waiting += 1
        show_levels()
        async with pool:  # wait for a free worker
            waiting -= 1
            busy += 1
            show_levels()
            try:
                if not node.config["bulkheads"]:
                    return await call_with_retries(dependency)
                compartment = bulkheads[dependency]
                if not compartment.enter(node.config[f"{dependency}_slots"]):
                    counts["bulkhead_rejected_per_s"] += 1
                    return node.json({"error": f"bulkhead for {dependency} full"}, status=503)
                show_levels()
                try:
                    return await call_with_retries(dependency)  # retries keep their slot
                finally:
                    compartment.leave()
            finally:
                busy -= 1
                show_levels()

    # shield(): the work goes on when the caller hangs up. Some aiohttp versions cancel a
    # handler then; api, like many real servers, should not notice, so it never does.
    @node.route("/fast")
    async def fast(request: Request) -> Response:
        return await asyncio.shield(serve("fast"))

    @node.route("/flaky")
    async def flaky(request: Request) -> Response:
        return await asyncio.shield(serve("flaky"))

    @node.task
    async def report() -> None:
        show_levels()
        await asyncio.sleep(0.5)  # once the runtime has said "started", which resets states
        node.set_state("breaker", breaker.state)
        while True:  # zeros at first, then the counts of each second
            for name in PER_SECOND:
                node.gauge(name, counts[name])
            counts.clear()
            await asyncio.sleep(1.0)
