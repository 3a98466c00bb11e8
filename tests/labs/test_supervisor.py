"""The telemetry supervisor on a real sandbox (local-process engine): frames match the
traffic sent, events arrive at once, a restarted supervisor re-attaches, and a stopped
sandbox is let go."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer

from apps.accounts.models import User
from apps.labs import services
from apps.labs.engine.base import Engine
from apps.labs.models import Sandbox
from apps.labs.supervisor import Supervisor, group_name
from tests.config.test_background import REDIS_URL, redis_answers
from tests.conftest import require
from tests.labs.engine.test_contract import wait_for

pytestmark = pytest.mark.django_db(transaction=True)
RPS = 40
TOLERANCE = 0.25


class Viewer:
    """A member of the sandbox's group, receiving on its own event loop (the loop the
    supervisor publishes on, as in the web process with the in-memory layer)."""

    def __init__(self, group: str, layer: Any) -> None:
        self.layer = layer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.shared_loop = False
        self.lock = threading.Lock()
        self.task = asyncio.run_coroutine_threadsafe(self._receive(group), self.loop)

    async def _receive(self, group: str) -> None:
        channel = await self.layer.new_channel()
        await self.layer.group_add(group, channel)
        while True:
            message = await self.layer.receive(channel)
            with self.lock:
                self.received.append((time.monotonic(), message))

    def messages(self, kind: str, after: float = 0.0) -> list[dict[str, Any]]:
        with self.lock:
            return [m["data"] for t, m in self.received if m["type"] == kind and t >= after]

    def frames_since(self, after: float) -> list[dict[str, Any]]:
        return self.messages("sandbox.frame", after)

    def events(self, after: float = 0.0) -> list[dict[str, Any]]:
        return self.messages("sandbox.event", after)

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._cancel_all(), self.loop).result(timeout=5)
        if isinstance(self.layer, RedisChannelLayer):
            asyncio.run_coroutine_threadsafe(self.layer.flush(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class Running:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.stop = threading.Event()
        self.thread = threading.Thread(target=supervisor.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def sandbox(local_engine: Engine, learner: User) -> Iterator[Sandbox]:
    created = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    sandbox = services.sandbox_start(sandbox_id=created.hex)
    services.sandbox_control(sandbox=sandbox, control_id="rps", value=RPS)
    yield sandbox
    local_engine.destroy(sandbox.hex)


def near(value: float, target: float) -> bool:
    return abs(value - target) <= TOLERANCE * target


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def viewer(request: pytest.FixtureRequest, sandbox: Sandbox) -> Iterator[Viewer]:
    """With the in-memory layer the supervisor publishes on the viewer's loop (as it would
    on the web server's loop in-process); with Redis it runs its own loop (the command)."""
    if request.param == "redis":
        require(redis_answers(), f"Redis at {REDIS_URL}")
        layer: Any = RedisChannelLayer(hosts=[REDIS_URL], prefix=f"distlab-test-{os.getpid()}")
    else:
        layer = InMemoryChannelLayer(capacity=1000)
    viewer = Viewer(group_name(sandbox.hex), layer)
    viewer.shared_loop = request.param == "memory"
    yield viewer
    viewer.close()


def supervisor(engine: Engine, viewer: Viewer) -> Supervisor:
    if viewer.shared_loop:
        return Supervisor(engine, viewer.layer, loop=viewer.loop)  # the default rate
    # Its own connection to Redis, as from its own process.
    layer = RedisChannelLayer(hosts=[REDIS_URL], prefix=viewer.layer.prefix)
    return Supervisor(engine, layer)


