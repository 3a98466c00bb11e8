"""`manage.py serve` (what `make run` starts) answers HTTP with pages and static files, and
streams a sandbox's live telemetry from the supervisor it runs in-process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from apps.labs.engine.local import LocalEngine
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


def embedded_env(tmp_path: Path) -> dict[str, str]:
    """What `make run` has: SQLite, no Redis, and (here) the local-process engine."""
    drop = {"DATABASE_URL", "REDIS_URL", "SANDBOX_SUPERVISOR_IN_PROCESS"}
    return {
        **{k: v for k, v in os.environ.items() if k not in drop},
        "DEBUG": "true",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "SANDBOX_ENGINE": "local",
        "DISTLAB_VAR_DIR": str(tmp_path),
        "SANDBOX_INSTANCE": f"test-serve-{os.getpid()}",
    }


def test_serve_streams_live_telemetry_from_its_own_supervisor(tmp_path: Path) -> None:
    """As after `make run`: the demo learner signs in, launches a sandbox from its page
    and watches it: a snapshot, then frames carrying the sandbox's traffic. Without Redis
    only a supervisor inside the web process can reach the viewer (in-memory layer)."""
    port = free_port()
    env = embedded_env(tmp_path)
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "-v", "0"], cwd=REPO, env=env, check=True)
    demo = subprocess.run(
        [*manage, "demo_users"], cwd=REPO, env=env, check=True, capture_output=True, text=True
    ).stdout
    found = re.search(r"user: learner\s+password: (\S+)", demo)
    assert found, demo
    server = subprocess.Popen(
        [*manage, "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                fetch(f"{base}/")
                break
            except OSError:
                assert server.poll() is None, server.stdout.read() if server.stdout else ""
                assert time.monotonic() < deadline, "serve did not answer within 30 s"
                time.sleep(0.1)
        snapshot, frames, closed = asyncio.run(watch_a_sandbox(base, "learner", found[1]))
    finally:
        server.terminate()
        try:
            output = server.communicate(timeout=30)[0]
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)
            engine = LocalEngine(tmp_path / "sandboxes")
            for info in engine.list_sandboxes():
                engine.destroy(info.sandbox_id)
    assert snapshot["type"] == "snapshot" and "history" in snapshot
    busy = [f for f in frames if (f["totals"]["rps"] or 0) > 0]
    assert len(busy) >= 5, frames[-3:]
    assert [f["seq"] for f in busy] == sorted(f["seq"] for f in busy)
    assert all(set(f["nodes"]) >= {"lb", "replica-1", "traffic"} for f in busy)
    assert closed == 4410  # stopping the sandbox ended the stream
    assert server.returncode == 0, output
    assert "telemetry: the supervisor runs in this process" in output
    assert "telemetry supervisor stopped" in output  # let go before the server went down
    assert "Traceback" not in output, output
    assert LocalEngine(tmp_path / "sandboxes").list_sandboxes() == []


async def watch_a_sandbox(
    base: str, username: str, password: str
) -> tuple[dict[str, Any], list[dict[str, Any]], int | None]:
    """Sign in, launch a replicated-lb sandbox, watch its stream until frames show traffic
    for a few seconds, stop the sandbox; (snapshot, frames, close code)."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(base, cookie_jar=jar, timeout=timeout) as http:
        async with http.get("/accounts/login/") as response:
            assert response.status == 200
        csrf = {"X-CSRFToken": jar.filter_cookies(URL(base))["csrftoken"].value}
        form = {"username": username, "password": password}
        async with http.post("/accounts/login/", data=form, headers=csrf) as response:
            assert response.status == 200 and str(response.url) == f"{base}/", response.url
        csrf = {"X-CSRFToken": jar.filter_cookies(URL(base))["csrftoken"].value}  # rotated
        launch = "/sandboxes/launch/replicated-lb/"
        async with http.post(launch, headers=csrf, allow_redirects=False) as response:
            assert response.status == 302, await response.text()
            sandbox_url = response.headers["Location"]
        sandbox_id = sandbox_url.rstrip("/").rsplit("/", 1)[1]
        frames: list[dict[str, Any]] = []
        async with http.ws_connect(f"/ws/sandboxes/{sandbox_id}/", origin=base) as ws:
            snapshot = await receive_json(ws)
            deadline = time.monotonic() + 60
            busy_since = None
            while busy_since is None or time.monotonic() - busy_since < 3:
                assert time.monotonic() < deadline, f"no traffic in frames: {frames[-3:]}"
                message = await receive_json(ws)
                if message["type"] != "frame":
                    continue
                frames.append(message)
                if busy_since is None and (message["totals"]["rps"] or 0) > 0:
                    busy_since = time.monotonic()
            async with http.post(f"{sandbox_url}stop/", headers=csrf) as response:
                assert response.status == 200, await response.text()
            while (message := await ws.receive(timeout=20)).type == aiohttp.WSMsgType.TEXT:
                pass
            assert message.type == aiohttp.WSMsgType.CLOSE, message
            return snapshot, frames, ws.close_code


