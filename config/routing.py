"""WebSocket routes, mounted by ``config/asgi.py`` behind origin and session checks."""

from __future__ import annotations

from typing import Any

from django.urls import path, re_path

from apps.classrooms.consumers import ClassroomConsumer
from apps.labs.consumers import SandboxConsumer
from config.websocket import NotFoundConsumer

websocket_urlpatterns: list[Any] = [
    path("ws/sandboxes/<str:sandbox_id>/", SandboxConsumer.as_asgi()),
    path("ws/classrooms/<int:classroom_id>/", ClassroomConsumer.as_asgi()),
    re_path(r"", NotFoundConsumer.as_asgi()),  # last: anything else is closed with 4404
]
