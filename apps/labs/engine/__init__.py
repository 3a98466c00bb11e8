"""Engine backends and the choice between them (setting ``SANDBOX_ENGINE``)."""

from __future__ import annotations

import functools
import logging

from django.conf import settings

from apps.labs.engine.base import Engine, EngineError, EngineUnavailable, NodeNotFound

__all__ = ["Engine", "EngineError", "EngineUnavailable", "NodeNotFound", "get_engine"]

log = logging.getLogger(__name__)


def _docker() -> Engine:
    from apps.labs.engine.docker import DockerEngine

    return DockerEngine.from_settings()


def _local() -> Engine:
    from apps.labs.engine.local import LocalEngine

    return LocalEngine(settings.VAR_DIR / "sandboxes")


@functools.cache
def get_engine() -> Engine:
    """The configured engine: ``docker``, ``local``, or ``auto`` (Docker when an engine
    answers, local processes otherwise). Chosen once per process."""
    choice = settings.SANDBOX_ENGINE
    if choice == "docker":
        return _docker()
    if choice == "local":
        return _local()
    try:
        engine = _docker()
        engine.ping()
    except (EngineError, ImportError) as exc:
        log.warning("no Docker engine answers (%s): sandboxes run as local processes", exc)
        return _local()
    return engine
