"""The collector: every service ships its spans and log lines here, and this is where
traces are put together and logs searched (the lab's trace list and log view read what it
reports).

Spans arrive in batches, from several services, in any order. A trace is a tree of spans
sharing a trace id; the collector holds each trace until no span has come for
``params.trace_wait_s``, then calls it complete. That wait is also what tail sampling
needs: only a whole trace shows whether anything in it failed or was slow. Traces whose
spans say ``sampling: tail`` are kept if one of their spans failed or the root took over
``params.tail_slow_ms``, and otherwise one in a hundred; head-sampled traces were chosen at
the gateway and are all kept.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from typing import Any

from sandboxes.runtime.node import Node, Request, Response


def setup(node: Node) -> None:
    trace_wait_s = float(node.param("trace_wait_s", 2.0))
    tail_slow_ms = float(node.param("tail_slow_ms", 500))
    pending: dict[str, dict[str, Any]] = {}  # trace id → {"spans": [...], "last": time}
    logs: list[dict[str, Any]] = []  # log lines not yet reported
    kept_failed: collections.deque[float] = collections.deque()  # when each was kept
    counts = {"traces": 0, "dropped_by_tail": 0}

    @node.route("/ingest", method="POST")
    async def ingest(request: Request) -> Response:
        body = await request.json()
        now = time.monotonic()
        for item in body.get("items", []):
            if "span" in item:
                span = item["span"]
                trace = pending.setdefault(span["trace_id"], {"spans": []})
                trace["spans"].append(span)
                trace["last"] = now
            elif "log" in item:
                logs.append(item["log"])
        return node.json({"ok": True})

    def keep(spans: list[dict[str, Any]]) -> bool:
        """The sampling decision for a whole trace."""
        if not any(s.get("sampling") == "tail" for s in spans):
            return True  # head sampling already chose it
        roots = [s for s in spans if not s.get("parent_id")]
        slow = any(s["ms"] > tail_slow_ms for s in roots)
        failed = any(s["status"] == "error" for s in spans)
        return failed or slow or random.random() < 0.01

    def report(trace_id: str, spans: list[dict[str, Any]]) -> None:
        start = min(s["start"] for s in spans)
        ids = {s["span_id"] for s in spans}
        roots = [s for s in spans if s.get("parent_id") not in ids]
        root = min(roots, key=lambda s: s["start"])
        failed = any(s["status"] == "error" for s in spans)
        node.emit(
            "trace",
            trace_id=trace_id,
            root=root["name"],
            service=root["service"],
            started=start,
            ms=max(s["start"] * 1000 + s["ms"] for s in spans) - start * 1000,
            status="error" if failed else "ok",
            spans=sorted(spans, key=lambda s: s["start"]),
        )
        if failed:
            kept_failed.append(time.time())

    @node.task
    async def assemble() -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for trace_id in [t for t, v in pending.items() if now - v["last"] >= trace_wait_s]:
                spans = pending.pop(trace_id)["spans"]
                if keep(spans):
                    counts["traces"] += 1
                    report(trace_id, spans)
                else:
                    counts["dropped_by_tail"] += 1
            while logs:  # in lines of 100: a telemetry line stays well under 64 KB
                node.emit("logs", lines=logs[:100])
                del logs[:100]
            while kept_failed and kept_failed[0] < time.time() - 10:
                kept_failed.popleft()
            node.gauge("traces_kept", counts["traces"])
            node.gauge("failed_traces_10s", len(kept_failed))
            node.gauge("pending_traces", len(pending))
