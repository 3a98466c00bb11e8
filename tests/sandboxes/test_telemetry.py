"""The telemetry writer: batched, prompt, and strict about its fixed fields."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest

from sandboxes.runtime.telemetry import FLUSH_INTERVAL_S, Telemetry


class Out(io.BytesIO):
    writes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


def lines(out: Out) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_lines_are_batched_and_written_within_the_flush_interval() -> None:
    out = Out()
    telemetry = Telemetry("replica-1", out)
    for n in range(50):
        telemetry.emit("request", status=200, ms=float(n))
    assert out.writes == 0
    deadline = time.monotonic() + 10 * FLUSH_INTERVAL_S
    while out.writes == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert out.writes == 1  # one write for the whole batch
    written = lines(out)
    assert len(written) == 50
    assert written[0] == {
        "v": 1,
        "ts": written[0]["ts"],
        "node": "replica-1",
        "type": "request",
        "status": 200,
        "ms": 0.0,
    }
    assert [w["ms"] for w in written] == [float(n) for n in range(50)]


async def test_state_events_are_written_at_once_after_what_came_before() -> None:
    out = Out()
    telemetry = Telemetry("lb", out)
    telemetry.emit("call", status=200)
    telemetry.emit("state", event="ejected", target="replica-2")
    assert [w["type"] for w in lines(out)] == ["call", "state"]


def test_outside_an_event_loop_lines_are_written_at_once() -> None:
    out = Out()
    Telemetry("lb", out).emit("request", status=200)
    assert len(lines(out)) == 1


def test_the_fixed_fields_cannot_be_overridden() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Telemetry("lb", Out()).emit("request", node="someone-else")
