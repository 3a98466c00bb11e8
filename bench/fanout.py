"""Fan-out: many browsers watching one sandbox. Prints one JSON object.

    DEBUG=true .venv/bin/python bench/fanout.py [--viewers 200] [--seconds 30]
        [--engine local]

Launches one replicated-lb sandbox (its default traffic) through the platform's services,
starts a real Daphne server (``manage.py serve``) and a separate ``manage.py supervise``,
both on the Redis channel layer (REDIS_URL, default redis://127.0.0.1:6379/0), as the
classroom stack runs them. Then ``--viewers`` WebSocket clients connect to
``/ws/sandboxes/<id>/`` over TCP, every one with a real session cookie of the sandbox's
owner, and each frame's lag is taken when a viewer receives it: receive time minus the
frame's ``ts`` (when the supervisor made it; same clock). A viewer counts as disconnected
if its socket closes or fails before the end. Also reported: the CPU (% of one core) of
the web server, the supervisor and this process (the viewers) over the measured window.

Target on the 2-core reference machine: 200 viewers, lag p99 <= 500 ms, none
disconnected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from _harness import cpu_seconds, free_port, percentile, platform

TARGET_P99_MS = 500.0
# A frame's own ts comes first after its type and version: read it without decoding the
# whole frame, so that the viewers' JSON work does not compete with the server's.
FRAME_TS = re.compile(r'^\{"type": ?"frame", ?"v": ?\d+, ?"ts": ?([0-9.eE+-]+)')


@dataclass
class Viewer:
    lags_ms: list[float] = field(default_factory=list)
    messages: int = 0  # everything received, warm-up included
    connected: bool = False
    closed: str = ""  # why the socket ended before we closed it


async def watch(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    viewer: Viewer,
    measuring: asyncio.Event,
    done: asyncio.Event,
) -> None:
    try:
        async with session.ws_connect(url, headers=headers, heartbeat=None) as ws:
            first = await ws.receive(timeout=30)
            if first.type != aiohttp.WSMsgType.TEXT or '"snapshot"' not in first.data[:40]:
                viewer.closed = f"no snapshot: {first.type.name} {ws.close_code}"
                return
            viewer.connected = True
            while not done.is_set():
                message = await ws.receive()
                if message.type != aiohttp.WSMsgType.TEXT:
                    if not done.is_set():
                        viewer.closed = f"{message.type.name} {ws.close_code}"
                    return
                received = time.time()
                viewer.messages += 1
                found = FRAME_TS.match(message.data)
                if found and measuring.is_set():
                    viewer.lags_ms.append((received - float(found[1])) * 1000)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        if not done.is_set():
            viewer.closed = f"{type(exc).__name__}: {exc}"


async def fan_out(
    url: str, origin: str, cookie: str, viewers: list[Viewer], seconds: float, warmup: float
) -> tuple[float, float]:
    """Connect every viewer, wait ``warmup``, measure for ``seconds``; the measured
    window as (start, end) on the monotonic clock."""
    measuring, done = asyncio.Event(), asyncio.Event()
    headers = {"Cookie": cookie, "Origin": origin}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        for start in range(0, len(viewers), 20):  # in batches, as a class arriving
            for viewer in viewers[start : start + 20]:
                tasks.append(
                    asyncio.create_task(watch(session, url, headers, viewer, measuring, done))
                )
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 60
        while not all(v.connected or v.closed for v in viewers):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(warmup)
        measuring.set()
        started = time.monotonic()
        await asyncio.sleep(seconds)
        ended = time.monotonic()
        measuring.clear()
        done.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return started, ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--viewers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--engine", choices=["local", "docker"], default="local")
    args = parser.parse_args()

    viewers = [Viewer() for _ in range(args.viewers)]
    with platform("distlab-fanout-", engine=args.engine, redis=True) as lab:
        port = free_port()
        server = lab.serve(port)
        supervisor = lab.supervise()
        owner = lab.user("fanout-owner")
        sandbox = lab.launch(owner)
        base = f"http://127.0.0.1:{port}"
        url = f"ws://127.0.0.1:{port}/ws/sandboxes/{sandbox.hex}/"

        cpu_before = {p: cpu_seconds(p.pid) for p in (server, supervisor)}
        own_before = resource.getrusage(resource.RUSAGE_SELF)
        run_started = time.monotonic()
        started, ended = asyncio.run(
            fan_out(url, base, lab.cookie(owner), viewers, args.seconds, args.warmup)
        )
        wall = ended - started
        run_s = time.monotonic() - run_started  # CPU is over the whole run, connects included
        cpu = {p: cpu_seconds(p.pid) - before for p, before in cpu_before.items()}
        own_after = resource.getrusage(resource.RUSAGE_SELF)
        own_cpu = (
            (own_after.ru_utime - own_before.ru_utime) + (own_after.ru_stime - own_before.ru_stime)
        ) / run_s
        engine = lab.engine.name
        load = os.getloadavg()[0]

    lags = [lag for v in viewers for lag in v.lags_ms]
    messages = sum(v.messages for v in viewers)
    closed = [v.closed for v in viewers if v.closed]
    p99 = percentile(lags, 99)
    result: dict[str, Any] = {
        "benchmark": "fanout",
        "viewers": args.viewers,
        "frames_received": len(lags),
        "frames_per_viewer_per_s": round(len(lags) / args.viewers / wall, 2),
        "lag_p50_ms": percentile(lags, 50),
        "lag_p99_ms": p99,
        "lag_max_ms": round(max(lags), 1) if lags else None,
        "disconnected": len(closed),
        "disconnect_reasons": sorted(set(closed))[:5],
        "duration_s": round(wall, 1),
        "engine": engine,
        "layer": "redis",
        "web_cpu_pct": round(100 * cpu[server] / run_s, 1),
        # Per message sent to a viewer: what the fan-out costs, however busy the machine.
        "web_cpu_us_per_message": round(1e6 * cpu[server] / max(1, messages)),
        "supervisor_cpu_pct": round(100 * cpu[supervisor] / run_s, 1),
        "viewers_cpu_pct": round(100 * own_cpu, 1),
        "load_avg_1m": round(load, 2),
        "target_p99_ms": TARGET_P99_MS,
    }
    result["ok"] = p99 is not None and p99 <= TARGET_P99_MS and not closed
    print(json.dumps(result))


if __name__ == "__main__":
    main()
