"""Who is asking, and how often: the client's address (behind trusted proxies only) and
counters in the shared cache that limit sign-ups, password resets and failed sign-ins per
address, and a user's sandbox launches and fault injections.

The address is ``REMOTE_ADDR`` unless that is one of ``settings.TRUSTED_PROXIES`` (a
reverse proxy in front of Distlab): then it is the right-most address of
``X-Forwarded-For`` that is not a trusted proxy itself. Addresses a client writes further
left in the header are ignored, so nobody can pose as another address; and without a
trusted proxy the header is not read at all.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import cache

from django.conf import settings
from django.core.cache import cache as shared
from django.http import HttpRequest

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@cache
def _trusted(proxies: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _is_trusted(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _trusted(tuple(settings.TRUSTED_PROXIES)))


def client_address(request: HttpRequest) -> str:
    """The address of the client that sent ``request`` (also Axes' ``AXES_CLIENT_IP_CALLABLE``)."""
    remote = str(request.META.get("REMOTE_ADDR") or "")
    if not _is_trusted(remote):
        return remote
    forwarded = str(request.META.get("HTTP_X_FORWARDED_FOR") or "")
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if not _is_trusted(hop):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return remote  # garbage from a proxy we trust: take the proxy's own
    return remote


@dataclass(frozen=True)
class Limit:
    """At most ``count`` events per ``seconds`` for one key (an address, an email)."""

    name: str
    count: int
    seconds: int

    def _key(self, who: str) -> str:
        return f"throttle:{self.name}:{who}"

    def used(self, who: str) -> int:
        """Events counted in the current window."""
        return int(shared.get(self._key(who), 0))

    def exceeded(self, who: str) -> bool:
        return self.used(who) >= self.count

    def hit(self, who: str) -> None:
        key = self._key(who)
        if shared.add(key, 1, timeout=self.seconds):  # the window starts at the first event
            return
        try:
            shared.incr(key)
        except ValueError:  # expired in between
            shared.add(key, 1, timeout=self.seconds)


def signups() -> Limit:
    return Limit("signup", settings.SIGNUPS_PER_ADDRESS_PER_HOUR, 3600)


def password_resets() -> Limit:
    return Limit("password-reset", settings.PASSWORD_RESETS_PER_HOUR, 3600)


def launches() -> Limit:
    """Launch attempts per user (refused ones too: a learner hammering Launch)."""
    return Limit("launch", settings.LAUNCHES_PER_MINUTE, 60)


def fault_injections() -> Limit:
    """Faults a user injects from the lab per minute (experiments' and drills' own steps
    are not counted: they are bounded by their specs)."""
    return Limit("fault", settings.FAULTS_PER_MINUTE, 60)


def login_failures() -> Limit:
    seconds = int(settings.AXES_COOLOFF_TIME.total_seconds())
    return Limit("login-failure", settings.LOGIN_FAILURES_PER_ADDRESS, seconds)
