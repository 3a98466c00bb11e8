"""The live sandbox stream, against the real ASGI application with real session cookies."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.backends.db import SessionStore
from django.core.cache import cache
from django.db import connections
from django.test import Client
from django.utils import timezone

from apps.accounts.models import User
from apps.labs import consumers
from apps.labs.consumers import (
    CLOSE_TOO_MANY_SOCKETS,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGES,
    UNKNOWN_MESSAGE,
)
from apps.labs.models import Sandbox
from apps.labs.supervisor import group_name, layer_message, snapshot_cache_key
from config.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)
ORIGIN = (b"origin", b"http://localhost")
HOST = (b"host", b"localhost")


def _make_sandbox(owner: User, state: str = Sandbox.State.RUNNING) -> Sandbox:
    now = timezone.now()
    return Sandbox.objects.create(
        owner=owner,
        pattern="replicated-lb",
        state=state,
        expires_at=now + timedelta(minutes=30),
        last_seen_at=now - timedelta(minutes=5),
    )


def _cookie_for(user: User) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)  # a real session row and cookie (axes wants a request for login)
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


make_sandbox = sync_to_async(_make_sandbox)
cookie_for = sync_to_async(_cookie_for)


@pytest.fixture(autouse=True)
async def _close_db_connections(transactional_db: None) -> AsyncIterator[None]:
    """The consumers' database thread keeps a connection: close it, so a later test
    without database access does not trip over it."""
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture
def socket() -> Any:
    """Opens a WebSocket to a sandbox's stream; every one opened is disconnected."""
    opened: list[WebsocketCommunicator] = []

    def open_(sandbox: Sandbox | str, *headers: tuple[bytes, bytes]) -> WebsocketCommunicator:
        sandbox_id = sandbox.hex if isinstance(sandbox, Sandbox) else sandbox
        if not any(name == b"host" for name, _ in headers):
            headers = (*headers, HOST)  # as every browser sends it
        communicator = WebsocketCommunicator(
            application, f"/ws/sandboxes/{sandbox_id}/", headers=list(headers)
        )
        opened.append(communicator)
        return communicator

    return open_


async def receive_start(ws: WebsocketCommunicator) -> dict[str, Any]:
    """What a viewer gets at connect: the snapshot, then the event log as HTML."""
    snapshot = await ws.receive_json_from(timeout=2)
    log = await ws.receive_from(timeout=2)
    assert log.startswith('<ol class="event-log" id="event-log"')
    assert 'hx-swap-oob="true"' in log
    return dict(snapshot)


async def refused_with(communicator: WebsocketCommunicator) -> int:
    connected, _ = await communicator.connect()
    assert connected  # accepted, so that the browser sees the close code
    closing = await communicator.receive_output(timeout=2)
    assert closing["type"] == "websocket.close"
    await communicator.wait()
    return int(closing["code"])


async def test_it_streams_a_snapshot_then_frames_and_events_to_the_owner(
    learner: User, socket: Any
) -> None:
    sandbox = await make_sandbox(learner)
    stored = {"type": "snapshot", "v": 1, "ts": 1.0, "nodes": {}, "frame": None,
              "history": [{"ts": 1}], "events": []}  # fmt: skip
    await cache.aset(snapshot_cache_key(sandbox.hex), stored)
    ws = socket(sandbox, await cookie_for(learner), ORIGIN)
    connected, _ = await ws.connect()
    assert connected
    assert await receive_start(ws) == stored

    layer = get_channel_layer()
    frame = {"type": "frame", "v": 1, "seq": 7}
    await layer.group_send(group_name(sandbox.hex), {"type": "sandbox.frame", "data": frame})
    assert await ws.receive_json_from(timeout=2) == frame
    event = {"type": "event", "v": 1, "ts": 1764170000.5, "node": "lb", "kind": "ejected",
             "text": "lb ejected <replica-2>"}  # fmt: skip
    await layer.group_send(group_name(sandbox.hex), {"type": "sandbox.event", "data": event})
    assert await ws.receive_json_from(timeout=2) == event
    # …and the same event as a fragment that goes on top of the page's event log, escaped.
    fragment = await ws.receive_from(timeout=2)
    assert fragment.startswith('<div hx-swap-oob="afterbegin:#event-log"><li class="event')
    assert 'data-node="lb"' in fragment
    assert "lb ejected &lt;replica-2&gt;" in fragment
    assert 'datetime="2025-11-26T15:13:20.500000+00:00"' in fragment
    assert await ws.receive_nothing()
    await ws.disconnect()

    # Watching postponed idle expiry.
    await sandbox.arefresh_from_db()
    assert timezone.now() - sandbox.last_seen_at < timedelta(seconds=30)


