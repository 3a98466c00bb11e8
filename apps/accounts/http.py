"""Request types for views: ``request.htmx`` from django-htmx, a typed user."""

from __future__ import annotations

from django.http import HttpRequest as DjangoHttpRequest
from django_htmx.middleware import HtmxDetails

from apps.accounts.models import User


class HttpRequest(DjangoHttpRequest):
    htmx: HtmxDetails


class AuthedHttpRequest(HttpRequest):
    user: User
