"""The traffic generator: a crowd of users sending requests into the sandbox.

Shared by every pattern (a pattern's spec names it as ``program: traffic.py`` and gives it
a ``traffic`` profile). It is open-loop, like real users: the next request leaves on
schedule whether or not the earlier ones were answered (up to ``max_in_flight`` at once;
beyond that requests are skipped and counted). Its ``call`` events are the client-side
record: the latency and status each user saw. Once a second it also emits a ``traffic``
event summing up what it sent and who served it (the ``X-Distlab-Served-By`` header), and
it reports how many requests it has in flight as the built-in gauge ``in_flight``. Two
settings change live: the rate, ``rps``, and the keys' ``popularity`` (uniform, or skewed:
a few hot keys).

Each kind of request in the mix names its ``target`` (default: the profile's), its method
and path; ``{key}`` in a path becomes a key drawn from the key space, and a PUT or POST
carries ``{"key": …, "value": …}``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter

from sandboxes.runtime.node import CallError, Node


def setup(node: Node) -> None:
    profile = node.env_json("DISTLAB_TRAFFIC", {})  # the traffic profile from pattern.yaml
    target = profile.get("target", "")
    timeout_s = float(profile.get("timeout_s", 2.0))
    max_in_flight = int(profile.get("max_in_flight", 200))
    node.setting("rps", float(profile.get("rps", 20)), minimum=0, maximum=200)

    # Request mix: which paths, how often. Keys: which keys requests ask for, how often.
    mix = profile.get("mix") or [{"method": "GET", "path": "/", "weight": 1}]
    mix_weights = [m.get("weight", 1) for m in mix]
    key_spec = profile.get("keys") or {}
    keys = [f"k{i}" for i in range(int(key_spec.get("count", 100)))]
    zipf_s = float(key_spec.get("s", 1.1))
    key_cumulative: list[float] = []

    def weigh_keys(popularity: str, previous: str | None = None) -> None:
        """Skewed: a few hot keys and a long tail of cold ones (Zipf: the key of rank r is
        asked for in proportion to 1 / r**s). Uniform: every key alike."""
        if popularity == "skewed":
            weights = [1 / (rank + 1) ** zipf_s for rank in range(len(keys))]
        else:
            weights = [1.0] * len(keys)
        key_cumulative[:] = itertools.accumulate(weights)

    skewed = key_spec.get("distribution") == "zipf"
    node.setting(
        "popularity", "skewed" if skewed else "uniform", choices=["uniform", "skewed"],
        on_change=weigh_keys,
    )  # fmt: skip
    weigh_keys(node.config["popularity"])

    request_ids = itertools.count(1)
    in_flight: set[asyncio.Task[None]] = set()
    counts: Counter[str] = Counter()  # since the last summary
    served_by: Counter[str] = Counter()

    async def one_request() -> None:
        kind = random.choices(mix, mix_weights)[0]
        key = random.choices(keys, cum_weights=key_cumulative)[0]
        request_id = str(next(request_ids))
        params = {"id": request_id, "key": key}  # the outline's request.id
        method = kind.get("method", "GET")
        body = {"key": key, "value": f"v{request_id}"} if method in ("PUT", "POST") else None
        try:
            reply = await node.call(
                kind.get("target") or target,
                kind["path"].replace("{key}", key),
                method=method,
                params=params,
                json=body,
                timeout=timeout_s,
                route=kind["path"],
            )
        except CallError:
            counts["failed"] += 1  # no answer: the call event says why
            return
        counts["ok" if reply.status < 400 else "errors"] += 1
        served_by[reply.headers.get("X-Distlab-Served-By", "none")] += 1  # none: the lb itself

    async def wait_until_open() -> None:
        """Users arrive once the service is up: wait for every target's health check."""
        for name in sorted({k.get("target") or target for k in mix}):
            while True:
                try:
                    if (await node.call(name, "/health", timeout=1.0)).status == 200:
                        break
                except CallError:
                    pass
                await asyncio.sleep(0.2)

    @node.task
    async def drive() -> None:
        await wait_until_open()
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while True:
                rps = node.config["rps"]
                if rps <= 0:
                    await asyncio.sleep(0.1)
                    next_at = loop.time()
                    continue
                # The schedule: one request every 1/rps seconds. If we fell behind (a busy
                # machine), catch up at most one second's worth, never a huge burst.
                next_at = max(next_at + 1 / rps, loop.time() - 1.0)
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                if len(in_flight) >= max_in_flight:
                    counts["skipped"] += 1  # too many unanswered: this user gives up
                    continue
                counts["sent"] += 1
                task = loop.create_task(one_request())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:  # shutting down: abandon what is in flight
            for task in in_flight:
                task.cancel()

    @node.task
    async def summarise() -> None:
        while True:
            await asyncio.sleep(1.0)
            node.gauge("in_flight", len(in_flight))
            if counts or in_flight:
                totals = {k: counts[k] for k in ("sent", "skipped", "ok", "errors", "failed")}
                node.emit(
                    "traffic",
                    rps=node.config["rps"],
                    in_flight=len(in_flight),
                    served_by=dict(served_by),
                    **totals,
                )
                counts.clear()
                served_by.clear()
