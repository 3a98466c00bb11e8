"""WebSocket routes, mounted by ``config/asgi.py`` behind origin and session checks."""

from __future__ import annotations

from typing import Any

from django.urls import path

from apps.labs.consumers import SandboxConsumer

websocket_urlpatterns: list[Any] = [
    path("ws/sandboxes/<str:sandbox_id>/", SandboxConsumer.as_asgi()),
]