def test_it_streams_frames_and_events_survives_a_restart_and_lets_go(
    local_engine: Engine, sandbox: Sandbox, viewer: Viewer
) -> None:
    running = Running(supervisor(local_engine, viewer))
    try:
        # Frames reflect the configured traffic, several times a second.
        def steady() -> bool:
            frames = viewer.frames_since(time.monotonic() - 1.0)[-3:]
            return len(frames) == 3 and all(
                near(f["nodes"]["traffic"]["rps"], RPS)
                and near(f["nodes"]["lb"]["rps"], RPS)
                and near(f["totals"]["rps"], RPS)
                and near(f["links"]["traffic>lb"]["rps"], RPS)
                for f in frames
            )

        wait_for(steady, timeout=15, what=f"frames at about {RPS} requests/s")
        since = time.monotonic()
        wait_for(lambda: time.monotonic() - since >= 2.0, timeout=3)
        frames = viewer.frames_since(since)
        assert len(frames) >= 8, f"{len(frames)} frames in 2 s: fewer than 4 a second"
        frame = frames[-1]
        assert [f["seq"] for f in frames] == sorted(f["seq"] for f in frames)
        replicas = sum(frame["nodes"][f"replica-{i}"]["rps"] for i in (1, 2, 3))
        assert near(replicas, RPS), frame["nodes"]
        assert {n["state"] for n in frame["nodes"].values()} == {"up"}
        # Sampled calls for the moving dots: bounded per frame, and over the 2 s most of the
        # traffic's calls (one frame may carry none when the node's output comes in a burst).
        sampled = [len(f["sample"]) for f in frames]
        assert max(sampled) <= 40 and sum(sampled) >= 2 * RPS, sampled
        assert frame["nodes"]["traffic"]["error_pct"] == 0.0
        with viewer.lock:  # each message also carries its JSON, encoded once for all viewers
            raw = [m for _, m in viewer.received]
        assert {m["type"] for m in raw} == {"sandbox.frame", "sandbox.event"}
        assert all(m["text"] == json.dumps(m["data"]) for m in raw)
        started = {e["node"] for e in viewer.events() if e["kind"] == "started"}
        assert started == {"replica-1", "replica-2", "replica-3", "lb", "traffic"}

        # Kill a replica: it goes down and the balancer's ejection arrives at once.
        services.fault_inject(
            sandbox=sandbox, node_name="replica-2", kind="kill", duration=60, enqueue=False
        )

        def ejected() -> dict[str, Any] | None:
            return next(
                (
                    e
                    for e in viewer.events()
                    if e["kind"] == "ejected" and e["data"]["target"] == "replica-2"
                ),
                None,
            )

        event = wait_for(ejected, timeout=5, what="replica-2 ejected")
        assert event["text"].startswith("lb ejected replica-2")
        wait_for(
            lambda: (
                {("replica-2", "down"), ("replica-2", "fault")}
                <= {(e["node"], e["kind"]) for e in viewer.events()}
            ),
            timeout=3,
            what="replica-2 down and its fault announced",
        )
        wait_for(
            lambda: (
                viewer.frames_since(time.monotonic() - 0.5)
                and viewer.frames_since(time.monotonic() - 0.5)[-1]["nodes"]["replica-2"]["state"]
                == "killed"
            ),
            timeout=3,
            what="replica-2 shown killed",
        )

        # A new supervisor re-attaches: frames flow again, nothing is announced twice.
        running.halt()
        restarted_at = time.monotonic()
        running = Running(supervisor(local_engine, viewer))
        wait_for(
            lambda: (
                len(frames := viewer.frames_since(restarted_at)) >= 4
                and near(frames[-1]["nodes"]["traffic"]["rps"], RPS)
                and frames[-1]["nodes"]["replica-2"]["state"] == "killed"
            ),
            timeout=10,
            what="frames after the restart",
        )
        again = [
            e for e in viewer.events(restarted_at) if e["kind"] in {"ejected", "started", "fault"}
        ]
        assert again == []

        # Stopping the sandbox ends its followers and tells the viewers.
        followers = list(running.supervisor.followers(sandbox.hex))
        assert set(followers) == {"replica-1", "replica-2", "replica-3", "lb", "traffic"}
        services.sandbox_stop(sandbox=sandbox, enqueue=False)
        wait_for(
            lambda: any(e["kind"] == "sandbox_ended" for e in viewer.events()),
            timeout=5,
            what="the sandbox_ended event",
        )
        assert running.supervisor.followers(sandbox.hex) == {}
        services.sandbox_teardown(sandbox_id=sandbox.hex)
        stopped_at = time.monotonic()
        wait_for(lambda: time.monotonic() - stopped_at > 1.0, timeout=2)
        assert viewer.frames_since(stopped_at) == []
        assert not [
            t for t in threading.enumerate() if t.name.startswith(f"follow-{sandbox.hex[:8]}")
        ]
    finally:
        running.halt()


