"""How many sandboxes of a pattern (default: the load-balanced service) run at once, at
their default traffic, while the platform's pages stay fast; and the memory of an idle
node container. Prints one JSON object.

    make bench   # or: DEBUG=true .venv/bin/python bench/capacity.py [--max N] [--pattern ID]

Launches sandboxes one after another through the platform's own services (real Docker
engine, one learner each), lets each settle, then times the pattern's chapter page of a
learner whose sandbox panel lists its running nodes (server time, 40 requests). Stops at
the first count whose page p95 exceeds the target or whose sandboxes no longer serve
their default traffic (the pattern's users complete under 90% of the calls a lone sandbox
completed, or fail over 1 point more of them, measured from the oldest and the newest
sandbox's own telemetry), or at --max. Afterwards it sets one sandbox's traffic to 0 (its
`rps` control, where it has one) and reads its first node's memory from the engine (the
container's memory use without the page cache). Everything is removed at the end.

Targets on the 2-core reference machine: >= 20 sandboxes with page p95 <= 300 ms; an idle
node container <= 40 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PAGE_TARGET_MS = 300.0
MEMORY_TARGET_MB = 40.0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def traffic_health(
    engine: object, sandbox_id: str, users: list[str], window: float = 2.0, lag: float = 1.0
) -> tuple[float, float]:
    """Calls/s the sandbox's users (its traffic nodes) completed over a ``window`` of
    seconds that ended ``lag`` seconds ago (their lines are written by then), and the share
    of them that failed (from their own telemetry). Each user's log is read until it passes
    the window: the older a container, the longer the engine takes to seek in its log, and
    a fixed reading time would count an old sandbox's calls short."""
    import threading

    calls = []
    end = time.time() - lag
    since = end - window
    for node in users:
        stop = threading.Event()
        timer = threading.Timer(20.0, stop.set)  # a log that never passes the window
        timer.start()
        try:
            for raw in engine.follow(sandbox_id, node, since=since, stop=stop):  # type: ignore[attr-defined]
                line = json.loads(raw)
                ts = float(line.get("ts") or 0)
                if ts > end + 1.0:  # past the window (lines are written about in order)
                    break
                if line.get("type") == "call" and since <= ts <= end:
                    calls.append(line)
        finally:
            timer.cancel()
    failed = sum(1 for c in calls if c["status"] == 0 or c["status"] >= 400)
    return len(calls) / window, (failed / len(calls) if calls else 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max", type=int, default=30, help="most sandboxes to try")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after each launch")
    parser.add_argument("--pattern", default="replicated-lb", help="the pattern to launch")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="distlab-capacity-")
    os.environ.setdefault("DEBUG", "true")
    os.environ["DATABASE_URL"] = f"sqlite:///{tmp}/bench.sqlite3"
    os.environ["DISTLAB_VAR_DIR"] = tmp
    os.environ["SANDBOX_ENGINE"] = "docker"
    os.environ["SANDBOX_MAX_TOTAL"] = str(args.max + 1)
    os.environ["CONTENT_AUTO_SYNC"] = "false"
    os.environ["LOG_LEVEL"] = "WARNING"
    os.environ.pop("REDIS_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.test import Client
    from django.test.utils import setup_test_environment

    from apps.accounts.models import User
    from apps.courses.models import Chapter
    from apps.labs import services
    from apps.labs.engine import get_engine
    from apps.labs.engine.docker import DockerEngine
    from apps.labs.image import ensure_image
    from apps.labs.patterns import load_pattern

    setup_test_environment()
    settings.ALLOWED_HOSTS = ["testserver"]
    call_command("migrate", verbosity=0, interactive=False)
    call_command("content", "sync", stdout=open(os.devnull, "w"))  # noqa: SIM115
    engine = get_engine()
    if not isinstance(engine, DockerEngine):
        sys.exit("capacity.py needs a Docker engine")
    ensure_image(engine.client)
    pattern = load_pattern(args.pattern)
    users = pattern.user_nodes(pattern.node_names())
    url = Chapter.objects.filter(sandbox=args.pattern).first().get_absolute_url()  # type: ignore[union-attr]
    baseline: tuple[float, float] | None = None

    sandboxes = []
    samples: list[dict[str, float]] = []
    within = 0
    idle_mb = None
    node = pattern.node_names()[0]  # whose memory is read once traffic stops
    try:
        for n in range(1, args.max + 1):
            user = User.objects.create_user(username=f"capacity-{n}")
            created = services.sandbox_launch(user=user, pattern_id=args.pattern, enqueue=False)
            started = time.monotonic()
            sandboxes.append(services.sandbox_start(sandbox_id=created.hex))
            launch_s = time.monotonic() - started
            time.sleep(args.settle)
            client = Client()
            client.force_login(User.objects.get(username="capacity-1"))
            client.get(url)
            timings = []
            for _ in range(40):
                t0 = time.perf_counter()
                assert client.get(url).status_code == 200
                timings.append((time.perf_counter() - t0) * 1000)
            p95 = percentile(timings, 95)
            # Are the sandboxes themselves still serving their default traffic?
            rps_first, errors_first = traffic_health(engine, sandboxes[0].hex, users)
            rps_last, errors_last = traffic_health(engine, sandboxes[-1].hex, users)
            if baseline is None:  # one sandbox alone: what "serving" means for this pattern
                baseline = (rps_first, errors_first)
            healthy = (
                min(rps_first, rps_last) >= 0.9 * baseline[0]
                and max(errors_first, errors_last) <= baseline[1] + 0.01
            )
            samples.append(
                {
                    "sandboxes": n,
                    "traffic_rps_first": round(rps_first, 1),
                    "traffic_rps_newest": round(rps_last, 1),
                    "traffic_errors_newest": round(errors_last, 4),
                    "page_p50_ms": round(statistics.median(timings), 1),
                    "page_p95_ms": round(p95, 1),
                    "launch_s": round(launch_s, 2),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                }
            )
            print(json.dumps(samples[-1]), file=sys.stderr)
            if p95 > PAGE_TARGET_MS or not healthy:
                break
            within = n

        first = sandboxes[0]
        if pattern.control("rps") is not None:
            services.sandbox_control(sandbox=first, control_id="rps", value=0)
        time.sleep(3)
        container = engine.client.containers.get(engine.container_name(first.hex, node))
        stats = container.stats(stream=False)["memory_stats"]
        cache = stats.get("stats", {}).get(
            "total_inactive_file", stats.get("stats", {}).get("cache", 0)
        )
        idle_mb = round((stats["usage"] - cache) / 2**20, 1)
    finally:
        for sandbox in sandboxes:
            services.sandbox_stop(sandbox=sandbox, enqueue=False)
            services.sandbox_teardown(sandbox_id=sandbox.hex)

    print(
        json.dumps(
            {
                "pattern": args.pattern,
                "sandboxes_within_targets": within,
                "tried_up_to": args.max,
                "page_target_p95_ms": PAGE_TARGET_MS,
                "target_sandboxes": 20,
                "idle_node": node,
                "idle_node_memory_mb": idle_mb,
                "target_idle_node_memory_mb": MEMORY_TARGET_MB,
                "samples": samples,
            }
        )
    )


if __name__ == "__main__":
    main()