async def test_without_a_stored_snapshot_it_sends_an_empty_one(learner: User, socket: Any) -> None:
    sandbox = await make_sandbox(learner)
    ws = socket(sandbox, await cookie_for(learner), ORIGIN)
    assert (await ws.connect())[0]
    snapshot = await receive_start(ws)
    assert snapshot["type"] == "snapshot"
    assert (snapshot["history"], snapshot["events"], snapshot["frame"]) == ([], [], None)
    assert await ws.receive_nothing()
    await ws.disconnect()


async def test_staff_may_watch_but_do_not_keep_it_alive(
    learner: User, instructor: User, socket: Any
) -> None:
    sandbox = await make_sandbox(learner)
    await User.objects.filter(pk=instructor.pk).aupdate(is_staff=True)
    ws = socket(sandbox, await cookie_for(instructor), ORIGIN)
    assert (await ws.connect())[0]
    assert (await receive_start(ws))["type"] == "snapshot"
    assert await ws.receive_nothing()
    await ws.disconnect()
    before = sandbox.last_seen_at
    await sandbox.arefresh_from_db()
    assert sandbox.last_seen_at == before


def _classroom_with(instructor: User, learner: User) -> None:
    from apps.classrooms.models import Membership
    from apps.classrooms.services import classroom_create

    room = classroom_create(owner=instructor, name=f"Class of {instructor.username}")
    Membership.objects.create(classroom=room, user=learner)


async def test_a_class_instructor_may_watch_and_another_gets_4404(
    learner: User, other_learner: User, instructor: User, socket: Any
) -> None:
    sandbox = await make_sandbox(learner)
    other = await sync_to_async(User.objects.create_user)(username="dave", role="instructor")
    await sync_to_async(_classroom_with)(instructor, learner)
    await sync_to_async(_classroom_with)(other, other_learner)
    ws = socket(sandbox, await cookie_for(instructor), ORIGIN)
    assert (await ws.connect())[0]
    assert (await receive_start(ws))["type"] == "snapshot"
    assert await ws.receive_nothing()
    await ws.disconnect()
    before = sandbox.last_seen_at
    await sandbox.arefresh_from_db()
    assert sandbox.last_seen_at == before  # watching does not keep it from idling out
    assert await refused_with(socket(sandbox, await cookie_for(other), ORIGIN)) == 4404


async def test_another_learner_gets_4404(learner: User, other_learner: User, socket: Any) -> None:
    sandbox = await make_sandbox(learner)
    assert await refused_with(socket(sandbox, await cookie_for(other_learner), ORIGIN)) == 4404


async def test_an_unknown_sandbox_gets_4404(learner: User, socket: Any) -> None:
    assert await refused_with(socket("0" * 32, await cookie_for(learner), ORIGIN)) == 4404
    assert await refused_with(socket("not-a-uuid", await cookie_for(learner), ORIGIN)) == 4404


async def test_an_anonymous_visitor_gets_4401(learner: User, socket: Any) -> None:
    sandbox = await make_sandbox(learner)
    assert await refused_with(socket(sandbox, ORIGIN)) == 4401


async def test_a_stopped_sandbox_gets_4410(learner: User, socket: Any) -> None:
    sandbox = await make_sandbox(learner, Sandbox.State.STOPPED)
    assert await refused_with(socket(sandbox, await cookie_for(learner), ORIGIN)) == 4410


async def test_another_origin_is_refused(learner: User, socket: Any) -> None:
    sandbox = await make_sandbox(learner)
    ws = socket(sandbox, await cookie_for(learner), (b"origin", b"http://evil.example"))
    connected, _ = await ws.connect()
    assert connected is False
    await ws.disconnect()


async def test_ping_pong_and_unknown_messages(learner: User, socket: Any) -> None:
    sandbox = await make_sandbox(learner)
    ws = socket(sandbox, await cookie_for(learner), ORIGIN)
    assert (await ws.connect())[0]
    await receive_start(ws)
    await ws.send_json_to({"type": "ping"})
    assert await ws.receive_json_from(timeout=2) == {"type": "pong"}
    await ws.send_json_to({"type": "kill", "node": "lb"})
    assert await ws.receive_json_from(timeout=2) == {"type": "error", "message": UNKNOWN_MESSAGE}
    await ws.send_to(text_data="not json")
    assert (await ws.receive_json_from(timeout=2))["type"] == "error"
    assert await ws.receive_nothing()
    await ws.disconnect()


