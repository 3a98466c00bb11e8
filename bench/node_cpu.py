"""CPU cost of the node runtime: one replica node serving 200 requests/s.

    make bench            # or: .venv/bin/python bench/node_cpu.py [--rps 200] [--seconds 10]
    DISTLAB_NODE_PYTHON=/usr/bin/python3 .venv/bin/python bench/node_cpu.py   # Debian's aiohttp

Starts a ``replicated-lb`` replica as a local subprocess on 127.0.0.1 (telemetry on, read
by this process as an engine would), drives it open-loop over keep-alive connections,
and reads the node's CPU time from ``/proc/<pid>/stat`` around the measured window. For
comparison it measures, in alternating windows of the same length, a bare aiohttp server
with the same handler and no runtime (``aiohttp_alone_cpu_percent``): on a busy machine
both figures rise together. Prints one JSON object. Target (issue 3): well under 10% of
one core at 200 requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from apps.labs.patterns import load_pattern  # noqa: E402
from sandboxes.runtime.testing import LocalCluster, free_port, wait_for  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
ROUNDS = 2

# The replica's handler without the runtime: what aiohttp alone costs.
BARE_SERVER = """
import asyncio, sys
from aiohttp import web

async def serve(request):
    await asyncio.sleep(0.005)
    return web.json_response({"replica": "bare", "work_ms": 5.0})

app = web.Application()
app.router.add_get("/", serve)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


async def drive(url: str, rps: float, seconds: float) -> tuple[int, int]:
    """Send ``rps`` requests per second for ``seconds``, open-loop; return (ok, failed)."""
    results = {"ok": 0, "failed": 0}
    timeout = aiohttp.ClientTimeout(total=2)

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(url, timeout=timeout) as response:
                await response.read()
                results["ok" if response.status == 200 else "failed"] += 1
        except (aiohttp.ClientError, TimeoutError):
            results["failed"] += 1

    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = set()
        start = loop.time()
        for n in range(int(rps * seconds)):
            await asyncio.sleep(max(0.0, start + n / rps - loop.time()))
            task = loop.create_task(one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return results["ok"], results["failed"]


def measure(pid: int, url: str, rps: float, seconds: float) -> tuple[float, int, int, float]:
    """(CPU % of one core, ok, failed, wall seconds) of ``pid`` while driving ``url``."""
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    ok, failed = asyncio.run(drive(url, rps, seconds))
    wall = time.monotonic() - wall_before
    return 100 * (cpu_seconds(pid) - cpu_before) / wall, ok, failed, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rps", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10, help="measured, per server")
    args = parser.parse_args()
    window = args.seconds / ROUNDS

    replica = load_pattern("replicated-lb").node("replica-1")
    with LocalCluster("replicated-lb", [replica]) as cluster:
        cluster.wait_started()
        node = cluster.nodes["replica-1"]
        started = cluster.find("replica-1", "state", event="started") or {}
        port = free_port()
        bare = subprocess.Popen(
            [cluster.python, "-c", BARE_SERVER, str(port)], stdout=subprocess.DEVNULL
        )
        try:
            bare_url = f"http://127.0.0.1:{port}/"
            wait_for(lambda: _answers(bare_url), 10, what="the bare aiohttp server")
            for url in (f"{node.url}/", bare_url):  # warm up: connections, code paths
                asyncio.run(drive(url, args.rps, 1.0))
            node_runs, bare_runs = [], []
            for _ in range(ROUNDS):
                node_runs.append(measure(node.pid, f"{node.url}/", args.rps, window))
                bare_runs.append(measure(bare.pid, bare_url, args.rps, window))
        finally:
            bare.send_signal(signal.SIGTERM)
            bare.wait(10)
        events = len(cluster.events("replica-1", "request"))

    node_cpu = statistics.fmean(r[0] for r in node_runs)
    bare_cpu = statistics.fmean(r[0] for r in bare_runs)
    ok, failed = sum(r[1] for r in node_runs), sum(r[2] for r in node_runs)
    print(
        json.dumps(
            {
                "rps": round((ok + failed) / sum(r[3] for r in node_runs), 1),
                "node_cpu_percent_of_one_core": round(node_cpu, 2),
                "target": "< 10",
                "aiohttp_alone_cpu_percent": round(bare_cpu, 2),
                "runtime_overhead_percent": round(node_cpu - bare_cpu, 2),
                "ok": ok,
                "failed": failed,
                "seconds": round(sum(r[3] for r in node_runs), 2),
                "telemetry_request_events": events,
                "python": started.get("python"),
                "aiohttp": started.get("aiohttp"),
            }
        )
    )


def _answers(url: str) -> bool:
    async def get() -> bool:
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    return asyncio.run(get())


if __name__ == "__main__":
    main()
