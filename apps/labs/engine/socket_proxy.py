"""A filtering proxy in front of the Docker socket: only the calls the sandbox engine
makes, with only the settings it uses, get through.

Whoever holds the Docker socket is root on the host: one ``POST /containers/create`` with
``Privileged`` or a bind mount of ``/`` is enough. The processes that drive sandboxes (the
worker, the supervisor) talk to this proxy instead (``DOCKER_HOST=unix:///…/docker.sock``);
only the proxy holds the real socket. It answers ``403`` to any other call (pulling or
building images, copying files, swarm, plugins, volumes, the daemon's events) and to a
container, exec or network that does not look like a sandbox's:

* a container must carry the sandbox label, run as a non-root user with every capability
  dropped, ``no-new-privileges`` and a read-only root, no bind mount, volume, device,
  host namespace, privileged flag or unconfined security profile, and join a sandbox
  network or another container (a node joins its holder);
* an exec must not be privileged nor run as root;
* a network must be internal and labelled as a sandbox's.

It speaks HTTP/1.1 as far as it needs: each request's line, headers and body are read
and checked, then passed on; the answer is copied back whatever its framing (length,
chunks, a stream that ends with the connection), and an upgraded connection (``docker
exec``'s attach) is spliced both ways.

    python manage.py docker_proxy --listen /run/distlab/docker.sock
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from apps.labs.engine.base import LABEL_SANDBOX

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
ROOT_USERS = {"", "0", "root", "0:0", "root:root"}
ID = r"[A-Za-z0-9_.-]+"  # a container, exec or network id or name
Check = Callable[[Mapping[str, Any]], str | None]  # the reason to refuse, or None


def _container(body: Mapping[str, Any]) -> str | None:
    labels = body.get("Labels") or {}
    if not labels.get(LABEL_SANDBOX):
        return f"a container must carry the {LABEL_SANDBOX} label"
    if str(body.get("User") or "") in ROOT_USERS:
        return "a container must run as a non-root user"
    host = body.get("HostConfig") or {}
    if host.get("Privileged"):
        return "a container may not be privileged"
    if host.get("CapAdd"):
        return "a container may not add capabilities"
    if [c.upper() for c in host.get("CapDrop") or []] != ["ALL"]:
        return "a container must drop every capability"
    if not host.get("ReadonlyRootfs"):
        return "a container must have a read-only root"
    security = [str(s) for s in host.get("SecurityOpt") or []]
    if "no-new-privileges" not in security and "no-new-privileges:true" not in security:
        return "a container must set no-new-privileges"
    if any("unconfined" in s for s in security):
        return "a container may not run unconfined"
    if host.get("Binds") or host.get("VolumesFrom") or body.get("Volumes"):
        return "a container may not mount host paths or volumes"
    if any((m or {}).get("Type") != "tmpfs" for m in host.get("Mounts") or []):
        return "a container may mount tmpfs only"
    if host.get("Devices") or host.get("DeviceRequests") or host.get("DeviceCgroupRules"):
        return "a container may not use host devices"
    for key in ("PidMode", "UTSMode", "UsernsMode", "CgroupnsMode", "Cgroup"):
        if host.get(key) not in (None, "", "private"):
            return f"a container may not share the host's namespaces ({key})"
    if host.get("IpcMode") not in (None, "", "private", "none"):
        return "a container must have its own IPC namespace"
    mode = str(host.get("NetworkMode") or "")
    if mode in {"", "default", "bridge", "host"}:
        return "a container must join a sandbox network or its holder, nothing else"
    if host.get("PortBindings") or host.get("PublishAllPorts"):
        return "a container may not publish ports on the host"
    return None


def _exec(body: Mapping[str, Any]) -> str | None:
    if body.get("Privileged"):
        return "an exec may not be privileged"
    if str(body.get("User") or "") in ROOT_USERS:
        return "an exec must run as a non-root user"
    return None


def _network(body: Mapping[str, Any]) -> str | None:
    if not body.get("Internal"):
        return "a network must be internal"
    if not (body.get("Labels") or {}).get(LABEL_SANDBOX):
        return f"a network must carry the {LABEL_SANDBOX} label"
    if body.get("Driver") not in (None, "", "bridge"):
        return "a network must use the bridge driver"
    return None


# (method, path pattern, body check): the engine's calls, and nothing else.
RULES: list[tuple[str, re.Pattern[str], Check | None]] = [
    (method, re.compile(f"^{path}$"), check)
    for method, path, check in [
        ("GET", "/_ping", None),
        ("HEAD", "/_ping", None),
        ("GET", "/version", None),
        ("GET", "/info", None),
        ("GET", f"/images/{ID}(?::{ID})?/json", None),
        ("GET", "/containers/json", None),
        ("POST", "/containers/create", _container),
        ("GET", f"/containers/{ID}/json", None),
        ("GET", f"/containers/{ID}/logs", None),
        ("POST", f"/containers/{ID}/(start|stop|kill|pause|unpause|restart|wait)", None),
        ("DELETE", f"/containers/{ID}", None),
        ("POST", f"/containers/{ID}/exec", _exec),
        ("POST", f"/exec/{ID}/start", None),
        ("GET", f"/exec/{ID}/json", None),
        ("GET", "/networks", None),
        ("GET", f"/networks/{ID}", None),
        ("POST", "/networks/create", _network),
        ("POST", f"/networks/{ID}/(connect|disconnect)", None),
        ("DELETE", f"/networks/{ID}", None),
    ]
]
VERSION_PREFIX = re.compile(r"^/v\d+\.\d+(?=/)")


def refusal(method: str, target: str, body: bytes) -> str | None:
    """Why the request may not pass (shown to the caller), or None."""
    path = VERSION_PREFIX.sub("", urlsplit(target).path)
    for rule_method, pattern, check in RULES:
        if method == rule_method and pattern.match(path):
            if check is None:
                return None
            try:
                parsed = json.loads(body or b"{}")
            except ValueError:
                return "the request body is not JSON"
            if not isinstance(parsed, dict):
                return "the request body is not a JSON object"
            return check(parsed)
    return f"{method} {path} is not a call the sandbox engine makes"


class ProxyError(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]] | None:
    """One message head (start line and headers), or None at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProxyError("the connection ended inside a message head") from exc
    except asyncio.LimitOverrunError as exc:
        raise ProxyError("a message head is too long") from exc
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, _, value = line.partition(b":")
            headers[name.decode("latin1").strip().lower()] = value.decode("latin1").strip()
    return head, headers


