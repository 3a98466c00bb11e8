"""`manage.py serve` run as `make run` runs it, with real Docker sandboxes, for the
browser tests of the live lab (the `platform` fixture is in conftest.py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Page

from tests.conftest import REPO, shared_test_database_url

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # screenshots of the e2e tests

PASSWORD = "a-long-enough-passphrase-1"
INSTANCE = f"e2e-lab-{os.getpid()}"
STATE_UP = re.compile(r"\bstate-up\b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Platform:
    """`manage.py serve` on the test database with the Docker engine, as a process that a
    test can restart (on the same port: open pages reconnect to it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "SANDBOX_ENGINE"}}
        self.env.update(
            DEBUG="true",
            DATABASE_URL=shared_test_database_url(),
            SANDBOX_ENGINE="docker",
            SANDBOX_INSTANCE=INSTANCE,
            DISTLAB_VAR_DIR=str(folder),
        )
        self.log = (folder / "serve.log").open("a")
        self.server: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.server = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(self.port)],
            cwd=REPO,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.base}/", timeout=2).close()
                return
            except OSError:
                assert self.server.poll() is None, self.output()
                assert time.monotonic() < deadline, "serve did not answer within 60 s"
                time.sleep(0.2)

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.terminate()
        try:
            self.server.wait(30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait(10)
        self.server = None

    def output(self) -> str:
        self.log.flush()
        return (self.folder / "serve.log").read_text()


def shot(page: Page, name: str) -> None:
    """The whole sandbox panel (graph, charts, forms and log), whatever the viewport (the
    sticky site header would otherwise be drawn across it)."""
    page.add_style_tag(content=".site-header { position: static; }")
    page.locator("#sandbox").screenshot(path=str(ARTIFACTS / f"{name}.png"))


def node(page: Page, name: str):  # type: ignore[no-untyped-def]
    return page.locator(f'g.gnode[data-node="{name}"]')


def wait_until(page: Page, expression: str, timeout: float = 15.0) -> None:
    """Until the JavaScript ``expression`` is true in the page. Polled through DevTools
    (``page.evaluate``): Playwright's ``wait_for_function`` polls with ``eval`` inside the
    page, which the site's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {expression}")
        page.wait_for_timeout(100)
