"""CPU cost of the telemetry supervisor per running sandbox. Prints one JSON object.

    DEBUG=true .venv/bin/python bench/supervisor_cost.py [--sandboxes 3] [--seconds 30]
        [--engine local]

Launches ``--sandboxes`` replicated-lb sandboxes (one learner each, their default
traffic: 20 requests/s) through the platform's services, runs ``manage.py supervise`` as
its own process on the Redis channel layer and cache (REDIS_URL, default
redis://127.0.0.1:6379/0), as the classroom stack does, and waits until it publishes
every sandbox's snapshot. After ``--warmup`` seconds it reads the process's CPU time
(user + system, all threads) from ``/proc/<pid>/stat`` once a second for ``--seconds``:
the figure is CPU time over wall time, as a share of one core, with nothing subtracted.
Everything is removed at the end, also on Ctrl+C.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from _harness import cpu_seconds, platform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sandboxes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--engine", choices=["local", "docker"], default="local")
    args = parser.parse_args()

    limit = str(max(30, args.sandboxes))
    with platform(
        "distlab-supervisor-", engine=args.engine, redis=True, SANDBOX_MAX_TOTAL=limit
    ) as lab:
        from django.core.cache import cache

        from apps.labs.services import control_values
        from apps.labs.supervisor import snapshot_cache_key

        sandboxes = [lab.launch(lab.user(f"learner-{n}")) for n in range(args.sandboxes)]
        rps = control_values(sandbox=sandboxes[0])["rps"]
        supervisor = lab.supervise()
        deadline = time.monotonic() + 60
        while not all((cache.get(snapshot_cache_key(s.hex)) or {}).get("frame") for s in sandboxes):
            if supervisor.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the supervisor did not publish:\n{lab.output('supervise')}")
            time.sleep(0.2)
        time.sleep(args.warmup)

        samples: list[float] = []  # % of one core, second by second
        started_cpu, started = cpu_seconds(supervisor.pid), time.monotonic()
        last_cpu, last = started_cpu, started
        while last - started < args.seconds:
            time.sleep(1.0)
            cpu, now = cpu_seconds(supervisor.pid), time.monotonic()
            samples.append(100 * (cpu - last_cpu) / (now - last))
            last_cpu, last = cpu, now
        if supervisor.poll() is not None:
            raise SystemExit(f"the supervisor stopped:\n{lab.output('supervise')}")
        engine = lab.engine.name
        load = os.getloadavg()[0]

    duration = last - started
    total = 100 * (last_cpu - started_cpu) / duration
    result: dict[str, Any] = {
        "benchmark": "supervisor_cost",
        "sandboxes": args.sandboxes,
        "pattern": "replicated-lb",
        "traffic_rps": rps,
        "cpu_pct_total": round(total, 2),
        "cpu_pct_per_sandbox": round(total / args.sandboxes, 2),
        "cpu_pct_max_1s": round(max(samples), 1),
        "duration_s": round(duration, 1),
        "engine": engine,
        "layer": "redis",
        "load_avg_1m": round(load, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
