"""Headless Chromium (Debian's package) driven by Playwright, against the live server."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from tests.conftest import require
from tests.e2e.platform import ARTIFACTS, INSTANCE, Platform
from tests.labs.engine.conftest import docker_engine

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    # Playwright's sync API runs an event loop in this thread while the test also uses
    # the ORM synchronously: tell Django that is intended, for this test only.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    path = chromium_path()
    require(path is not None, "Chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        refused = watch_csp(browser)
        yield browser
        browser.close()
        # Every page the test opened ran within the Content-Security-Policy.
        assert not refused, refused[:5]
        # ORM calls made while Playwright's loop runs get connections of their own
        # (asgiref's context-local storage): close them here, in the same context.
        connections.close_all()


def watch_csp(browser: Any) -> list[str]:
    """What the Content-Security-Policy refused, in any page of any context of ``browser``."""
    refused: list[str] = []
    new_context = browser.new_context

    def watched(*args: Any, **kwargs: Any) -> Any:
        context = new_context(*args, **kwargs)
        context.on(
            "console",
            lambda message: (
                refused.append(message.text) if "Content Security Policy" in message.text else None
            ),
        )
        return context

    browser.new_context = watched
    return refused


@pytest.fixture
def page(browser, live_server):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=live_server.url)
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def shot(page, name: str, full_page: bool = False) -> Path:  # type: ignore[no-untyped-def]
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    """A running platform; every sandbox it made is removed afterwards, whatever happened."""
    from apps.labs.engine.docker import DockerEngine

    docker_engine()  # a Docker engine and the sandbox image (required in CI)
    running = Platform(tmp_path)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        output = running.output()
        running.log.close()
        engine = DockerEngine(instance=INSTANCE)
        for info in engine.list_sandboxes():
            engine.destroy(info.sandbox_id)
        print(output[-4000:])  # shown when the test fails
        assert "Traceback" not in output, output[-4000:]
