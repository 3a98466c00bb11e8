"""The control channel: a unix socket (``DISTLAB_CONTROL``) taking one JSON message per
connection and answering one JSON line, then closing.

It needs no network route into the sandbox: the Docker engine reaches it with
``docker exec <container> python3 -m sandboxes.runtime.ctl '<json>'``, the local engine
with ``sandboxes.runtime.ctl.send(path, message)``. Messages are listed in
``sandboxes/README.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import faults
from .config import ConfigError
from .node import Node, parse_peers

MAX_MESSAGE_BYTES = 64 * 1024
READ_TIMEOUT_S = 5.0


class ControlError(ValueError):
    pass


def _allow(message: dict[str, Any], *keys: str) -> None:
    unknown = sorted(set(message) - {"op", *keys})
    if unknown:
        op = message["op"]
        expected = ", ".join(keys) if keys else "nothing else"
        raise ControlError(f"{op}: unknown field {unknown[0]!r} (expected {expected})")


def _state(node: Node, message: dict[str, Any]) -> dict[str, Any]:
    _allow(message)
    return node.describe()


def _fault(node: Node, message: dict[str, Any]) -> dict[str, Any]:
    if "kind" not in message:
        raise ControlError(f"fault: kind is required ({', '.join(faults.RUNTIME_KINDS)})")
    kind = faults.check_kind(message["kind"])
    params = {k: v for k, v in message.items() if k not in ("op", "kind")}
    node.set_fault(kind, params)
    return {"faults": node.faults.as_dict()}


def _clear(node: Node, message: dict[str, Any]) -> dict[str, Any]:
    _allow(message, "kind")
    kind = message.get("kind")
    if kind is not None:
        kind = faults.check_kind(kind)
    cleared = node.clear_faults(kind)
    return {"cleared": cleared, "faults": node.faults.as_dict()}


def _config(node: Node, message: dict[str, Any]) -> dict[str, Any]:
    _allow(message, "set")
    changes = message.get("set")
    if not isinstance(changes, dict):
        raise ControlError('config: "set" must be an object of setting: value')
    node.configure(changes)
    return {"config": dict(node.config)}


def _peers(node: Node, message: dict[str, Any]) -> dict[str, Any]:
    _allow(message, "set")
    try:
        peers = parse_peers(message.get("set"))
    except ValueError as exc:
        raise ControlError(f"peers: {exc}") from None
    node.replace_peers(peers)
    return {"peers": [p.as_dict() for p in node.peers]}


OPS: dict[str, Callable[[Node, dict[str, Any]], dict[str, Any]]] = {
    "state": _state,
    "fault": _fault,
    "clear": _clear,
    "config": _config,
    "peers": _peers,
}


def handle(node: Node, raw: bytes) -> dict[str, Any]:
    """Answer one control message. Nothing changes unless the answer is ``ok``."""
    try:
        message = json.loads(raw)
    except ValueError:
        return {"ok": False, "error": "the message is not valid JSON"}
    if not isinstance(message, dict):
        return {"ok": False, "error": 'a control message is a JSON object, like {"op": "state"}'}
    op = message.get("op")
    handler = OPS.get(op) if isinstance(op, str) else None
    if handler is None:
        return {"ok": False, "error": f"unknown op {op!r}: expected one of {', '.join(OPS)}"}
    try:
        return {"ok": True, **handler(node, message)}
    except (ControlError, faults.FaultError, ConfigError) as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a bug, in the runtime or the program's status()
        traceback.print_exc(file=sys.stderr)
        return {"ok": False, "error": f"internal error: {exc!r}"}


class ControlServer:
    def __init__(self, node: Node, path: str) -> None:
        self.node = node
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        path = Path(self.path)
        # The node's group may connect too: the Docker engine sends control messages as
        # another user in the node's group, which the node cannot tamper with.
        path.parent.mkdir(mode=0o710, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # left behind by a killed predecessor
        self._server = await asyncio.start_unix_server(
            self._serve, path=self.path, limit=MAX_MESSAGE_BYTES
        )
        os.chmod(self.path, 0o660)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                raw = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
                reply = handle(self.node, raw)
            except TimeoutError:
                reply = {"ok": False, "error": "no message within 5 seconds"}
            except ValueError:  # longer than the stream limit
                reply = {"ok": False, "error": f"message longer than {MAX_MESSAGE_BYTES} bytes"}
            writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
