"""Telemetry: one compact JSON line per event on stdout (the schema is in TELEMETRY.md).

Lines are buffered and written at most ``FLUSH_INTERVAL_S`` after the event (at once when
the buffer fills, and for ``state`` events), so a busy node makes a few write calls per
second instead of one per request.
Nothing else may go to stdout: logs and tracebacks go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, BinaryIO

SCHEMA_VERSION = 1
FLUSH_INTERVAL_S = 0.1
FLUSH_BYTES = 64 * 1024
RESERVED_FIELDS = frozenset({"v", "ts", "node", "type"})
# ``state`` events the runtime writes itself; a program's own events (``node.event``) use
# other names. ``set`` carries a declared state's new value (``node.set_state``).
RUNTIME_EVENTS = frozenset(
    {
        "started",
        "stopped",
        "failed",
        "fault",
        "fault_cleared",
        "config",
        "peers",
        "task_failed",
        "set",
    }
)


class Telemetry:
    def __init__(self, node: str, out: BinaryIO | None = None) -> None:
        self.node = node
        self._out = out if out is not None else sys.stdout.buffer
        self._chunks: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._encode = json.JSONEncoder(
            separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str
        ).encode

    def emit(self, type_: str, **fields: Any) -> None:
        """Queue one event line. Fields must be JSON values; ``v``, ``ts``, ``node`` and
        ``type`` are set here and cannot be overridden."""
        if not RESERVED_FIELDS.isdisjoint(fields):
            raise ValueError(f"telemetry fields {sorted(RESERVED_FIELDS)} are reserved")
        record: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "ts": round(time.time(), 4),
            "node": self.node,
            "type": type_,
        }
        record.update(fields)
        line = (self._encode(record) + "\n").encode()
        self._chunks.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES or type_ == "state":  # state changes: rare, wanted now
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # outside the event loop (start-up, shutdown): write now
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._chunks:
            return
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        try:
            self._out.write(data)
            self._out.flush()
        except (BrokenPipeError, ValueError):
            pass  # nobody reads our stdout any more: the events are lost, the node serves on