def test_a_compromised_node_speaks_only_for_itself_and_cannot_stop_the_pipeline(
    local_engine: Engine, sandbox: Sandbox
) -> None:
    """What replica-1 writes is untrusted: forged lines (another node's name, a role with
    markup, calls as the balancer, a timestamp far in the future, JSON nested past the
    parser's depth, a 1 MB line, invalid UTF-8) are refused or attributed to replica-1,
    and frames keep flowing with the balancer's figures its own."""
    viewer = Viewer(group_name(sandbox.hex), InMemoryChannelLayer(capacity=1000))
    viewer.shared_loop = True
    running = Running(supervisor(local_engine, viewer))
    try:
        wait_for(lambda: len(viewer.frames_since(time.monotonic() - 1.0)) >= 3, timeout=15)
        now = time.time()
        forged = [
            {"type": "state", "event": "started", "node": "lb", "role": "<img src=x>"},
            {"type": "state", "event": "forged", "node": "lb", "text": "<b>lb says hi</b>"},
            *[
                {"type": "call", "node": "lb", "src": "lb", "dst": "replica-3", "status": 500,
                 "ms": 1.0, "route": "/"}
                for _ in range(200)
            ],
        ]  # fmt: skip
        lines = [json.dumps({"v": 1, "ts": now, **line}).encode() for line in forged]
        lines += [
            json.dumps({"v": 1, "ts": 1e20, "node": "a", "type": "state", "event": "x"}).encode(),
            b'{"v": 1, "ts": 1, "node": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b'{"v": 1, "ts": 1, "node": "replica-1", "pad": "' + b"a" * 1_000_000 + b'"}',
            b"\xff\xfe not utf-8",
        ]  # fmt: skip
        log = local_engine._dir(sandbox.hex) / "replica-1.log"  # type: ignore[attr-defined]
        with open(log, "ab") as out:
            out.write(b"\n".join(lines) + b"\n")
        forged_at = time.monotonic()

        def announced() -> dict[str, Any] | None:
            return next((e for e in viewer.events(forged_at) if e["kind"] == "forged"), None)

        event = wait_for(announced, timeout=10, what="the forged event, announced")
        assert event["node"] == "replica-1"  # not lb
        wait_for(lambda: len(viewer.frames_since(forged_at)) >= 3, timeout=5, what="frames")
        frame = viewer.frames_since(forged_at)[-1]
        assert frame["ts"] < time.time() + 5
        assert frame["nodes"]["lb"]["role"] == "balancer"
        assert frame["nodes"]["replica-1"]["role"] == "replica"
        # The 200 failed "lb" calls are not lb's: as lb's they would make nearly all of its
        # calls to replica-3 in the window fail (a loaded machine may fail a few real ones
        # while the replicas start, so the bound is not zero).
        lb_to_3 = frame["links"].get("lb>replica-3")
        assert lb_to_3 is None or lb_to_3["error_pct"] < 50, lb_to_3
        assert frame["nodes"]["lb"]["error_pct"] < 50
        assert running.supervisor.followers(sandbox.hex) == dict.fromkeys(
            ["replica-1", "replica-2", "replica-3", "lb", "traffic"], True
        )
    finally:
        running.halt()
        viewer.close()
