"""Run a pattern's nodes as subprocesses on 127.0.0.1, for tests and benchmarks.

This is a harness, not an engine (the local-process engine is
``apps/labs/engine/local.py``): no state file, no adoption after a crash, no isolation.
It starts nodes exactly as the contract in ``sandboxes/README.md`` says, collects their
telemetry, and lets a test break them::

    with LocalCluster("replicated-lb", load_pattern("replicated-lb").expand()) as cluster:
        cluster.wait_started()
        cluster.ctl("lb", {"op": "config", "set": {"policy": "random"}})
        cluster.kill("replica-2")
        cluster.wait_for(lambda: cluster.find("lb", "state", event="ejected"), timeout=3)

Nodes run with ``DISTLAB_NODE_PYTHON`` if set (for example a virtualenv holding the
oldest aiohttp the runtime supports), else with this interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from .ctl import send

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or time runs out
    (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class LocalNode:
    def __init__(
        self, name: str, role: str, program: str, env: Mapping[str, str], workdir: Path
    ) -> None:
        self.name = name
        self.role = role
        self.program = program
        self.env = dict(env)
        self.port = free_port()
        self.control = str(workdir / f"{name}.sock")
        self.stderr_path = workdir / f"{name}.stderr"
        self.process: subprocess.Popen[bytes] | None = None
        self.events: list[dict[str, Any]] = []
        self.bad_lines: list[bytes] = []  # stdout lines that are not telemetry JSON
        self.lock = threading.Lock()
        self._reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, pattern_id: str, peers: list[dict[str, str]], python: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISTLAB_")}
        env.update(
            PYTHONPATH=str(REPO),
            PYTHONWARNINGS="default",  # deprecations show up in stderr, where tests look
            DISTLAB_SANDBOX="test",
            DISTLAB_NODE=self.name,
            DISTLAB_ROLE=self.role,
            DISTLAB_PATTERN=pattern_id,
            DISTLAB_LISTEN=self.address,
            DISTLAB_PEERS=json.dumps(peers),
            DISTLAB_CONTROL=self.control,
        )
        env.update(self.env)
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [python, "-m", "sandboxes.runtime.run", pattern_id, self.program],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        assert self.process.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.process.stdout,), name=f"telemetry-{self.name}"
        )
        self._reader.daemon = True
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            try:
                event = json.loads(line)
                ok = isinstance(event, dict)
            except ValueError:
                ok = False
            with self.lock:
                if ok:
                    self.events.append(event)
                else:
                    self.bad_lines.append(line)
        stream.close()

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return code

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class LocalCluster:
    def __init__(
        self,
        pattern_id: str,
        nodes: Iterable[tuple[str, str, str, Mapping[str, str]]],
        *,
        python: str | None = None,
    ) -> None:
        self.pattern_id = pattern_id
        self.python = python or os.environ.get("DISTLAB_NODE_PYTHON") or sys.executable
        # Unix socket paths are limited to ~100 bytes: keep the folder short.
        self.workdir = Path(tempfile.mkdtemp(prefix="dl-", dir="/tmp"))
        self.nodes: dict[str, LocalNode] = {}
        for name, role, program, env in nodes:
            self.nodes[name] = LocalNode(name, role, program, env, self.workdir)

    # ---- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def peers(self) -> list[dict[str, str]]:
        return [{"name": n.name, "role": n.role, "address": n.address} for n in self.nodes.values()]

    def start(self) -> None:
        peers = self.peers()
        for node in self.nodes.values():
            node.start(self.pattern_id, peers, self.python)

    def wait_started(self, *names: str, timeout: float = 15.0, since: float = 0.0) -> None:
        """Wait until each node (default: all) has said ``started`` (at or after ``since``)."""
        for name in names or list(self.nodes):
            node = self.nodes[name]

            def started(node: LocalNode = node) -> bool:
                if not node.running:
                    raise AssertionError(f"{node.name} exited:\n{node.stderr()}")
                with node.lock:
                    events = list(node.events)
                return any(e.get("event") == "started" and e["ts"] >= since for e in events)

            wait_for(started, timeout, what=f"{name} to start")

    def add(self, name: str, role: str, program: str, env: Mapping[str, str]) -> LocalNode:
        """Start one more node (scaling); the others learn of it only through ``peers``."""
        node = LocalNode(name, role, program, env, self.workdir)
        self.nodes[name] = node
        node.start(self.pattern_id, self.peers(), self.python)
        self.wait_started(name)
        return node

    def remove(self, name: str) -> int:
        code = self.terminate(name)
        del self.nodes[name]
        return code

    def kill(self, name: str) -> None:
        node = self.nodes[name]
        assert node.process is not None
        node.process.kill()
        node.wait_exit(5)

    def terminate(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        node = self.nodes[name]
        assert node.process is not None
        if node.process.poll() is None:
            node.process.send_signal(sig)
        return node.wait_exit(timeout)

    def restart(self, name: str) -> None:
        """Start a stopped (or killed) node again: same port, socket and environment."""
        node = self.nodes[name]
        if node.running:
            self.terminate(name)
        mark = self.mark()
        node.start(self.pattern_id, self.peers(), self.python)
        self.wait_started(name, since=mark)

    def close(self) -> None:
        for node in self.nodes.values():
            if node.running:
                assert node.process is not None
                node.process.terminate()
        for node in self.nodes.values():
            if node.process is not None:
                try:
                    node.wait_exit(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.wait_exit(5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- control and telemetry -------------------------------------------------------

    def ctl(self, name: str, message: dict[str, Any]) -> dict[str, Any]:
        return send(self.nodes[name].control, message)

    def mark(self) -> float:
        """Now, for ``events(since=...)``: events carry the Unix time they happened at, and
        arrive up to ~0.1 s later, so a count of events so far would not do."""
        return time.time()

    def events(
        self, name: str, type_: str | None = None, since: float | None = None
    ) -> list[dict[str, Any]]:
        node = self.nodes[name]
        with node.lock:
            events = list(node.events)
        return [
            e
            for e in events
            if (type_ is None or e.get("type") == type_) and (since is None or e["ts"] >= since)
        ]

    def find(
        self, name: str, type_: str, since: float | None = None, **fields: Any
    ) -> dict[str, Any] | None:
        """The first event of ``name`` of this type whose fields match, or None."""
        for event in self.events(name, type_, since):
            if all(event.get(k) == v for k, v in fields.items()):
                return event
        return None

    def wait_event(
        self,
        name: str,
        type_: str,
        since: float | None = None,
        timeout: float = 3.0,
        **fields: Any,
    ) -> dict[str, Any]:
        """Wait for the event ``find`` would return (telemetry arrives within ~0.1 s)."""
        what = f"a {type_} event of {name} with {fields}"
        return wait_for(lambda: self.find(name, type_, since, **fields), timeout, what=what)

    def wait_for(
        self, predicate: Callable[[], T | None], timeout: float, what: str = "condition"
    ) -> T:
        return wait_for(predicate, timeout, what=what)
