"""Server time to render the chapter page (warm cache) and the course home for a
signed-in learner. Prints one JSON object with p50/p95 in milliseconds.

    make bench            # or: DEBUG=true .venv/bin/python bench/pages.py [--requests N]

Runs against a throwaway SQLite database (or DATABASE_URL if set) with the real content.
Target on the 2-core reference machine: chapter page p95 <= 50 ms.
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


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="distlab-bench-")
    os.environ.setdefault("DEBUG", "true")
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{tmp}/bench.sqlite3")
    os.environ.setdefault("DISTLAB_VAR_DIR", str(REPO / "var"))
    os.environ["CONTENT_AUTO_SYNC"] = "false"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.test import Client
    from django.test.utils import setup_test_environment

    setup_test_environment()
    settings.ALLOWED_HOSTS = ["testserver"]
    call_command("migrate", verbosity=0, interactive=False)
    call_command("content", "sync", stdout=open(os.devnull, "w"))  # noqa: SIM115

    from apps.accounts.models import User
    from apps.courses.models import Chapter

    user, _ = User.objects.get_or_create(username="bench-learner")
    client = Client()
    client.force_login(user)
    chapter = Chapter.objects.get(number=5)
    pages = {"chapter_page": chapter.get_absolute_url(), "course_home": "/"}

    results: dict[str, object] = {"requests_per_page": args.requests}
    for name, url in pages.items():
        for _ in range(10):  # warm the render cache and the connection
            assert client.get(url).status_code == 200
        samples = []
        for _ in range(args.requests):
            started = time.perf_counter()
            response = client.get(url)
            samples.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
        results[name] = {
            "p50_ms": round(statistics.median(samples), 2),
            "p95_ms": round(percentile(samples, 95), 2),
        }
    results["database"] = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    results["target_chapter_p95_ms"] = 50
    print(json.dumps(results))


if __name__ == "__main__":
    main()
