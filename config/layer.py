"""Sending to the channel layer from synchronous code: a request, a task, a signal.

On Redis any thread may send: ``async_to_sync`` runs the send on a loop of its own (or on
the server's loop, from a request's thread) and channels_redis keeps a connection pool
per loop. The in-memory layer (``make run``, one process) is tied to the one loop its
consumers run on, so a message sent on another loop sits in a queue nobody is woken
for: ``manage.py serve`` then binds the server's loop here (``bind_loop``), and every
send from any thread is handed to that loop. From a thread that runs a loop of its own
(none of ours; Playwright's sync API in tests does) the send is scheduled on it, since
such a thread must not block on another loop.

Sending is fire and forget: what it carries is news for open pages, never a reason to
fail the request or task that caused it.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)
_bound: asyncio.AbstractEventLoop | None = None


def bind_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """The loop every consumer runs on, for the in-memory layer (None: unbind)."""
    global _bound
    _bound = loop


def _failed(future: Future[Any] | asyncio.Future[Any]) -> None:
    exc = None if future.cancelled() else future.exception()
    if exc is not None:
        log.warning("a message to the channel layer was lost: %s", exc)


def group_send(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    bound = _bound
    if bound is not None and not bound.is_closed():
        asyncio.run_coroutine_threadsafe(layer.group_send(group, message), bound).add_done_callback(
            _failed
        )
        return
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:  # the usual case: a request's or a task's thread
        running = None
    if running is not None:
        running.create_task(layer.group_send(group, message)).add_done_callback(_failed)
        return
    try:
        async_to_sync(layer.group_send)(group, message)
    except Exception as exc:
        log.warning("a message to the channel layer was lost: %s", exc)
