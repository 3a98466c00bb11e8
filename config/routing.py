"""WebSocket routes, mounted by ``config/asgi.py`` behind origin and session checks."""

from __future__ import annotations

from typing import Any

websocket_urlpatterns: list[Any] = []