async def receive_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next JSON message, skipping HTML fragments (those start with ``<``)."""
    while True:
        text = await ws.receive_str(timeout=10)
        if text.startswith("{"):
            message: dict[str, Any] = json.loads(text)
            return message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "True"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/0"}, "False"),  # compose runs `supervise`
        ({"REDIS_URL": "redis://127.0.0.1:6379/0", "SANDBOX_SUPERVISOR_IN_PROCESS": "yes"}, "True"),
        ({"SANDBOX_SUPERVISOR_IN_PROCESS": "off"}, "False"),
        ({"SANDBOX_SUPERVISOR_IN_PROCESS": "maybe"}, "expected true or false, got 'maybe'"),
    ],
)
def test_the_supervisor_runs_in_the_web_process_by_default_only_without_redis(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "diffsettings"],
        cwd=REPO,
        env={**embedded_env(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode:
        assert f"SANDBOX_SUPERVISOR_IN_PROCESS: {expected}" in result.stderr
    else:
        lines = result.stdout.splitlines()
        assert f"SANDBOX_SUPERVISOR_IN_PROCESS = {expected}  ###" in lines


def start_serve(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    """`manage.py serve` as a terminal runs it: Ctrl+C (SIGINT) reaches it (a process
    started in the background of a script would inherit SIGINT ignored)."""
    import signal

    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            fetch(f"http://127.0.0.1:{port}/healthz")
            return server
        except OSError:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "serve did not answer within 30 s"
            time.sleep(0.1)


def test_ctrl_c_stops_cleanly_and_the_next_start_picks_the_sandbox_up(tmp_path: Path) -> None:
    """Ctrl+C on `make run` stops it cleanly; the sandbox it ran keeps running and the next
    start supervises it again (the README says so)."""
    import signal

    env = embedded_env(tmp_path)
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "-v", "0"], cwd=REPO, env=env, check=True)
    subprocess.run([*manage, "demo_users"], cwd=REPO, env=env, check=True, capture_output=True)
    engine = LocalEngine(tmp_path / "sandboxes")
    server = start_serve(env, free_port())
    try:
        launched = subprocess.run(
            [*manage, "sandbox", "launch", "hello-cluster", "--user", "learner", "--wait"],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        sandbox_id = launched.split()[0]
        time.sleep(1)  # the supervisor follows it
        server.send_signal(signal.SIGINT)
        first = server.communicate(timeout=10)[0]  # how fast: bench/serve_stop.py
        assert server.returncode == 0, first
        assert f"supervising sandbox {sandbox_id}" in first
        assert [info.sandbox_id for info in engine.list_sandboxes()] == [sandbox_id]
        assert {s.state for s in engine.status(sandbox_id)} == {"running"}  # left running

        server = start_serve(env, free_port())
        time.sleep(2)  # start-up housekeeping, then the supervisor finds it
        server.send_signal(signal.SIGINT)
        second = server.communicate(timeout=30)[0]
        assert f"supervising sandbox {sandbox_id}" in second  # picked up again
        assert "Traceback" not in first + second
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        for info in engine.list_sandboxes():
            engine.destroy(info.sandbox_id)
