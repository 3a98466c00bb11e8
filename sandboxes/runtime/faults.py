"""The fault layer's state: which faults are active on this node, validated on the way in.

Kinds handled by the runtime (the engine does kill, pause and restart itself):

- ``latency``: ``ms`` (0 to 30000) plus or minus ``jitter_ms`` (0 to 30000, default 0) added
  before handling each inbound request and before sending each outbound call.
- ``errors``: a share ``rate`` (0 to 1, default 1) of inbound requests is answered at once
  with ``status`` (500 or 503, default 503) instead of reaching the program.
- ``drop``: a share ``rate`` (0 to 1, default 1) of inbound requests is never answered (the
  connection is held until the caller gives up) and of outbound calls is never sent (the
  call fails when its own timeout expires).
- ``partition``: from and to the named ``peers`` (or ``["*"]`` for every one), inbound
  connections are closed without an answer and outbound calls fail at once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

RUNTIME_KINDS = ("latency", "errors", "drop", "partition")
ENGINE_KINDS = ("kill", "pause", "restart")
MAX_LATENCY_MS = 30_000
ERROR_STATUSES = (500, 503)
EVERYONE = "*"

PARAMS: dict[str, tuple[str, ...]] = {
    "latency": ("ms", "jitter_ms"),
    "errors": ("rate", "status"),
    "drop": ("rate",),
    "partition": ("peers",),
}


class FaultError(ValueError):
    """A fault message the runtime refuses; the message is shown to people."""


def check_kind(kind: Any) -> str:
    if kind in RUNTIME_KINDS:
        return str(kind)
    if kind in ENGINE_KINDS:
        raise FaultError(f"{kind!r} is done by the engine, not by the node runtime")
    raise FaultError(f"unknown fault kind {kind!r}: expected one of {', '.join(RUNTIME_KINDS)}")


def _number(kind: str, key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FaultError(f"{kind}: {key} must be a number, got {value!r}")
    if not low <= value <= high:
        raise FaultError(f"{kind}: {key} must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Latency:
    ms: float
    jitter_ms: float = 0.0

    def draw_s(self) -> float:
        """One delay, in seconds, uniformly within ``ms ± jitter_ms`` (never negative)."""
        ms = (
            self.ms + random.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else self.ms
        )
        return max(0.0, ms) / 1000


@dataclass(frozen=True)
class Errors:
    rate: float
    status: int = 503


@dataclass(frozen=True)
class Drop:
    rate: float


@dataclass(frozen=True)
class Partition:
    peers: frozenset[str]

    def cuts(self, peer: str | None) -> bool:
        """Whether traffic with ``peer`` (None: a caller that did not say who it is) is cut."""
        return EVERYONE in self.peers or (peer is not None and peer in self.peers)


def parse(kind: str, params: Mapping[str, Any], *, self_name: str, peers: Collection[str]) -> Any:
    """Validate one fault message's parameters and return the fault (raises FaultError)."""
    unknown = sorted(set(params) - set(PARAMS[kind]))
    if unknown:
        expected = ", ".join(PARAMS[kind])
        raise FaultError(f"{kind}: unknown parameter {unknown[0]!r} (expected {expected})")
    if kind == "latency":
        if "ms" not in params:
            raise FaultError("latency: ms is required")
        ms = _number(kind, "ms", params["ms"], 0, MAX_LATENCY_MS)
        jitter = _number(kind, "jitter_ms", params.get("jitter_ms", 0), 0, MAX_LATENCY_MS)
        return Latency(ms, jitter)
    if kind == "errors":
        rate = _number(kind, "rate", params.get("rate", 1.0), 0, 1)
        status = params.get("status", 503)
        if isinstance(status, bool) or status not in ERROR_STATUSES:
            raise FaultError(f"errors: status must be 500 or 503, got {status!r}")
        return Errors(rate, int(status))
    if kind == "drop":
        return Drop(_number(kind, "rate", params.get("rate", 1.0), 0, 1))
    names = params.get("peers")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise FaultError('partition: peers must be a non-empty list of node names, or ["*"]')
    for name in names:
        if name == self_name:
            raise FaultError(f"partition: a node cannot be partitioned from itself ({name!r})")
        if name != EVERYONE and name not in peers:
            raise FaultError(f"partition: unknown peer {name!r}")
    return Partition(frozenset(names))


def describe(fault: Any) -> dict[str, Any]:
    """The parameters of a fault as JSON (what ``state`` reports and events carry)."""
    if isinstance(fault, Latency):
        return {"ms": fault.ms, "jitter_ms": fault.jitter_ms}
    if isinstance(fault, Errors):
        return {"rate": fault.rate, "status": fault.status}
    if isinstance(fault, Drop):
        return {"rate": fault.rate}
    if isinstance(fault, Partition):
        return {"peers": sorted(fault.peers)}
    raise TypeError(fault)


class Faults:
    """The active faults of one node. Reading is cheap: the request path checks ``any``."""

    def __init__(self) -> None:
        self.latency: Latency | None = None
        self.errors: Errors | None = None
        self.drop: Drop | None = None
        self.partition: Partition | None = None
        self.any = False

    def set(self, kind: str, fault: Any) -> None:
        setattr(self, kind, fault)
        self._update()

    def clear(self, kind: str | None = None) -> list[str]:
        """Clear one kind (or all); return the kinds that were active."""
        kinds = [kind] if kind is not None else list(RUNTIME_KINDS)
        cleared = [k for k in kinds if getattr(self, k) is not None]
        for k in cleared:
            setattr(self, k, None)
        self._update()
        return cleared

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {k: describe(f) for k in RUNTIME_KINDS if (f := getattr(self, k)) is not None}

    def cuts(self, peer: str | None) -> bool:
        return self.partition is not None and self.partition.cuts(peer)

    def drops(self) -> bool:
        return self.drop is not None and random.random() < self.drop.rate

    def error_status(self) -> int | None:
        if self.errors is not None and random.random() < self.errors.rate:
            return self.errors.status
        return None

    def delay_s(self) -> float:
        return self.latency.draw_s() if self.latency is not None else 0.0

    def _update(self) -> None:
        self.any = any(getattr(self, k) is not None for k in RUNTIME_KINDS)
