"""Server time to render the course home and the chapter page for a signed-in learner,
and the chapter page while the learner's sandbox runs: with the supervisor's view of the
nodes (what the page uses) and, side by side in the same run, asking the engine on every
request (the baseline: no supervisor). Prints one JSON object with p50/p95 in ms.

    DEBUG=true .venv/bin/python bench/pages.py [--requests N] [--engine docker|local|none]

A throwaway installation (``_harness``: SQLite, Redis at REDIS_URL or the local one, its
own key prefix) with the real content, the supervisor as a process of its own.
``--engine none`` measures only the pages without a sandbox.

Targets on the 2-core reference machine (issue 14): the chapter page p95 <= 50 ms without a
sandbox, <= 30 ms with a running one on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from _harness import percentile, platform

TARGET_P95_MS = 50
TARGET_RUNNING_P95_MS = 30


def measure(client: Any, url: str, requests: int) -> dict[str, float | None]:
    for _ in range(10):  # warm the render cache and the connection
        assert client.get(url).status_code == 200
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(url)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    return {"p50_ms": round(statistics.median(samples), 2), "p95_ms": percentile(samples, 95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--engine", choices=["docker", "local", "none"], default="docker")
    args = parser.parse_args()

    engine = "local" if args.engine == "none" else args.engine
    # Redis: the supervisor runs as a process of its own (as on a classroom server) and
    # the page reads its view from the shared cache.
    with platform("distlab-pages-", engine=engine, redis=True) as lab:
        from django.conf import settings
        from django.core.management import call_command
        from django.test import Client
        from django.test.utils import setup_test_environment

        from apps.courses.models import Chapter
        from apps.labs.node_status import FRESH_S

        setup_test_environment()
        settings.ALLOWED_HOSTS = ["testserver"]
        call_command("content", "sync", stdout=open(os.devnull, "w"))  # noqa: SIM115
        user = lab.user("bench-learner")
        client = Client()
        client.force_login(user)
        chapter = Chapter.objects.get(number=5)
        url = chapter.get_absolute_url()
        results: dict[str, Any] = {"requests_per_page": args.requests}
        results["course_home"] = measure(client, "/", args.requests)
        results["chapter_page"] = measure(client, url, args.requests)
        if args.engine != "none":
            lab.launch(user, chapter.sandbox)
            supervisor = lab.supervise()
            time.sleep(3)  # it has followed the sandbox and seen its nodes
            results["chapter_page_running_sandbox"] = measure(client, url, args.requests)
            lab.stop(supervisor)
            time.sleep(FRESH_S + 1)  # its view is stale: every page asks the engine
            results["chapter_page_running_sandbox_engine_per_request"] = measure(
                client, url, args.requests
            )
        results["engine"] = args.engine
        results["target_chapter_p95_ms"] = TARGET_P95_MS
        results["target_running_p95_ms"] = TARGET_RUNNING_P95_MS
    print(json.dumps(results))


if __name__ == "__main__":
    main()
