"""The channel layer in both modes, and the WebSocket entry of the ASGI application."""

from __future__ import annotations

import os

import pytest
from channels.layers import InMemoryChannelLayer
from channels.testing import WebsocketCommunicator
from channels_redis.core import RedisChannelLayer

from config.asgi import application
from tests.config.test_background import REDIS_URL, redis_answers
from tests.conftest import require


async def round_trip(layer) -> None:  # type: ignore[no-untyped-def]
    group = f"sandbox.test-{os.getpid()}"
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    await layer.group_send(group, {"type": "frame", "n": 1})
    assert await layer.receive(channel) == {"type": "frame", "n": 1}
    await layer.group_discard(group, channel)


async def test_in_memory_layer_delivers_group_messages() -> None:
    await round_trip(InMemoryChannelLayer())


@pytest.mark.redis
async def test_redis_layer_delivers_group_messages() -> None:
    require(redis_answers(), f"Redis at {REDIS_URL}")
    layer = RedisChannelLayer(hosts=[REDIS_URL], prefix="distlab-test")
    try:
        await round_trip(layer)
    finally:
        await layer.flush()


@pytest.mark.django_db(transaction=True)
async def test_websockets_from_another_origin_are_refused() -> None:
    communicator = WebsocketCommunicator(
        application, "/ws/anything/", headers=[(b"origin", b"http://evil.example")]
    )
    connected, _ = await communicator.connect()
    assert connected is False
    await communicator.disconnect()


async def test_a_send_from_any_thread_reaches_the_consumers_loop_of_the_in_memory_layer(
    settings,  # type: ignore[no-untyped-def]
) -> None:
    """`make run`: the embedded worker's threads (a sandbox launched, an experiment
    checked) tell open pages through the server's loop, which `manage.py serve` binds."""
    import asyncio

    from channels.layers import get_channel_layer

    from config import layer as sending

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("classroom.1", channel)
    sending.bind_loop(asyncio.get_running_loop())
    try:
        await asyncio.to_thread(sending.group_send, "classroom.1", {"type": "news", "n": 1})
        assert await asyncio.wait_for(layer.receive(channel), 2) == {"type": "news", "n": 1}
    finally:
        sending.bind_loop(None)
