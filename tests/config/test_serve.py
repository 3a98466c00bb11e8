"""`manage.py serve` (what `make run` starts) answers HTTP with pages and static files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


def test_serve_answers_pages_and_static_files(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}},
        "DEBUG": "true",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "SANDBOX_ENGINE": "local",
        "DISTLAB_VAR_DIR": str(tmp_path),
    }
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v", "0"], cwd=REPO, env=env, check=True
    )
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, body = fetch(f"http://127.0.0.1:{port}/")
                break
            except OSError:
                assert server.poll() is None, server.stdout.read() if server.stdout else ""
                assert time.monotonic() < deadline, "serve did not answer within 30 s"
                time.sleep(0.1)
        assert status == 200
        assert b"Replicated load-balanced services" in body  # content synced at start-up
        status, css = fetch(f"http://127.0.0.1:{port}/static/distlab/distlab.css")
        assert status == 200 and b"--accent" in css
        status, js = fetch(f"http://127.0.0.1:{port}/static/vendor/mermaid/mermaid.min.js")
        assert status == 200 and len(js) > 100_000
    finally:
        server.terminate()
        output = server.communicate(timeout=20)[0]
    assert "Distlab is serving at" in output
    assert "NO isolation" in output  # the local engine says so at start-up
    assert "Traceback" not in output, output
