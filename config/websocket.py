"""What stands in front of every WebSocket: the origin must be this very site.

Channels' ``AllowedHostsOriginValidator`` accepts any scheme and port of an allowed host
(``http://lab.example.org:9999`` for a site served at ``https://lab.example.org``). Here the
``Origin`` must equal the site the browser connected to, scheme, host and port (or be one
of ``CSRF_TRUSTED_ORIGINS``), and that host must be allowed; anything else is refused
before the application sees it. Unknown paths are closed with 4404 instead of an error.

``LiveStream`` is what every live stream (a sandbox's, a classroom dashboard's) shares
behind that: a few open streams per user, bounded and rate-limited client messages (only
``{"type": "ping"}``, answered ``{"type": "pong"}``), a check that the viewer is still
signed in, and refusals sent as close codes after accepting, so browsers see them (a
refusal before accepting reaches them as a bare 403):

* 4401 not signed in · 4404 no such thing, or not yours · 4410 it is no longer there
* 4409 the user already has ``settings.SOCKETS_PER_USER`` streams open (other tabs)
* 4413 a client message over ``MAX_MESSAGE_BYTES`` · 4429 more than ``MAX_MESSAGES`` client
  messages in ``RATE_WINDOW_S`` seconds.

Each open stream holds one of its user's slots in the cache (shared by every web process),
refreshed while it is open (``touch_slot``) and freed when it closes, or ``SLOT_TTL_S``
after a process died.
"""

from __future__ import annotations

import json
import time
from collections import deque
from importlib import import_module
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY
from django.core.cache import cache
from django.http.request import split_domain_port, validate_host
from django.utils.crypto import constant_time_compare

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_TOO_MANY_SOCKETS = 4409
CLOSE_GONE = 4410
CLOSE_TOO_BIG = 4413
CLOSE_TOO_MANY = 4429
MAX_MESSAGE_BYTES = 4096
MAX_MESSAGES = 20
RATE_WINDOW_S = 5.0
SLOT_TTL_S = 180.0
UNKNOWN_MESSAGE = 'Unknown message: the only message accepted is {"type": "ping"}.'
BAD_JSON = "Messages must be JSON objects."

DEFAULT_PORTS = {"http": "80", "https": "443"}


def _header(scope: dict[str, Any], name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin1")
    return ""


def _normal(scheme: str, host: str) -> str:
    domain, port = split_domain_port(host.lower())
    if not domain or port == DEFAULT_PORTS.get(scheme):
        port = ""
    return f"{scheme}://{domain}{':' + port if port else ''}"


def expected_origin(scope: dict[str, Any]) -> str | None:
    """The origin of the site this connection reached, or None when its host is not
    one of ``ALLOWED_HOSTS``."""
    host = _header(scope, b"host")
    domain, _ = split_domain_port(host.lower())
    if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
        return None
    secure = scope.get("scheme") == "wss"
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy is not None:  # TLS ends at a trusted proxy, which says so
        header = proxy[0].removeprefix("HTTP_").lower().replace("_", "-").encode()
        secure = secure or _header(scope, header) == proxy[1]
    return _normal("https" if secure else "http", host)


class SameOriginValidator:
    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        origin = _header(scope, b"origin")
        expected = expected_origin(scope)
        if origin and expected is not None:
            scheme = origin.split("://", 1)[0].lower()
            given = _normal(scheme, origin.split("://", 1)[-1]) if "://" in origin else ""
            if given == expected or origin in settings.CSRF_TRUSTED_ORIGINS:
                return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)


class NotFoundConsumer(AsyncWebsocketConsumer):
    """Any path no consumer serves: accepted, then closed with 4404 (not a server error)."""

    async def connect(self) -> None:
        await self.accept()
        await self.close(code=4404)


def _slot_key(user_id: int, index: int) -> str:
    return f"labs:ws-slot:{user_id}:{index}"


def signed_in(user: Any, session_key: str | None) -> bool:
    """Whether the session the stream opened with still belongs to ``user`` (not signed
    out, password not changed since)."""
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    data = store.load() if session_key and store.exists(session_key) else {}
    return str(data.get(SESSION_KEY)) == str(user.pk) and constant_time_compare(
        str(data.get(HASH_SESSION_KEY, "")), user.get_session_auth_hash()
    )


class LiveStream(AsyncJsonWebsocketConsumer):
    """The base of every live stream (see the module's docstring). A subclass accepts,
    calls ``open_for`` (a signed-in user and a free slot, or a close code sent), then sets
    ``group`` once it has joined it; ``None`` means closed, and client messages are ignored."""

    group: str | None = None
    slot: str | None = None  # the cache key of the user's slot this stream holds

    async def open_for(self) -> Any:
        """The signed-in user, holding one of their slots; or None, the stream closed."""
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return None
        if not await self._take_slot(user.pk):
            await self.close(code=CLOSE_TOO_MANY_SOCKETS)
            return None
        self.received: deque[float] = deque(maxlen=MAX_MESSAGES + 1)
        return user

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            self.group = None
        await self._free_slot()

    async def close_with(self, code: int) -> None:
        await self.disconnect(code)
        await self.close(code=code)

    @property
    def session_key(self) -> str | None:
        session = self.scope.get("session")
        return session.session_key if session is not None else None

    async def still_signed_in(self) -> bool:
        """(A hop to the database thread: a subclass that checks more at the same time
        calls ``signed_in`` in its own hop instead.)"""
        return await database_sync_to_async(signed_in)(self.scope["user"], self.session_key)

    async def _take_slot(self, user_id: int) -> bool:
        """One of the user's open-stream slots (``cache.add`` is atomic), or False: a few
        tabs per user, so that one user's hundreds of sockets cannot slow the site."""
        for index in range(settings.SOCKETS_PER_USER):
            key = _slot_key(user_id, index)
            if await cache.aadd(key, self.channel_name, timeout=SLOT_TTL_S):
                self.slot = key
                return True
        return False

    async def touch_slot(self) -> None:
        if self.slot is not None:
            await cache.atouch(self.slot, timeout=SLOT_TTL_S)

    async def _free_slot(self) -> None:
        slot, self.slot = self.slot, None
        if slot is not None and await cache.aget(slot) == self.channel_name:
            await cache.adelete(slot)

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        if self.group is None:
            return
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > MAX_MESSAGE_BYTES:
            await self.close_with(CLOSE_TOO_BIG)
            return
        now = time.monotonic()
        self.received.append(now)
        if len(self.received) > MAX_MESSAGES and now - self.received[0] < RATE_WINDOW_S:
            await self.close_with(CLOSE_TOO_MANY)
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
