"""The filtering Docker socket proxy, on a real Docker engine: the sandbox engine does
its whole job through it, and what would make the socket root on the host is refused."""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from apps.labs.engine.docker import DockerEngine
from apps.labs.engine.socket_proxy import DockerSocketProxy, refusal
from tests.labs.engine.conftest import docker_engine, lb_spec
from tests.labs.engine.test_contract import answers, wait_for


@pytest.fixture
def proxy() -> Iterator[str]:
    """A proxy on a socket of its own (a short path: unix socket paths are limited)."""
    docker_engine()  # Docker and the image, or skip (fail in CI)
    folder = Path(tempfile.mkdtemp(prefix="dp-", dir="/tmp"))
    socket_path = folder / "docker.sock"
    loop = asyncio.new_event_loop()
    server = DockerSocketProxy(socket_path)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"unix://{socket_path}"
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()
    socket_path.unlink(missing_ok=True)
    folder.rmdir()


def test_the_engine_does_everything_through_the_proxy(proxy: str) -> None:
    engine = DockerEngine(base_url=proxy, instance="proxy-test")
    spec = lb_spec(owner="proxy-test")
    try:
        engine.ping()
        engine.create(spec)
        for node in spec.nodes:  # control messages are execs: upgraded connections
            wait_for(lambda n=node.name: answers(engine, spec, n), what=f"{node.name} answers")
        stop = threading.Event()
        threading.Timer(3, stop.set).start()
        lines = [json.loads(raw) for raw in engine.follow(spec.sandbox_id, "lb", stop=stop)]
        assert any(line.get("type") == "call" for line in lines)  # a streamed log
        engine.pause(spec.sandbox_id, "replica-1")
        engine.resume(spec.sandbox_id, "replica-1")
        engine.partition(spec.sandbox_id, "replica-2")
        engine.heal(spec.sandbox_id, "replica-2")
        engine.kill(spec.sandbox_id, "replica-3")
        engine.restart(spec.sandbox_id, "replica-3")
        wait_for(lambda: answers(engine, spec, "replica-3"), what="replica-3 back")
        assert {s.state for s in engine.status(spec.sandbox_id)} == {"running"}
    finally:
        engine.destroy(spec.sandbox_id)
        engine.close()
    assert engine.list_sandboxes() == [] or all(
        i.sandbox_id != spec.sandbox_id for i in engine.list_sandboxes()
    )


def test_what_would_make_the_socket_root_is_refused(proxy: str) -> None:
    client = docker.APIClient(base_url=proxy, timeout=10)
    image = DockerEngine().image
    labels = {"io.distlab.sandbox": "x"}
    attempts: list[tuple[str, Any]] = [
        ("a privileged container", lambda: client.create_container(
            image, user="20001", labels=labels,
            host_config=client.create_host_config(privileged=True))),
        ("the host's root mounted", lambda: client.create_container(
            image, user="20001", labels=labels, host_config=client.create_host_config(
                binds=["/:/host"], cap_drop=["ALL"], read_only=True,
                security_opt=["no-new-privileges"], network_mode="sandbox-net"))),
        ("a root container", lambda: client.create_container(image, labels=labels)),
        ("an unlabelled container", lambda: client.create_container(image, user="20001")),
        ("the host's network", lambda: client.create_container(
            image, user="20001", labels=labels, host_config=client.create_host_config(
                network_mode="host", cap_drop=["ALL"], read_only=True,
                security_opt=["no-new-privileges"]))),
        ("pulling an image", lambda: client.pull("busybox", tag="latest")),
        ("a network that reaches out", lambda: client.create_network("x", labels=labels)),
        ("copying files out", lambda: client.get_archive("anything", "/etc")),
        ("swarm", lambda: client.init_swarm()),
    ]  # fmt: skip
    for what, attempt in attempts:
        with pytest.raises(docker.errors.APIError) as refused:
            attempt()
        assert refused.value.status_code == 403, what
        assert "refused by the Distlab Docker proxy" in str(refused.value), what
    assert client.ping()  # the connection still serves allowed calls after refusals
    client.close()


@pytest.mark.parametrize(
    ("method", "target", "body", "allowed"),
    [
        ("GET", "/v1.41/containers/json?all=1&filters=x", b"", True),
        ("POST", "/v1.41/containers/abc/kill?signal=KILL", b"", True),
        ("POST", "/v1.41/containers/abc/exec", b'{"Cmd": ["ls"], "User": "20002:20001"}', True),
        ("POST", "/v1.41/containers/abc/exec", b'{"Cmd": ["sh"], "User": "root"}', False),
        ("POST", "/v1.41/containers/abc/exec", b'{"Privileged": true, "User": "1"}', False),
        ("GET", "/v1.41/events", b"", False),
        ("POST", "/v1.41/containers/abc/archive", b"", False),
        ("PUT", "/v1.41/containers/abc/archive?path=/", b"", False),
        ("POST", "/v1.41/build", b"", False),
        ("POST", "/v1.41/containers/create", b"not json", False),
    ],
)  # fmt: skip
def test_the_rules(method: str, target: str, body: bytes, allowed: bool) -> None:
    assert (refusal(method, target, body) is None) is allowed


def test_a_refusal_comes_at_once(proxy: str) -> None:
    client = docker.APIClient(base_url=proxy, timeout=10)
    started = time.monotonic()
    with pytest.raises(docker.errors.APIError):
        client.create_container("anything", host_config={"Privileged": True})
    assert time.monotonic() - started < 2
    client.close()
