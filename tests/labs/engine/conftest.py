"""Engines for the shared engine suite: every test in test_contract.py runs against the
local-process engine and against Docker (required in CI)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from apps.labs.engine.base import Engine, NodeSpec, SandboxSpec
from apps.labs.patterns import load_pattern
from tests.conftest import require


def docker_engine() -> Engine:
    from apps.labs.engine.base import EngineError
    from apps.labs.engine.docker import DockerEngine

    engine = DockerEngine()
    try:
        engine.ping()
    except EngineError as exc:
        require(False, f"a Docker engine ({exc})")
    from apps.labs.image import ensure_image

    ensure_image(engine.client)
    return engine


@pytest.fixture(params=["local", "docker"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "docker":
        yield docker_engine()
    else:
        from apps.labs.engine.local import LocalEngine

        yield LocalEngine(tmp_path / "sandboxes")


def lb_spec(*, replicas: int = 3, owner: str = "tester") -> SandboxSpec:
    pattern = load_pattern("replicated-lb")
    nodes = tuple(
        NodeSpec(name=n.name, role=n.role, program=n.program, env=n.env)
        for n in pattern.expand(count_overrides={"replica": replicas})
    )
    return SandboxSpec(
        sandbox_id=uuid.uuid4().hex,
        owner=owner,
        pattern="replicated-lb",
        expires_at=timezone.now() + timedelta(minutes=10),
        nodes=nodes,
    )


@pytest.fixture
def spec_factory(engine: Engine) -> Iterator[object]:
    """Makes sandbox specs and destroys whatever they created, even if a test fails."""
    made: list[SandboxSpec] = []

    def make(**kwargs: object) -> SandboxSpec:
        spec = lb_spec(**kwargs)  # type: ignore[arg-type]
        made.append(spec)
        return spec

    yield make
    for spec in made:
        engine.destroy(spec.sandbox_id)
