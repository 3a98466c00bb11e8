"""The Content-Security-Policy every response carries: scripts, styles, images, fonts
and connections (the lab's WebSocket) from this site only, nothing may frame it, and
forms post only to it. Whatever a node or a chapter manages to get into a page as markup
cannot load or run a script.

Styles allow ``'unsafe-inline'``: htmx's indicators and the chapters' Mermaid diagrams
insert style elements, and styles run no code. Scripts allow nothing inline and no eval.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", POLICY)
        return response
