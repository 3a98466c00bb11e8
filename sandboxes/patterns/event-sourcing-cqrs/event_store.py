"""The event store: an append-only log of events, the one source of truth.

Events are grouped into streams, one per account (``acct-1``): each event has a
``version`` in its stream (1, 2, 3…) and a global ``position`` in the whole log. Nothing
is ever updated or deleted. It answers three questions:

- ``GET /streams/{stream}?after_version=N``: one stream's events, for the command
  service to rebuild an account's current state;
- ``GET /events?after=P&limit=L``: the next events of the whole log, in order, for the
  projectors that follow it (with the ``head``, the position of the last event);
- ``GET /head``: just the head, for a projector that is not consuming to see how far
  behind it is.

And one write, the only one: ``POST /streams/{stream}`` with
``{"expected_version": N, "events": [{"type", "data"}, …]}``. This is *optimistic
concurrency*: if the stream is no longer at version ``N`` (another writer appended since
this one read it), the append is refused with 409 and nothing is written; the writer
reloads and decides again. ``"expected_version": null`` appends whatever the version, as
a store without that check would.

The log lives in memory, in one Python list: enough for a sandbox, and the shape of the
code is the same with a real store behind it.
"""

from __future__ import annotations

import time
from typing import Any

from sandboxes.runtime.node import Node, Request, Response

MAX_READ = 100  # events per read of the log, at most


def setup(node: Node) -> None:
    log: list[dict[str, Any]] = []  # every event, in order: log[p - 1] has position p
    streams: dict[str, list[dict[str, Any]]] = {}  # stream → its events, in version order

    def observe() -> None:
        node.gauge("head", len(log))
        rows = [{"stream": s, "version": len(e)} for s, e in sorted(streams.items())]
        node.table("streams", rows[:50])

    observe()

    @node.route("/streams/{stream}", method="POST")
    async def append(request: Request) -> Response:
        stream = request.match_info["stream"]
        body = await request.json()
        expected, new_events = body.get("expected_version"), body["events"]
        events = streams.setdefault(stream, [])
        # The one check that protects every business rule: refuse if someone appended
        # since the writer read the stream.
        if expected is not None and len(events) != expected:
            return node.json(
                {"error": "wrong expected version", "expected": expected, "version": len(events)},
                status=409,
            )
        for new in new_events:
            event = {
                "position": len(log) + 1,
                "stream": stream,
                "version": len(events) + 1,
                "type": new["type"],
                "data": new["data"],
                "ts": round(time.time(), 3),
            }
            log.append(event)
            events.append(event)
        observe()
        return node.json({"position": len(log), "version": len(events)})

    @node.route("/streams/{stream}")
    async def read_stream(request: Request) -> Response:
        after = int(request.query.get("after_version", 0))
        events = streams.get(request.match_info["stream"], [])
        return node.json({"version": len(events), "events": events[after:]})

    @node.route("/events")
    async def read_log(request: Request) -> Response:
        after = int(request.query.get("after", 0))
        limit = min(int(request.query.get("limit", MAX_READ)), MAX_READ)
        return node.json({"head": len(log), "events": log[after : after + limit]})

    @node.route("/head")
    async def head(request: Request) -> Response:
        return node.json({"head": len(log)})

    @node.status
    def status() -> dict[str, Any]:
        return {"head": len(log), "streams": {s: len(e) for s, e in streams.items()}}
