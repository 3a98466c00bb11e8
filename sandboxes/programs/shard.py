"""A shard: one part of a key-value store, held in memory.

It stores whatever keys the router sends it and knows nothing about the other shards or
about the shard function: which keys a shard holds is decided entirely by the router. So
when the router's map changes (a shard added or removed, another shard function), keys
start arriving here that were written to some other shard, and they are simply missing:
this small store never copies data between shards. A real one would copy the moved keys
first (see the chapter's "Resharding").

- ``GET /kv/{key}``: ``{"key", "value", "found"}``; a key never written here is not an
  error, it is ``found: false`` (``value`` null).
- ``PUT /kv/{key}`` with ``{"value": …}``: stores it.
- ``GET /scan``: this shard's part of a query over every key (here: how many it holds).

Shared by sharded-kv and capstone. It reports how many keys it holds as the gauge ``keys``,
and the key requests it got in the last second as ``requests_per_s``. A killed and restarted shard
comes back empty, like any in-memory store.
"""

from __future__ import annotations

import asyncio

from sandboxes.runtime.node import Node, Request, Response


def setup(node: Node) -> None:
    work_s = float(node.param("shard_work_ms", 2.0)) / 1000  # stands in for real work
    store: dict[str, object] = {}
    served = 0  # key requests since the last second
    node.gauge("keys", 0)

    @node.route("/kv/{key}")
    async def read(request: Request) -> Response:
        nonlocal served
        served += 1
        key = request.match_info["key"]
        await asyncio.sleep(work_s)
        found = key in store
        return node.json({"key": key, "value": store.get(key), "found": found})

    @node.route("/kv/{key}", method="PUT")
    async def write(request: Request) -> Response:
        nonlocal served
        served += 1
        key = request.match_info["key"]
        body = await request.json() if request.can_read_body else {}
        await asyncio.sleep(work_s)
        store[key] = body.get("value") if isinstance(body, dict) else body
        node.gauge("keys", len(store))
        return node.json({"key": key, "stored": True})

    @node.route("/scan")
    async def scan(request: Request) -> Response:
        await asyncio.sleep(work_s)
        return node.json({"shard": node.name, "keys": len(store)})

    @node.task
    async def per_second() -> None:
        nonlocal served
        while True:
            await asyncio.sleep(1.0)
            node.gauge("requests_per_s", served)
            served = 0

    @node.status
    def status() -> dict[str, object]:
        return {"keys": len(store)}
