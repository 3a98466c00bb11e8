"""Chaos: Redis (cache, channel layer, broker) stops under a running site and comes back.
Meanwhile pages serve, people sign in, a launch is accepted (queued by housekeeping once
the broker is back) and /readyz says what is wrong; afterwards everything answers again,
and nothing crashed (no traceback in the server's log)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from apps.accounts.models import User
from apps.courses.models import Chapter
from apps.labs.models import Sandbox
from tests.conftest import REPO, require, shared_test_database_url

pytestmark = pytest.mark.django_db(transaction=True)
PASSWORD = "a-long-enough-passphrase-1"
CHAPTER = "/chapters/replicated-load-balanced-services/"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server of the test's own, on a port of its own (the machine's is shared)."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        require(binary is not None, "redis-server (apt-get install redis-server)")
        self.binary = str(binary)
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def site(redis_server: RedisServer, tmp_path: Path, settings) -> Iterator[str]:  # type: ignore[no-untyped-def]
    port = free_port()
    env = {
        **os.environ,
        "DEBUG": "true",
        "DATABASE_URL": shared_test_database_url(),
        "REDIS_URL": redis_server.url,
        "SANDBOX_ENGINE": "local",
        "DISTLAB_VAR_DIR": str(tmp_path / "var"),
        "CONTENT_DIR": str(settings.CONTENT_DIR),
    }
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(f"{base}/healthz", timeout=2)
            break
        except requests.ConnectionError:
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    yield base
    server.terminate()
    server.wait(30)
    log.close()
    output = (tmp_path / "serve.log").read_text()
    print(output[-3000:])
    assert "Traceback" not in output, output[-3000:]


def signed_in(base: str, username: str) -> requests.Session:
    session = requests.Session()
    page = session.get(f"{base}/accounts/login/", timeout=5)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None
    answer = session.post(
        f"{base}/accounts/login/",
        data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": token[1]},
        headers={"Referer": f"{base}/accounts/login/"},
        allow_redirects=False,
        timeout=5,
    )
    assert answer.status_code == 302, answer.text[-500:]
    return session


def served(session: requests.Session, url: str) -> requests.Response:
    started = time.monotonic()
    response = session.get(url, timeout=10)
    assert response.status_code == 200, (url, response.status_code)
    assert time.monotonic() - started < 3, f"{url} took {time.monotonic() - started:.1f} s"
    return response


def test_the_site_serves_through_a_redis_restart(
    site: str, redis_server: RedisServer, course: list[Chapter]
) -> None:
    for name in ("alice", "bob"):
        User.objects.create_user(username=name, password=PASSWORD)
    alice = signed_in(site, "alice")
    served(alice, f"{site}{CHAPTER}")

    redis_server.stop()
    served(alice, f"{site}{CHAPTER}")
    served(alice, f"{site}/")
    bob = signed_in(site, "bob")  # sign-in works: its throttles are open meanwhile
    served(bob, f"{site}/chapters/introduction/")
    ready = requests.get(f"{site}/readyz", timeout=10)
    assert ready.status_code == 503 and "redis" in ready.text.lower()

    # A launch is accepted and recorded; its task waits for the broker (housekeeping).
    page = served(alice, f"{site}{CHAPTER}")
    token = re.search(r'"X-CSRFToken": "([^"]+)"', page.text)
    assert token is not None
    launched = alice.post(
        f"{site}/sandboxes/launch/replicated-lb/",
        headers={"X-CSRFToken": token[1], "Referer": f"{site}{CHAPTER}"},
        allow_redirects=False,
        timeout=15,
    )
    assert launched.status_code in {200, 302}, launched.text[-500:]
    assert Sandbox.objects.get(owner__username="alice").state == Sandbox.State.REQUESTED

    redis_server.start()  # same port: clients reconnect
    served(alice, f"{site}{CHAPTER}")
    deadline = time.monotonic() + 10
    while requests.get(f"{site}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "/readyz did not recover"
        time.sleep(0.5)
