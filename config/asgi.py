"""ASGI entry point: HTTP through Django, WebSockets through Channels."""

from __future__ import annotations

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# Build the Django application first: it sets up the app registry that the routing
# modules (consumers, models) need when they are imported below.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from config.routing import websocket_urlpatterns  # noqa: E402
from config.websocket import SameOriginValidator  # noqa: E402

# Everything loaded so far (Django, the apps, templates' code) lives as long as the
# process: keep it out of the collector's scans, and collect the young generation less
# often. A page that renders thousands of objects (the classroom dashboard of a class of
# 200) otherwise triggered a full collection every few requests: its p95 went from about
# 330 ms to 110-150 ms on the reference machine (bench/dashboard.py).
gc.freeze()
gc.set_threshold(10_000, 20, 20)

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