async def _copy_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter | None,
    headers: Mapping[str, str],
    *,
    until_close: bool,
    limit: int | None = None,
) -> bytes:
    """Copy one message body to ``writer`` (and return it when ``limit`` is set: a request
    body to check, which is then not written)."""
    kept = bytearray()

    def out(data: bytes) -> None:
        if limit is not None:
            if len(kept) + len(data) > limit:
                raise ProxyError("the request body is too large")
            kept.extend(data)
        elif writer is not None:
            writer.write(data)

    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if limit is None:
                out(size_line)
            data = await reader.readexactly(size + 2)  # the chunk and its CRLF
            if limit is None:
                out(data)
            else:
                out(data[:-2])
            if writer is not None and limit is None:
                await writer.drain()
            if size == 0:
                return bytes(kept)
    length = headers.get("content-length")
    if length is not None:
        remaining = int(length)
        while remaining:
            data = await reader.read(min(remaining, 65536))
            if not data:
                raise ProxyError("the connection ended inside a body")
            out(data)
            remaining -= len(data)
            if writer is not None and limit is None:
                await writer.drain()
        return bytes(kept)
    if until_close:
        while data := await reader.read(65536):
            out(data)
            if writer is not None:
                await writer.drain()
    return bytes(kept)


async def _splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()


def _denied(reason: str) -> bytes:
    body = json.dumps({"message": f"refused by the Distlab Docker proxy: {reason}"}).encode()
    return (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


class DockerSocketProxy:
    """Listens on ``listen`` (a unix socket path) and forwards allowed calls to the
    Docker socket at ``upstream``."""

    def __init__(self, listen: str | Path, upstream: str | Path = "/var/run/docker.sock") -> None:
        self.listen = str(listen)
        self.upstream = str(upstream)
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen)
        self.server = await asyncio.start_unix_server(
            self._serve, path=self.listen, limit=MAX_HEAD_BYTES
        )
        os.chmod(self.listen, 0o660)  # the socket's group: the processes that drive sandboxes

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.connections):  # the open ones end with the proxy
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)
        try:
            while True:
                message = await _read_head(reader)
                if message is None:
                    return
                head, headers = message
                method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin1").split(" ")
                body = await _copy_body(
                    reader, None, headers, until_close=False, limit=MAX_BODY_BYTES
                )
                reason = refusal(method, target, body)
                if reason is not None:
                    log.warning("docker proxy: refused %s %s: %s", method, target, reason)
                    writer.write(_denied(reason))
                    await writer.drain()
                    continue
                if upstream is None:
                    upstream = await asyncio.open_unix_connection(self.upstream, limit=2**20)
                up_reader, up_writer = upstream
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    # Re-framed with a length: the body was read whole to be checked.
                    head = re.sub(rb"(?im)^transfer-encoding:[^\r]*\r\n", b"", head)
                    head = head[:-2] + f"Content-Length: {len(body)}\r\n\r\n".encode()
                up_writer.write(head + body)
                await up_writer.drain()
                answer = await _read_head(up_reader)
                if answer is None:
                    raise ProxyError("Docker closed the connection without an answer")
                answer_head, answer_headers = answer
                writer.write(answer_head)
                await writer.drain()
                status = int(answer_head.split(b" ", 2)[1])
                if status == 101:  # upgraded (an exec's attach): raw bytes both ways
                    inbound = asyncio.ensure_future(_splice(reader, up_writer))
                    try:
                        await _splice(up_reader, writer)  # until Docker ends the exec
                    finally:
                        inbound.cancel()
                    return
                no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                if not no_body:
                    framed = "content-length" in answer_headers or "chunked" in answer_headers.get(
                        "transfer-encoding", ""
                    )
                    await _copy_body(up_reader, writer, answer_headers, until_close=not framed)
                    if not framed:  # ended with the connection
                        return
        except (ProxyError, ValueError, ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("docker proxy: connection ended: %s", exc)
        finally:
            for stream in (writer, upstream[1] if upstream else None):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()
