"""Start one node: ``python3 -m sandboxes.runtime.run <pattern_id> <program>``.

Loads ``sandboxes/patterns/<pattern_id>/<program>``, calls its ``setup(node)``, then serves
until SIGTERM or SIGINT. The environment (``DISTLAB_NODE``, ``DISTLAB_LISTEN``, …) is
described in ``sandboxes/README.md``.

Exit status: 0 after a clean shutdown; 1 if the program or the server failed; 2 if the
arguments or the environment are wrong. Telemetry goes to stdout, everything else to
stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import platform
import re
import signal
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import aiohttp

from .control import ControlServer
from .node import Node, parse_peers, split_address
from .telemetry import Telemetry

PATTERNS_DIR = Path(__file__).resolve().parent.parent / "patterns"
PATTERN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
PROGRAM_RE = re.compile(r"^[a-z_][a-z0-9_]*\.py$")

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    pass


def program_path(pattern_id: str, program: str, root: Path = PATTERNS_DIR) -> Path:
    if not PATTERN_ID_RE.match(pattern_id):
        raise UsageError(f"bad pattern id {pattern_id!r}")
    if not PROGRAM_RE.match(program):
        raise UsageError(f"bad program name {program!r} (expected a file name like replica.py)")
    path = root / pattern_id / program
    if not path.is_file():
        shared = root.parent / "programs" / program
        if shared.is_file():
            return shared
        raise UsageError(f"no program {program!r} in pattern {pattern_id!r} ({path})")
    return path


def load_program(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"distlab_program_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "setup", None)):
        raise UsageError(f"{path} has no setup(node) function")
    return module


def node_from_environment(pattern_id: str, env: Mapping[str, str]) -> tuple[Node, str]:
    """Build the Node (and return the control socket path) from ``DISTLAB_*``."""
    missing = [k for k in ("DISTLAB_NODE", "DISTLAB_LISTEN", "DISTLAB_CONTROL") if not env.get(k)]
    if missing:
        raise UsageError(f"missing environment: {', '.join(missing)}")
    name = env["DISTLAB_NODE"]
    try:
        split_address(env["DISTLAB_LISTEN"])
    except ValueError as exc:
        raise UsageError(f"DISTLAB_LISTEN: {exc}") from None
    try:
        peers = parse_peers(json.loads(env.get("DISTLAB_PEERS") or "[]"))
    except ValueError as exc:
        raise UsageError(f"DISTLAB_PEERS: {exc}") from None
    role = env.get("DISTLAB_ROLE") or next((p.role for p in peers if p.name == name), name)
    node = Node(
        name=name,
        role=role,
        pattern=pattern_id,
        sandbox=env.get("DISTLAB_SANDBOX", ""),
        listen=env["DISTLAB_LISTEN"],
        peers=peers,
        env=dict(env),
        telemetry=Telemetry(name),
    )
    return node, env["DISTLAB_CONTROL"]


async def serve(node: Node, control_path: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = ["?"]

    def on_signal(signum: int) -> None:
        reason[0] = signal.Signals(signum).name
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    control = ControlServer(node, control_path)
    try:
        await node.start()
        await control.start()
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        node.state("failed", error=f"could not start: {exc}")
        await control.stop()
        await node.stop()
        return EXIT_FAILED
    node.state(
        "started",
        role=node.role,
        pattern=node.pattern,
        sandbox=node.sandbox,
        pid=os.getpid(),
        listen=node.listen,
        python=platform.python_version(),
        aiohttp=aiohttp.__version__,
    )
    await stop.wait()
    await control.stop()
    await node.stop()
    node.state("stopped", reason=reason[0], uptime_s=node.uptime_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m sandboxes.runtime.run")
    parser.add_argument("pattern_id")
    parser.add_argument("program")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    try:
        path = program_path(args.pattern_id, args.program)
        node, control_path = node_from_environment(args.pattern_id, os.environ)
    except UsageError as exc:
        print(f"distlab node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        load_program(path).setup(node)
        status = asyncio.run(serve(node, control_path))
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        node.state("failed", error=f"{type(exc).__name__}: {exc}"[:500])
        status = EXIT_FAILED
    node.telemetry.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