async def test_an_oversized_message_closes_with_4413(learner: User, socket: Any) -> None:
    sandbox = await make_sandbox(learner)
    ws = socket(sandbox, await cookie_for(learner), ORIGIN)
    assert (await ws.connect())[0]
    await receive_start(ws)
    await ws.send_to(text_data=json.dumps({"type": "ping", "pad": "x" * MAX_MESSAGE_BYTES}))
    closing = await ws.receive_output(timeout=2)
    assert closing == {"type": "websocket.close", "code": 4413}
    await ws.disconnect()


async def test_flooding_closes_with_4429(learner: User, socket: Any) -> None:
    sandbox = await make_sandbox(learner)
    ws = socket(sandbox, await cookie_for(learner), ORIGIN)
    assert (await ws.connect())[0]
    await receive_start(ws)
    for _ in range(MAX_MESSAGES):
        await ws.send_json_to({"type": "ping"})
        assert await ws.receive_json_from(timeout=2) == {"type": "pong"}
    await ws.send_json_to({"type": "ping"})
    assert await ws.receive_output(timeout=2) == {"type": "websocket.close", "code": 4429}
    await ws.disconnect()


async def test_nothing_leaks_between_sandboxes(
    learner: User, other_learner: User, socket: Any
) -> None:
    mine, theirs = await make_sandbox(learner), await make_sandbox(other_learner)
    a = socket(mine, await cookie_for(learner), ORIGIN)
    b = socket(theirs, await cookie_for(other_learner), ORIGIN)
    for ws in (a, b):
        assert (await ws.connect())[0]
        await receive_start(ws)
    layer = get_channel_layer()
    await layer.group_send(group_name(mine.hex), {"type": "sandbox.frame", "data": {"seq": 1}})
    await layer.group_send(group_name(theirs.hex), {"type": "sandbox.frame", "data": {"seq": 2}})
    assert await a.receive_json_from(timeout=2) == {"seq": 1}
    assert await b.receive_json_from(timeout=2) == {"seq": 2}
    assert await a.receive_nothing()
    assert await b.receive_nothing()
    await a.disconnect()
    await b.disconnect()


async def test_the_end_of_the_sandbox_closes_with_4410(learner: User, socket: Any) -> None:
    sandbox = await make_sandbox(learner)
    ws = socket(sandbox, await cookie_for(learner), ORIGIN)
    assert (await ws.connect())[0]
    await receive_start(ws)
    ended = {"type": "event", "kind": "sandbox_ended", "text": "The sandbox is stopped.",
             "data": {"state": "stopped"}}  # fmt: skip
    await get_channel_layer().group_send(
        group_name(sandbox.hex), {"type": "sandbox.event", "data": ended}
    )
    assert await ws.receive_json_from(timeout=2) == ended
    assert "The sandbox is stopped." in await ws.receive_from(timeout=2)
    assert await ws.receive_output(timeout=2) == {"type": "websocket.close", "code": 4410}
    await ws.disconnect()


async def test_it_forwards_the_json_the_supervisor_encoded(learner: User, socket: Any) -> None:
    """The supervisor encodes each frame and event once for all its viewers (``text``):
    the consumer sends that text as it is instead of encoding ``data`` again."""
    sandbox = await make_sandbox(learner)
    ws = socket(sandbox, await cookie_for(learner), ORIGIN)
    assert (await ws.connect())[0]
    await receive_start(ws)
    layer, group = get_channel_layer(), group_name(sandbox.hex)
    frame = {"type": "frame", "v": 1, "ts": 1.5, "seq": 9}
    await layer.group_send(group, layer_message("frame", frame))
    assert await ws.receive_from(timeout=2) == json.dumps(frame)
    await layer.group_send(group, {"type": "sandbox.frame", "data": frame, "text": '{"seq":9}'})
    assert await ws.receive_from(timeout=2) == '{"seq":9}'  # as given, not re-encoded
    event = {"type": "event", "v": 1, "ts": 2.0, "node": "lb", "kind": "policy",
             "text": "lb policy random", "data": {}}  # fmt: skip
    await layer.group_send(group, layer_message("event", event))
    assert await ws.receive_from(timeout=2) == json.dumps(event)
    assert "lb policy random" in await ws.receive_from(timeout=2)  # the log's fragment
    assert await ws.receive_nothing()
    await ws.disconnect()


