"""The live sandbox stream: ``/ws/sandboxes/<id>/``.

At connect the viewer is checked (``sandbox_get_for_user``), joins the sandbox's group and
gets a snapshot (nodes, last frame, history, recent events) and the event log as an HTML
fragment; then frames and events from the supervisor are forwarded as they come, each
event also as an HTML fragment for the log (JSON messages start with ``{``, fragments with
``<``: the page hands JSON to its own code and fragments to htmx's WebSocket extension).
Refusals and limits are the ones of every live stream (``config.websocket.LiveStream``):
4401 not signed in, 4404 no such sandbox or not yours, 4410 the sandbox is not active, 4409
too many streams open, 4413 and 4429 for oversized and flooding client messages.

The only client message so far is ``{"type": "ping"}`` (answered ``{"type": "pong"}``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from channels.db import database_sync_to_async
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.template.loader import render_to_string

from apps.labs import selectors, services
from apps.labs.models import ACTIVE_STATES, Sandbox
from apps.labs.supervisor import group_name, snapshot_cache_key
from apps.labs.telemetry import empty_snapshot
from config.websocket import (  # noqa: F401 (the stream's close codes and limits, named here too)
    CLOSE_GONE,
    CLOSE_NOT_FOUND,
    CLOSE_TOO_BIG,
    CLOSE_TOO_MANY,
    CLOSE_TOO_MANY_SOCKETS,
    CLOSE_UNAUTHENTICATED,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGES,
    UNKNOWN_MESSAGE,
    LiveStream,
    signed_in,
)

TOUCH_EVERY_S = 60.0
EVENT_OOB = "labs/sandbox.html#event_oob"
EVENTS = "labs/sandbox.html#events"
# The supervisor's messages (``apps/labs/supervisor.py``) and their handlers.
SUPERVISOR_MESSAGES = {"sandbox.frame": "sandbox_frame", "sandbox.event": "sandbox_event"}
# An event's ``severity`` that the log marks (absent: info, unmarked).
SEVERITIES = {"warning": "Warning", "error": "Error"}


def _event_context(event: Mapping[str, Any]) -> dict[str, Any]:
    ts = event.get("ts")
    when = datetime.fromtimestamp(ts, UTC) if isinstance(ts, int | float) else None
    severity = event.get("severity")
    severity = severity if isinstance(severity, str) and severity in SEVERITIES else ""
    return {
        "kind": str(event.get("kind", "")),
        "severity": severity,
        "severity_label": SEVERITIES.get(severity, ""),
        "node": str(event.get("node") or ""),
        "text": str(event.get("text", "")),
        "ts": ts if when else "",
        "iso": when.isoformat() if when else "",
        "clock": when.strftime("%H:%M:%S UTC") if when else "",
    }


def render_event(event: Mapping[str, Any]) -> str:
    """One event as an htmx out-of-band fragment that goes on top of the event log."""
    return render_to_string(EVENT_OOB, {"event": _event_context(event)})


def render_events(events: Iterable[Mapping[str, Any]]) -> str:
    """The whole event log (newest first), replacing the page's."""
    return render_to_string(EVENTS, {"events": [_event_context(e) for e in events]})


@database_sync_to_async
def _sandbox_for(user: Any, sandbox_id: str) -> Sandbox:
    return selectors.sandbox_get_for_user(user=user, sandbox_id=sandbox_id)


@database_sync_to_async
def _check(sandbox: Sandbox, *, touch: bool, user: Any, session_key: str | None) -> int | None:
    """Why the stream must end now (a close code), or None: the viewer signed out (or
    changed password) since connecting, or the sandbox is no longer active. With
    ``touch``, postpone the sandbox's idle expiry. (One hop to the database thread.)"""
    if not signed_in(user, session_key):
        return CLOSE_UNAUTHENTICATED
    if touch:
        services.sandbox_touch(sandbox=sandbox)
    state = Sandbox.objects.filter(pk=sandbox.pk).values_list("state", flat=True).first()
    return None if state in ACTIVE_STATES else CLOSE_GONE


class SandboxConsumer(LiveStream):
    sandbox: Sandbox | None = None
    touched: float | None = None  # monotonic time of the last check (and touch)

    async def connect(self) -> None:
        await self.accept()
        user = await self.open_for()
        if user is None:
            return
        try:
            sandbox = await _sandbox_for(user, self.scope["url_route"]["kwargs"]["sandbox_id"])
        except (Http404, PermissionDenied):
            await self.close_with(CLOSE_NOT_FOUND)
            return
        if not sandbox.is_active:
            await self.close_with(CLOSE_GONE)
            return
        self.sandbox = sandbox
        self.is_owner = sandbox.owner_id == user.pk
        self.group = group_name(sandbox.hex)
        await self.channel_layer.group_add(self.group, self.channel_name)
        snapshot = await cache.aget(snapshot_cache_key(sandbox.hex))
        if not isinstance(snapshot, dict):
            snapshot = empty_snapshot(time.time())
        await self.send_json(snapshot)
        # The event log, newest first, as a fragment the page swaps in whole (a reconnect
        # replaces it rather than repeating events).
        await self.send(text_data=render_events(reversed(snapshot.get("events") or [])))
        await self._keep_alive()

    async def _keep_alive(self) -> None:
        """The owner watching keeps the sandbox from idle expiry (checked once a minute,
        when it also notices a sandbox that has ended and a viewer who signed out)."""
        now = time.monotonic()
        if self.sandbox is None or (
            self.touched is not None and now - self.touched < TOUCH_EVERY_S
        ):
            return
        previous, self.touched = self.touched, now
        if previous is not None:  # the slot was taken at connect: still fresh
            await self.touch_slot()
        code = await _check(
            self.sandbox, touch=self.is_owner, user=self.scope["user"], session_key=self.session_key
        )
        if code is not None:
            await self.close_with(code)

    # --- from the supervisor -----------------------------------------------------------

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Frames and events go straight to their handler. Channels would first close stale
        database connections, a hop to the one database thread for every message of every
        viewer (hundreds a second, all in a queue); these handlers do not use the database,
        and what does (``_check``) closes stale connections itself."""
        if message["type"] in SUPERVISOR_MESSAGES:
            await getattr(self, SUPERVISOR_MESSAGES[message["type"]])(message)
        else:
            await super().dispatch(message)

    async def _forward(self, message: dict[str, Any]) -> None:
        """The supervisor's JSON as it encoded it (``text``: once for every viewer), or
        ``data`` encoded here."""
        text = message.get("text")
        if isinstance(text, str):
            await self.send(text_data=text)
        else:
            await self.send_json(message["data"])

    async def sandbox_frame(self, message: dict[str, Any]) -> None:
        if self.group is None:
            return
        await self._forward(message)
        await self._keep_alive()

    async def sandbox_event(self, message: dict[str, Any]) -> None:
        if self.group is None:
            return
        await self._forward(message)
        await self.send(text_data=render_event(message["data"]))
        if message["data"].get("kind") == "sandbox_ended":
            await self.close_with(CLOSE_GONE)
