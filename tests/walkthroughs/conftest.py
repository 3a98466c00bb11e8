"""Walkthroughs run on Docker where it answers (always in CI), else on local processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from apps.labs.engine import get_engine
from tests.walkthroughs.lab import walkthrough_engine


@pytest.fixture
def walk_engine(settings, tmp_path: Path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    name = walkthrough_engine()
    if name == "docker":
        from tests.labs.engine.conftest import docker_engine

        docker_engine()  # the image, built if missing
    settings.SANDBOX_ENGINE = name
    settings.VAR_DIR = tmp_path
    settings.SANDBOX_INSTANCE = f"test-{os.getpid()}"
    get_engine.cache_clear()
    yield name
    get_engine.cache_clear()
