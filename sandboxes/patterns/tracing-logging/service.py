"""One service of the shop, traced and logged: gateway, orders, inventory or payments.

Each request it serves is a **span** (the OpenTelemetry model: a trace id shared by the
whole request, its own span id, its parent's span id, a name, a start, a duration and a
status), and so is each call it makes, whose child is the callee's span. The ids travel
in the W3C ``traceparent`` header, ``00-<trace id>-<parent span id>-<flags>``: a request
that brings one joins that trace; one that does not starts a new trace. With
``propagate`` off the service does not pass it on, so the services it calls start traces
of their own.

Every request also writes a structured **log line** (JSON: time, service, level,
message, trace id, span id), sampled or not. Spans and log lines go into a buffer that a
background task ships to the collector twice a second. Shipping never blocks a request:
when the collector does not answer, the buffer keeps the newest ``params.buffer_max``
items and drops the oldest (gauge ``dropped``), so telemetry never takes the service down.

The gateway is where traces begin, so it decides **sampling**: head sampling keeps a
share of traces, decided at the start (flag 01 in ``traceparent`` = keep); ``tail`` keeps
every trace until the collector sees it whole, and lets the collector decide.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from typing import Any

from sandboxes.runtime.node import CallError, Node, Request, Response

SAMPLING = {"head 100%": 1.0, "head 10%": 0.1, "head 1%": 0.01, "tail": 1.0}
COLLECTOR = "collector"


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """``00-<32 hex>-<16 hex>-<2 hex>`` → (trace id, parent span id, sampled), else None."""
    parts = (value or "").split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        flags = int(parts[3], 16)
        int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None
    return parts[1], parts[2], bool(flags & 1)


def traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def setup(node: Node) -> None:
    calls = node.env_json("DISTLAB_CALLS", [])  # the services it calls, in order
    call_timeout_s = node.env_float("DISTLAB_CALL_TIMEOUT_S", 1.0)
    work_ms = float(node.param("work_ms", 5))
    buffer_max = int(node.param("buffer_max", 2000))
    node.setting("propagate", True)
    if node.role == "gateway":
        node.setting("sampling", "head 100%", choices=list(SAMPLING))

    buffer: list[dict[str, Any]] = []  # spans and log lines waiting to be shipped
    dropped = 0

    def keep(item: dict[str, Any]) -> None:
        nonlocal dropped
        buffer.append(item)
        if len(buffer) > buffer_max:  # the collector is away: drop the oldest
            del buffer[0]
            dropped += 1

    def log(level: str, message: str, trace_id: str, span_id: str) -> None:
        keep({"log": {"ts": round(time.time(), 3), "service": node.name, "level": level,
                      "msg": message, "trace_id": trace_id, "span_id": span_id}})  # fmt: skip

    def span(trace_id: str, span_id: str, parent: str | None, name: str, kind: str,
             started: float, status: str, sampling: str) -> None:  # fmt: skip
        keep({"span": {"trace_id": trace_id, "span_id": span_id, "parent_id": parent,
                       "service": node.name, "name": name, "kind": kind,
                       "start": round(started, 4), "ms": round((time.time() - started) * 1000, 1),
                       "status": status, "sampling": sampling}})  # fmt: skip

    @node.route("/checkout", method="POST")
    async def handle(request: Request) -> Response:
        started = time.time()
        incoming = parse_traceparent(request.headers.get("traceparent"))
        if incoming:  # join the caller's trace
            trace_id, parent, sampled = incoming
            sampling = request.headers.get("tracestate", "").removeprefix("distlab=")
        else:  # a new trace begins here: decide whether to keep it
            trace_id, parent = secrets.token_hex(16), None
            mode = node.config.get("sampling", "head 100%")
            sampled, sampling = random.random() < SAMPLING[mode], mode
        span_id = secrets.token_hex(8)
        await asyncio.sleep(work_ms / 1000)  # stands in for real work

        status, failure = "ok", ""
        for callee in calls:
            call_span = secrets.token_hex(8)
            headers = {}
            if node.config["propagate"]:
                headers = {"traceparent": traceparent(trace_id, call_span, sampled),
                           "tracestate": f"distlab={sampling}"}  # fmt: skip
            call_started = time.time()
            try:
                reply = await node.call(callee, "/checkout", method="POST",
                                        timeout=call_timeout_s, headers=headers)  # fmt: skip
                outcome = "ok" if reply.status < 500 else f"status {reply.status}"
            except CallError as exc:
                outcome = exc.reason
            if sampled:
                span(trace_id, call_span, span_id, f"call {callee}", "client", call_started,
                     "ok" if outcome == "ok" else "error", sampling)  # fmt: skip
            if outcome != "ok":
                status, failure = "error", f"{callee}: {outcome}"
                ms = (time.time() - call_started) * 1000
                log("error", f"{callee} failed after {ms:.0f} ms ({outcome})", trace_id, span_id)
                break

        if sampled:
            span(trace_id, span_id, parent, f"{node.name} /checkout", "server", started, status,
                 sampling)  # fmt: skip
        # W3C ``traceresponse``: the caller learns which trace its request became (the
        # lab's moving dots carry it: click one to open its trace).
        told = {"traceresponse": traceparent(trace_id, span_id, sampled)}
        if status == "ok":
            log("info", "checkout step done", trace_id, span_id)
            return node.json({"ok": True, "trace_id": trace_id}, headers=told)
        return node.json({"error": failure, "trace_id": trace_id}, status=502, headers=told)

    @node.task
    async def ship() -> None:
        """Twice a second, send what the buffer holds to the collector; keep it if that
        fails, so a short outage loses nothing."""
        nonlocal dropped
        while True:
            await asyncio.sleep(0.5)
            node.gauge("buffered", len(buffer))
            node.gauge("dropped", dropped)
            if not buffer:
                continue
            batch = buffer[:500]
            del buffer[:500]
            try:
                reply = await node.call(COLLECTOR, "/ingest", method="POST", timeout=1,
                                        json={"items": batch})  # fmt: skip
                shipped = reply.status == 200
            except CallError:
                shipped = False
            if not shipped:  # back in front of what came meanwhile, within the bound
                buffer[:0] = batch
                excess = len(buffer) - buffer_max
                if excess > 0:
                    del buffer[:excess]
                    dropped += excess
