"""Django's Redis cache, made to keep the site serving while Redis is away.

The cache holds nothing a page cannot do without: sign-in and sign-up throttles, the
per-user stream slots, the lab's last snapshot. While Redis does not answer (restarting,
unreachable) reads find nothing, writes are dropped and ``add`` says it added, so pages,
sign-in and launches go on (throttles are open meanwhile; Axes' lockouts live in the
database and still hold); one warning every ``WARN_EVERY_S`` says so. Redis back, the
client reconnects on the next call.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.core.cache.backends.redis import RedisCache
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)
WARN_EVERY_S = 30.0
UNREACHABLE = (RedisConnectionError, RedisTimeoutError)
F = TypeVar("F", bound=Callable[..., Any])
_warned_at = 0.0


def _warn(exc: Exception) -> None:
    global _warned_at
    now = time.monotonic()
    if now - _warned_at >= WARN_EVERY_S:
        _warned_at = now
        log.warning("cache: Redis does not answer (%s); serving without the cache", exc)


def _or(fallback: Callable[..., Any]) -> Callable[[F], F]:
    """Call the method; while Redis is unreachable, ``fallback(*args, **kwargs)`` instead."""

    def wrap(method: F) -> F:
        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except UNREACHABLE as exc:
                _warn(exc)
                return fallback(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def _default(key: Any, default: Any = None, *args: Any, **kwargs: Any) -> Any:
    return default


def _delta(key: Any, delta: int = 1, *args: Any, **kwargs: Any) -> int:
    return delta


class ResilientRedisCache(RedisCache):
    get = _or(_default)(RedisCache.get)
    get_many = _or(lambda *a, **k: {})(RedisCache.get_many)
    has_key = _or(lambda *a, **k: False)(RedisCache.has_key)
    add = _or(lambda *a, **k: True)(RedisCache.add)
    set = _or(lambda *a, **k: None)(RedisCache.set)
    set_many = _or(lambda *a, **k: [])(RedisCache.set_many)
    touch = _or(lambda *a, **k: False)(RedisCache.touch)
    delete = _or(lambda *a, **k: False)(RedisCache.delete)
    delete_many = _or(lambda *a, **k: None)(RedisCache.delete_many)
    incr = _or(_delta)(RedisCache.incr)
