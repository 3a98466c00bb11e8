"""What stands in front of every WebSocket: the origin must be this very site.

Channels' ``AllowedHostsOriginValidator`` accepts any scheme and port of an allowed host
(``http://lab.example.org:9999`` for a site served at ``https://lab.example.org``). Here the
``Origin`` must equal the site the browser connected to, scheme, host and port (or be one
of ``CSRF_TRUSTED_ORIGINS``), and that host must be allowed; anything else is refused
before the application sees it. Unknown paths are closed with 4404 instead of an error.
"""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

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
