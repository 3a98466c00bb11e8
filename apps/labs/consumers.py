"""The live sandbox stream: ``/ws/sandboxes/<id>/``.

At connect the viewer is checked (``sandbox_get_for_user``), joins the sandbox's group and
gets a snapshot (nodes, last frame, history, recent events) and the event log as an HTML
fragment; then frames and events from the supervisor are forwarded as they come, each
event also as an HTML fragment for the log (JSON messages start with ``{``, fragments with
``<``: the page hands JSON to its own code and fragments to htmx's WebSocket extension).
Refusals are sent as close codes after accepting, so browsers see them (a refusal before
accepting reaches them as a bare 403):

* 4401 not signed in · 4404 no such sandbox, or not yours · 4410 the sandbox is not active
* 4409 the user already has ``settings.SOCKETS_PER_USER`` streams open (other tabs)
* 4413 a client message over ``MAX_MESSAGE_BYTES`` · 4429 more than ``MAX_MESSAGES`` client
  messages in ``RATE_WINDOW_S`` seconds.

Each open stream holds one of its user's slots in the cache (shared by every web process),
refreshed while it is open and freed when it closes, or ``SLOT_TTL_S`` after a process died.

The only client message so far is ``{"type": "ping"}`` (answered ``{"type": "pong"}``).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from importlib import import_module
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.template.loader import render_to_string
from django.utils.crypto import constant_time_compare

from apps.labs import selectors, services
from apps.labs.models import ACTIVE_STATES, Sandbox
from apps.labs.supervisor import group_name, snapshot_cache_key
from apps.labs.telemetry import empty_snapshot

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_TOO_MANY_SOCKETS = 4409
CLOSE_GONE = 4410
CLOSE_TOO_BIG = 4413
CLOSE_TOO_MANY = 4429
MAX_MESSAGE_BYTES = 4096
MAX_MESSAGES = 20
RATE_WINDOW_S = 5.0
TOUCH_EVERY_S = 60.0
SLOT_TTL_S = 3 * TOUCH_EVERY_S
EVENT_OOB = "labs/sandbox.html#event_oob"
EVENTS = "labs/sandbox.html#events"
# The supervisor's messages (``apps/labs/supervisor.py``) and their handlers.
SUPERVISOR_MESSAGES = {"sandbox.frame": "sandbox_frame", "sandbox.event": "sandbox_event"}
UNKNOWN_MESSAGE = 'Unknown message: the only message accepted is {"type": "ping"}.'
BAD_JSON = "Messages must be JSON objects."
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
    ``touch``, postpone the sandbox's idle expiry."""
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    data = store.load() if session_key and store.exists(session_key) else {}
    signed_in = str(data.get(SESSION_KEY)) == str(user.pk) and constant_time_compare(
        str(data.get(HASH_SESSION_KEY, "")), user.get_session_auth_hash()
    )
    if not signed_in:
        return CLOSE_UNAUTHENTICATED
    if touch:
        services.sandbox_touch(sandbox=sandbox)
    state = Sandbox.objects.filter(pk=sandbox.pk).values_list("state", flat=True).first()
    return None if state in ACTIVE_STATES else CLOSE_GONE


def _slot_key(user_id: int, index: int) -> str:
    return f"labs:ws-slot:{user_id}:{index}"


class SandboxConsumer(AsyncJsonWebsocketConsumer):
    sandbox: Sandbox | None = None
    group: str | None = None
    touched: float | None = None  # monotonic time of the last check (and touch)
    slot: str | None = None  # the cache key of the user's slot this stream holds

    async def connect(self) -> None:
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if not await self._take_slot(user.pk):
            await self.close(code=CLOSE_TOO_MANY_SOCKETS)
            return
        try:
            sandbox = await _sandbox_for(user, self.scope["url_route"]["kwargs"]["sandbox_id"])
        except (Http404, PermissionDenied):
            await self.close(code=CLOSE_NOT_FOUND)
            return
        if not sandbox.is_active:
            await self.close(code=CLOSE_GONE)
            return
        self.sandbox = sandbox
        self.is_owner = sandbox.owner_id == user.pk
        self.received: deque[float] = deque(maxlen=MAX_MESSAGES + 1)
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

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            self.group = None
        await self._free_slot()

    async def _take_slot(self, user_id: int) -> bool:
        """One of the user's open-stream slots (``cache.add`` is atomic), or False: a few
        tabs per user, so that one user's hundreds of sockets cannot slow the site."""
        for index in range(settings.SOCKETS_PER_USER):
            key = _slot_key(user_id, index)
            if await cache.aadd(key, self.channel_name, timeout=SLOT_TTL_S):
                self.slot = key
                return True
        return False

    async def _free_slot(self) -> None:
        slot, self.slot = self.slot, None
        if slot is not None and await cache.aget(slot) == self.channel_name:
            await cache.adelete(slot)

    async def _keep_alive(self) -> None:
        """The owner watching keeps the sandbox from idle expiry (checked once a minute,
        when it also notices a sandbox that has ended and a viewer who signed out)."""
        now = time.monotonic()
        if self.sandbox is None or (
            self.touched is not None and now - self.touched < TOUCH_EVERY_S
        ):
            return
        previous, self.touched = self.touched, now
        if self.slot is not None and previous is not None:  # taken at connect: still fresh
            await cache.atouch(self.slot, timeout=SLOT_TTL_S)
        session = self.scope.get("session")
        code = await _check(
            self.sandbox,
            touch=self.is_owner,
            user=self.scope["user"],
            session_key=session.session_key if session is not None else None,
        )
        if code is not None:
            await self._close(code)

    async def _close(self, code: int) -> None:
        await self.disconnect(code)
        await self.close(code=code)

    # --- from the client ---------------------------------------------------------------

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        if self.group is None:
            return
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > MAX_MESSAGE_BYTES:
            await self._close(CLOSE_TOO_BIG)
            return
        now = time.monotonic()
        self.received.append(now)
        if len(self.received) > MAX_MESSAGES and now - self.received[0] < RATE_WINDOW_S:
            await self._close(CLOSE_TOO_MANY)
            return
        try:
            content = json.loads(text_data) if text_data is not None else None
        except ValueError:
            content = None
        if not isinstance(content, dict):
            await self.send_json({"type": "error", "message": BAD_JSON})
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if content.get("type") == "ping":
            await self.send_json({"type": "pong"})
        else:
            await self.send_json({"type": "error", "message": UNKNOWN_MESSAGE})

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
            await self._close(CLOSE_GONE)
