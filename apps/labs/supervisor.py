"""The telemetry supervisor: follows every running sandbox's nodes and publishes frames
and events to the sandbox's channel-layer group (``sandbox.<hex>``).

One thread per node follows its output through the engine (``engine.follow``) and feeds
the sandbox's ``Aggregator``; events go out at once from that thread. The main loop
(``Supervisor.run``) looks at the database and the engine at least once a second (new
sandboxes, stopped ones, added or removed nodes, faults), publishes a frame per sandbox
every ``interval`` seconds, and stores each sandbox's snapshot in the cache about once a
second for viewers that connect (``snapshot_cache_key``).

Each frame and event is one channel-layer message (``layer_message``) carrying it both as
``data`` and as its JSON ``text``, encoded once here rather than once per viewer.
Publishing never blocks a follower or the main loop: messages are handed to an asyncio
loop (the supervisor's own thread, or the ASGI server's loop when it runs in-process,
which the in-memory channel layer needs) and a backlog of unsent frames is dropped,
latest wins; events are never dropped by the supervisor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from channels.exceptions import ChannelFull
from django.core.cache import cache
from django.db import close_old_connections, connections

from apps.labs.engine.base import Engine, EngineError
from apps.labs.models import Fault, Sandbox
from apps.labs.node_status import status_cache_key, status_store
from apps.labs.patterns import PatternError, load_pattern
from apps.labs.telemetry import Aggregator, NodeView, parse_line

log = logging.getLogger(__name__)

SCAN_SECONDS = 1.0  # how often the database and the engine are asked
SNAPSHOT_SECONDS = 1.0
SNAPSHOT_TTL = 600  # seconds a stored snapshot outlives its supervisor
REATTACH_SECONDS = 5.0  # how far back a follower starts when it (re)attaches
RETRY_SECONDS = 1.0  # before following a node again after its follower ended
FRAME_INTERVAL = 0.125  # seconds between a sandbox's frames: 8 a second
MAX_PENDING_FRAMES = 50  # unsent frames beyond this are dropped (latest wins)


def group_name(sandbox_id: str) -> str:
    return f"sandbox.{sandbox_id}"


def snapshot_cache_key(sandbox_id: str) -> str:
    return f"labs:snapshot:{sandbox_id}"


def inspect_cache_key(sandbox_id: str) -> str:
    """Where the collector's traces and log lines are (``Aggregator.inspect``), for a
    pattern that declares ``observe.traces`` or ``observe.logs``: apart from the snapshot,
    which every viewer gets when it connects."""
    return f"labs:inspect:{sandbox_id}"


def layer_message(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """The channel-layer message for a frame or an event: ``data``, and ``text``, its JSON
    encoded once here for every viewer (each consumer forwards it as it is)."""
    return {"type": f"sandbox.{kind}", "data": data, "text": json.dumps(data)}


@dataclass
class _Follower:
    thread: threading.Thread
    stop: threading.Event
    last_ts: float = 0.0


@dataclass
class _Watched:
    sandbox_id: str
    aggregator: Aggregator
    since: float
    followers: dict[str, _Follower] = field(default_factory=dict)
    ended_at: dict[str, float] = field(default_factory=dict)  # node → when its follower ended


class Supervisor:
    def __init__(
        self,
        engine: Engine,
        layer: Any,
        *,
        interval: float = FRAME_INTERVAL,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.engine = engine
        self.layer = layer
        self.interval = interval
        self._loop = loop
        self._own_loop = loop is None
        self._watched: dict[str, _Watched] = {}
        self._lock = threading.Lock()
        self._pending_frames = 0
        self._stop = threading.Event()
        self._scan_error = ""

    # --- the main loop -----------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Supervise until ``stop`` is set, then let go of every node."""
        loop_thread = self._start_loop() if self._own_loop else None
        next_scan = next_snapshot = 0.0
        try:
            while not stop.is_set():
                started = time.monotonic()
                if started >= next_scan:
                    next_scan = started + SCAN_SECONDS
                    self._scan_safely()
                self._publish_frames()
                if started >= next_snapshot:
                    next_snapshot = started + SNAPSHOT_SECONDS
                    self._store_snapshots()
                stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            self._stop.set()
            for watched in list(self._watched.values()):
                self._release(watched)
            self._store_snapshots()
            self._watched.clear()
            if loop_thread is not None and self._loop is not None:
                self._close_loop(self._loop, loop_thread)
            connections.close_all()

    def _start_loop(self) -> threading.Thread:
        loop = asyncio.new_event_loop()
        self._loop = loop
        thread = threading.Thread(target=loop.run_forever, name="supervisor-publish", daemon=True)
        thread.start()
        return thread

    def _close_loop(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        """Close the layer's connections made on our loop (channels_redis keeps a pool
        per loop), then the loop."""
        close_pools = getattr(self.layer, "close_pools", None)
        if close_pools is not None:
            try:
                asyncio.run_coroutine_threadsafe(close_pools(), loop).result(timeout=5)
            except Exception:
                log.warning("closing the channel layer's connections failed", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()

    def _scan_safely(self) -> None:
        try:
            close_old_connections()
            self.scan()
            self._scan_error = ""
        except Exception as exc:  # the database or the engine hiccuped: try again next scan
            if str(exc) != self._scan_error:  # the traceback once, not every second
                log.exception("supervisor scan failed")
            else:
                log.warning("supervisor scan failed again: %s", exc)
            self._scan_error = str(exc)

    def scan(self) -> None:
        """Start following new sandboxes and nodes, let go of stopped ones."""
        running = {s.hex: s for s in Sandbox.objects.filter(state=Sandbox.State.RUNNING)}
        for sandbox_id in list(self._watched.keys() - running.keys()):
            self._end(sandbox_id)
        faults: dict[str, list[dict[str, Any]]] = {}
        for fault in Fault.objects.filter(
            sandbox__state=Sandbox.State.RUNNING, reverted_at__isnull=True
        ).select_related("node", "sandbox"):
            if fault.is_active:
                faults.setdefault(fault.sandbox.hex, []).append(
                    {"node": fault.node.name, "kind": fault.kind, "params": fault.params}
                )
        now = time.time()
        for sandbox_id, sandbox in running.items():
            watched = self._watched.get(sandbox_id)
            if watched is None:
                watched = self._watch(sandbox, now)
            try:
                statuses = self.engine.status(sandbox_id)
            except EngineError as exc:
                log.warning("status of sandbox %s failed: %s", sandbox_id, exc)
                continue
            status_store(sandbox_id, statuses)  # the sandbox panel's node list reads it
            views = [NodeView(s.name, s.role, s.state, s.exit_code) for s in statuses]
            self._send_events(
                sandbox_id,
                watched.aggregator.update_status(
                    nodes=views, faults=faults.get(sandbox_id, []), now=now
                ),
            )
            self._follow_nodes(watched, [v.name for v in views if v.state != "missing"])

    def _watch(self, sandbox: Sandbox, now: float) -> _Watched:
        try:
            spec = load_pattern(sandbox.pattern).telemetry_spec()
        except PatternError as exc:  # the sandbox still streams, without its pattern's view
            log.warning("sandbox %s: %s", sandbox.hex, exc)
            spec = None
        aggregator = Aggregator(spec)
        stored = cache.get(snapshot_cache_key(sandbox.hex))
        if isinstance(stored, dict):
            aggregator.resume(stored)
        since = now - REATTACH_SECONDS
        if sandbox.created_at is not None:
            since = max(since, sandbox.created_at.timestamp())
        watched = _Watched(sandbox.hex, aggregator, since)
        with self._lock:
            self._watched[sandbox.hex] = watched
        log.info("supervising sandbox %s", sandbox.hex)
        return watched

    def _follow_nodes(self, watched: _Watched, names: list[str]) -> None:
        for name in list(watched.followers.keys() - set(names)):
            follower = watched.followers.pop(name)
            follower.stop.set()
        now = time.monotonic()
        for name in names:
            old = watched.followers.get(name)
            if old is not None and old.thread.is_alive():
                continue
            if old is not None:  # ended (engine error): follow again after a pause
                watched.ended_at.setdefault(name, now)
                if now - watched.ended_at[name] < RETRY_SECONDS:
                    continue
                watched.ended_at.pop(name, None)
            since = max(watched.since, old.last_ts if old else 0.0)
            stop = threading.Event()
            new = _Follower(threading.Thread(daemon=True), stop, since)
            new.thread = threading.Thread(
                target=self._follow,
                args=(watched, name, new),
                name=f"follow-{watched.sandbox_id[:8]}-{name}",
                daemon=True,
            )
            watched.followers[name] = new
            new.thread.start()

    def _follow(self, watched: _Watched, name: str, follower: _Follower) -> None:
        try:
            for raw in self.engine.follow(
                watched.sandbox_id, name, since=follower.last_ts or None, stop=follower.stop
            ):
                if follower.stop.is_set():
                    return
                line = parse_line(raw)
                if line is None:
                    continue
                line["node"] = name  # whatever the line claims: it came from this node
                follower.last_ts = max(follower.last_ts, float(line["ts"]))
                self._send_events(watched.sandbox_id, watched.aggregator.ingest(line))
        except EngineError as exc:
            log.info("following %s of %s ended: %s", name, watched.sandbox_id, exc)
        except Exception:
            log.exception("following %s of %s failed", name, watched.sandbox_id)

    def _release(self, watched: _Watched) -> None:
        for follower in watched.followers.values():
            follower.stop.set()
        for follower in watched.followers.values():
            follower.thread.join(timeout=2)

    def _end(self, sandbox_id: str) -> None:
        with self._lock:
            watched = self._watched.pop(sandbox_id)
        self._release(watched)
        state = (
            Sandbox.objects.filter(pk=sandbox_id).values_list("state", flat=True).first() or "gone"
        )
        self._send_events(sandbox_id, [watched.aggregator.ended(now=time.time(), state=state)])
        cache.delete_many(
            [
                snapshot_cache_key(sandbox_id),
                inspect_cache_key(sandbox_id),
                status_cache_key(sandbox_id),
            ]
        )
        log.info("stopped supervising sandbox %s (%s)", sandbox_id, state)

    # --- publishing --------------------------------------------------------------------

    def followers(self, sandbox_id: str) -> dict[str, bool]:
        """For tests and diagnostics: node → whether its follower thread is alive."""
        with self._lock:
            watched = self._watched.get(sandbox_id)
        if watched is None:
            return {}
        return {name: f.thread.is_alive() for name, f in watched.followers.items()}

    def _publish_frames(self) -> None:
        now = time.time()
        with self._lock:
            watched = list(self._watched.values())
        for item in watched:
            frame = item.aggregator.frame(now)
            with self._lock:
                if self._pending_frames >= MAX_PENDING_FRAMES:
                    continue  # the layer is behind: this frame is superseded by the next
                self._pending_frames += 1
            self._submit(
                self.layer.group_send(group_name(item.sandbox_id), layer_message("frame", frame)),
                on_done=self._frame_sent,
            )

    def _frame_sent(self) -> None:
        with self._lock:
            self._pending_frames -= 1

    def _send_events(self, sandbox_id: str, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        # Stored before they are sent: a viewer that joins the group after the send still
        # finds them in the snapshot it reads at connect (one that joins just before gets
        # them twice; the page drops repeats).
        with self._lock:
            watched = self._watched.get(sandbox_id)
        if watched is not None:
            self._store_snapshot(watched, time.time())
        for event in events:
            self._submit(
                self.layer.group_send(group_name(sandbox_id), layer_message("event", event))
            )

    def _submit(
        self, coro: Coroutine[Any, Any, Any], on_done: Callable[[], None] | None = None
    ) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            if on_done:
                on_done()
            return

        def done(future: Future[Any]) -> None:
            if on_done:
                on_done()
            exc = future.exception() if not future.cancelled() else None
            if isinstance(exc, ChannelFull):
                log.warning("channel layer full: a message was dropped")
            elif exc is not None:
                log.warning("channel layer error: %s", exc)

        try:
            asyncio.run_coroutine_threadsafe(coro, loop).add_done_callback(done)
        except RuntimeError:  # the loop was closed meanwhile
            coro.close()
            if on_done:
                on_done()

    def _store_snapshots(self) -> None:
        now = time.time()
        with self._lock:
            watched = list(self._watched.values())
        for item in watched:
            self._store_snapshot(item, now)

    def _store_snapshot(self, item: _Watched, now: float) -> None:
        try:
            cache.set(
                snapshot_cache_key(item.sandbox_id),
                item.aggregator.snapshot(now),
                timeout=SNAPSHOT_TTL,
            )
            if item.aggregator.inspects:
                cache.set(
                    inspect_cache_key(item.sandbox_id),
                    item.aggregator.inspect(),
                    timeout=SNAPSHOT_TTL,
                )
        except Exception:
            log.exception("storing the snapshot of %s failed", item.sandbox_id)
