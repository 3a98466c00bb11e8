"""Send one control message to a node and print its reply.

    python3 -m sandboxes.runtime.ctl '{"op": "state"}'                 # socket: $DISTLAB_CONTROL
    python3 -I -S sandboxes/runtime/ctl.py '{"op": "state"}'          # as the Docker engine does
    python3 -m sandboxes.runtime.ctl --socket /tmp/n.sock '{"op": "clear"}'

Prints the node's reply (one JSON line) on stdout. Exit status: 0 if the reply says
``ok``, 1 if it does not, 2 if the node cannot be reached (no socket, refused, no reply
in time), 64 if the command line itself is wrong.

Library use (the local engine): ``send(path, message, timeout=5.0) -> dict``.
Standard library only and importing nothing of its own, so it starts fast inside
``docker exec`` and runs as a plain script in an isolated interpreter (``python3 -I -S``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_NOT_OK = 1
EXIT_UNREACHABLE = 2
EXIT_USAGE = 64
MAX_REPLY_BYTES = 1024 * 1024


def send(path: str, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send ``message`` to the node listening on the unix socket ``path``; return its
    reply. Raises OSError (FileNotFoundError, ConnectionRefusedError, …) when the node
    cannot be reached or sends no valid reply, TimeoutError when it does not answer within
    ``timeout`` seconds."""
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    deadline = time.monotonic() + timeout  # for the whole exchange, however it trickles
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        chunks: list[bytes] = []
        size = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the node at {path} did not finish its reply in time")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if chunk.endswith(b"\n") or size > MAX_REPLY_BYTES:
                break
    raw = b"".join(chunks)
    if not raw.strip():
        raise ConnectionError(f"the node at {path} closed the connection without a reply")
    try:
        reply = json.loads(raw)
    except ValueError:
        raise ConnectionError(f"the node at {path} sent an invalid reply") from None
    if not isinstance(reply, dict):
        raise ConnectionError(f"the node at {path} sent an invalid reply")
    return reply


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python3 -m sandboxes.runtime.ctl", description=__doc__.split("\n")[0])
    parser.add_argument("message", help='one JSON object, e.g. \'{"op": "state"}\'')
    parser.add_argument("--socket", help="control socket (default: $DISTLAB_CONTROL)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args(argv)
    path = args.socket or os.environ.get("DISTLAB_CONTROL")
    if not path:
        parser.error("no socket: pass --socket or set DISTLAB_CONTROL")
    try:
        message = json.loads(args.message)
    except ValueError:
        parser.error(f"the message is not valid JSON: {args.message!r}")
    if not isinstance(message, dict):
        parser.error('the message must be a JSON object, like {"op": "state"}')
    try:
        reply = send(path, message, timeout=args.timeout)
    except (OSError, TimeoutError) as exc:
        print(f"cannot reach the node at {path}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(reply, separators=(",", ":")))
    return EXIT_OK if reply.get("ok") is True else EXIT_NOT_OK


if __name__ == "__main__":
    sys.exit(main())