async def test_frames_do_not_queue_for_the_database_thread(learner: User, socket: Any) -> None:
    """Channels closes stale database connections before each message, on the one thread
    that runs database code: with hundreds of viewers that queue made frames seconds
    late. Frames and events skip it, so they arrive while that thread is busy."""
    sandbox = await make_sandbox(learner)
    ws = socket(sandbox, await cookie_for(learner), ORIGIN)
    assert (await ws.connect())[0]
    await receive_start(ws)
    release = threading.Event()
    busy = asyncio.ensure_future(sync_to_async(release.wait)())  # holds the database thread
    try:
        frame = {"type": "frame", "v": 1, "ts": 3.0, "seq": 10}
        await get_channel_layer().group_send(group_name(sandbox.hex), layer_message("frame", frame))
        assert await ws.receive_json_from(timeout=1) == frame
    finally:
        release.set()
        await busy
    assert await ws.receive_nothing()
    await ws.disconnect()


async def test_it_marks_warning_and_error_events_in_the_log() -> None:
    from apps.labs.consumers import render_event, render_events

    base = {"type": "event", "v": 1, "ts": 1764170000.5, "node": "lb", "kind": "ejected"}
    warning = render_event({**base, "text": "lb ejected replica-2", "severity": "warning"})
    assert 'data-severity="warning"' in warning and "event-is-warning" in warning
    marker = '<span aria-hidden="true">⚠</span><span class="visually-hidden">Warning:</span>'
    assert marker in warning
    error = render_events([{**base, "text": "lb lost its shard map", "severity": "error"}])
    assert 'data-severity="error"' in error and "✖" in error and "Error:" in error
    # Info (no severity) and anything unknown are not marked.
    for severity in (None, "info", "<b>"):
        plain = render_event({**base, "text": "lb admitted replica-4", "severity": severity})
        assert "data-severity" not in plain and "event-severity" not in plain


async def test_a_user_gets_a_few_streams_at_once_not_hundreds(
    learner: User, other_learner: User, socket: Any, settings: Any
) -> None:
    """300 sockets of one user once pinned a core: past SOCKETS_PER_USER streams a new one
    is closed with 4409; closing one frees its slot; other users are not affected."""
    settings.SOCKETS_PER_USER = 3
    sandbox = await make_sandbox(learner)
    cookie = await cookie_for(learner)
    open_ = []
    for _ in range(3):
        ws = socket(sandbox, cookie, ORIGIN)
        assert (await ws.connect())[0]
        await receive_start(ws)
        open_.append(ws)
    assert await refused_with(socket(sandbox, cookie, ORIGIN)) == CLOSE_TOO_MANY_SOCKETS
    theirs = socket(await make_sandbox(other_learner), await cookie_for(other_learner), ORIGIN)
    assert (await theirs.connect())[0]
    await receive_start(theirs)
    await theirs.disconnect()

    await open_.pop().disconnect()
    again = socket(sandbox, cookie, ORIGIN)
    assert (await again.connect())[0]
    await receive_start(again)
    for ws in [*open_, again]:
        await ws.disconnect()


@pytest.mark.parametrize(
    "origin",
    [
        b"http://localhost:9999",  # another port of an allowed host
        b"https://localhost",  # another scheme
        b"http://localhost.evil.example",
        b"null",
    ],
)
async def test_only_this_very_site_may_open_a_stream(
    learner: User, socket: Any, origin: bytes
) -> None:
    """Channels' check once let any scheme and port of an allowed host in."""
    sandbox = await make_sandbox(learner)
    ws = socket(sandbox, await cookie_for(learner), (b"origin", origin))
    assert (await ws.connect())[0] is False
    same = socket(sandbox, await cookie_for(learner), (b"origin", b"http://localhost:8000"),
                  (b"host", b"localhost:8000"))  # fmt: skip
    assert (await same.connect())[0]
    await receive_start(same)
    await same.disconnect()


async def test_an_unknown_path_is_closed_with_4404_not_an_error(learner: User) -> None:
    ws = WebsocketCommunicator(
        application, "/ws/nothing/here/", headers=[ORIGIN, HOST, await cookie_for(learner)]
    )
    assert await refused_with(ws) == 4404


async def test_signing_out_ends_the_stream_at_the_next_check(
    learner: User, socket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open stream once outlived the session it was opened with."""
    monkeypatch.setattr(consumers, "TOUCH_EVERY_S", 0.0)  # check at every frame
    sandbox = await make_sandbox(learner)
    cookie = await cookie_for(learner)
    ws = socket(sandbox, cookie, ORIGIN)
    assert (await ws.connect())[0]
    await receive_start(ws)
    key = cookie[1].decode().split("=", 1)[1]
    await sync_to_async(SessionStore(key).delete)()  # what signing out does
    layer = get_channel_layer()
    await layer.group_send(group_name(sandbox.hex), {"type": "sandbox.frame", "data": {"seq": 1}})
    assert await ws.receive_json_from(timeout=2) == {"seq": 1}
    assert await ws.receive_output(timeout=2) == {"type": "websocket.close", "code": 4401}
    await ws.disconnect()
