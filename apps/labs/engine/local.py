"""The local-process engine: a sandbox's nodes as subprocesses on 127.0.0.1.

For machines with no Docker engine. The nodes run the same runtime and programs as in
containers, but as plain processes of the platform's own user: **no isolation** (a node
could read the platform's files or reach any address). The UI and the CLI say so.

State lives on disk, one folder per sandbox (``<state_dir>/<sandbox id>/``), so every
process of the platform (web server, Celery worker, supervisor) sees the same sandboxes:
``sandbox.json`` (nodes, ports, pids), ``<node>.log`` (the node's stdout: telemetry) and
``<node>.err`` (its stderr). Pause is SIGSTOP; partition is done by the node's own fault
layer (a control message), since processes share the host's network.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from apps.labs.engine.base import (
    MAX_LINE_BYTES,
    Engine,
    EngineError,
    NodeNotFound,
    NodeSpec,
    NodeState,
    NodeStatus,
    SandboxInfo,
    SandboxSpec,
)

REPO = Path(__file__).resolve().parents[3]
STATE_FILE = "sandbox.json"


# Listening ports for nodes come from below the kernel's ephemeral range (32768 and up by
# default): a port the kernel hands out for outgoing connections could otherwise be taken
# by one of the nodes' own calls between our check and the node binding it.
NODE_PORTS = range(20000, 32000)


# Ports handed out lately, not yet bound by their node: a port that is free now is still
# taken if another node of this process was given it a moment ago (two nodes of one
# sandbox drawing the same port would otherwise both pass the check, and one die).
PORT_HOLD_SECONDS = 120.0
_handed_out: dict[int, float] = {}
_handed_out_lock = threading.Lock()


def _free_port() -> int:
    with _handed_out_lock:
        now = time.monotonic()
        for port, when in list(_handed_out.items()):
            if now - when > PORT_HOLD_SECONDS:
                del _handed_out[port]
        for _ in range(200):
            port = random.choice(NODE_PORTS)
            if port in _handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out[port] = now
            return port
    raise EngineError("no free port for a node between 20000 and 32000")


def _proc_state(pid: int) -> str | None:
    """The kernel's one-letter state of a process (R, S, T, Z…), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _environ(pid: int) -> list[bytes]:
    """A process's environment. A process caught inside execve (Popen has returned, the
    kernel has not yet placed the new environment) shows an empty one for a moment:
    read again until it appears, for at most about 0.2 s."""
    for _ in range(40):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return []
        if environ:
            break
        time.sleep(0.005)
    return environ.split(b"\0")


def _is_our_process(pid: int, sandbox_id: str, name: str) -> bool:
    """Guards against pid reuse: the process must carry this node's environment."""
    environ = _environ(pid)
    return (
        f"DISTLAB_SANDBOX={sandbox_id}".encode() in environ
        and f"DISTLAB_NODE={name}".encode() in environ
    )


def _node_processes() -> dict[int, str]:
    """Every process of ours that runs a sandbox node: pid → sandbox id (from its
    environment). Finds nodes even when their sandbox's state file is gone."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"DISTLAB_SANDBOX="):
                found[int(entry.name)] = item.split(b"=", 1)[1].decode(errors="replace")
                break
    return found


class LocalEngine(Engine):
    name = "local"
    isolated = False

    def __init__(self, state_dir: Path, *, python: str = sys.executable) -> None:
        self.state_dir = Path(state_dir)
        self.python = python
        # Unix socket paths must stay short (108 bytes): keep them under the temp dir.
        self.socket_dir = Path(tempfile.gettempdir()) / f"distlab-{os.getuid()}"

    # --- on-disk state ---------------------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        if not sandbox_id.isalnum():
            raise EngineError(f"invalid sandbox id {sandbox_id!r}")
        return self.state_dir / sandbox_id

    @contextlib.contextmanager
    def _locked(self, sandbox_id: str) -> Iterator[dict[str, Any]]:
        """Hold the sandbox's lock; yield its state (empty if it has none yet), written
        back afterwards if it changed."""
        folder = self._dir(sandbox_id)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = folder / STATE_FILE
            state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
            before = json.dumps(state, sort_keys=True)
            yield state
            if state and json.dumps(state, sort_keys=True) != before:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(state, indent=1))
                tmp.replace(path)
        if not state and not path.exists():
            shutil.rmtree(folder, ignore_errors=True)  # asked about a sandbox that isn't

    def _read(self, sandbox_id: str) -> dict[str, Any] | None:
        path = self._dir(sandbox_id) / STATE_FILE
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def _socket(self, sandbox_id: str, name: str) -> Path:
        return self.socket_dir / f"{sandbox_id[:16]}-{name}.sock"

    def _peers(self, state: dict[str, Any]) -> list[dict[str, str]]:
        return [
            {"name": name, "role": node["role"], "address": f"127.0.0.1:{node['port']}"}
            for name, node in state["nodes"].items()
        ]

    # --- processes ---------------------------------------------------------------------

    def _alive(self, state: dict[str, Any], name: str) -> int | None:
        pid = state["nodes"][name].get("pid")
        if not pid:
            return None
        proc = _proc_state(pid)
        if proc is None or proc in {"Z", "X"}:
            return None
        return pid if _is_our_process(pid, state["sandbox_id"], name) else None

    def _start(self, state: dict[str, Any], name: str) -> None:
        node = state["nodes"][name]
        folder = self._dir(state["sandbox_id"])
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        control = self._socket(state["sandbox_id"], name)
        with contextlib.suppress(FileNotFoundError):
            control.unlink()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            **node["env"],
            "DISTLAB_SANDBOX": state["sandbox_id"],
            "DISTLAB_NODE": name,
            "DISTLAB_ROLE": node["role"],
            "DISTLAB_PATTERN": state["pattern"],
            "DISTLAB_LISTEN": f"127.0.0.1:{node['port']}",
            "DISTLAB_PEERS": json.dumps(self._peers(state)),
            "DISTLAB_CONTROL": str(control),
            "DISTLAB_STATE_DIR": str(self.state_dir),
        }
        with open(folder / f"{name}.log", "ab") as out, open(folder / f"{name}.err", "ab") as err:
            process = subprocess.Popen(
                [self.python, "-m", "sandboxes.runtime.run", state["pattern"], node["program"]],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # survives the worker that started it
            )
        node["pid"] = process.pid
        node["started_at"] = time.time()
        node["exit_code"] = None
        # Reap it in the background if it dies while we live (no zombies).
        threading.Thread(target=process.wait, daemon=True).start()

    def _signal(self, state: dict[str, Any], name: str, sig: signal.Signals) -> bool:
        pid = self._alive(state, name)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        return True

    def _wait_gone(self, state: dict[str, Any], name: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self._alive(state, name) is not None and time.monotonic() < deadline:
            time.sleep(0.02)

    def _wait_proc_state(
        self, state: dict[str, Any], name: str, done: Any, timeout: float = 2.0
    ) -> None:
        """Signals are delivered asynchronously: wait until the kernel shows their effect."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self._alive(state, name)
            if pid is None or done(_proc_state(pid) or ""):
                return
            time.sleep(0.01)

    def _node(self, state: dict[str, Any] | None, sandbox_id: str, name: str) -> dict[str, Any]:
        if not state:
            raise EngineError(f"sandbox {sandbox_id} does not exist")
        if name not in state["nodes"]:
            raise NodeNotFound(f"sandbox {sandbox_id} has no node {name!r}")
        return dict(state["nodes"][name])

    # --- the interface -----------------------------------------------------------------

    def ping(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def create(self, spec: SandboxSpec) -> list[NodeStatus]:
        with self._locked(spec.sandbox_id) as state:
            if not state:
                state.update(
                    sandbox_id=spec.sandbox_id,
                    owner=spec.owner,
                    pattern=spec.pattern,
                    expires_at=spec.expires_at.isoformat(),
                    nodes={},
                )
            for node in spec.nodes:
                if node.name not in state["nodes"]:
                    state["nodes"][node.name] = self._node_record(node)
            # Ports are all known before any node starts: every node gets the full
            # address book in DISTLAB_PEERS.
            for node in spec.nodes:
                if self._alive(state, node.name) is None:
                    self._start(state, node.name)
        return self.status(spec.sandbox_id)

    def _node_record(self, node: NodeSpec) -> dict[str, Any]:
        return {
            "role": node.role,
            "program": node.program,
            "env": dict(node.env),
            "port": _free_port(),
            "pid": None,
            "paused": False,
            "partitioned": False,
        }

    def destroy(self, sandbox_id: str) -> None:
        folder = self._dir(sandbox_id)
        if folder.exists():
            with self._locked(sandbox_id) as state:
                for name in list(state.get("nodes", {})):
                    with contextlib.suppress(FileNotFoundError):
                        self._socket(sandbox_id, name).unlink()
            shutil.rmtree(folder, ignore_errors=True)
        self._kill_strays(sandbox_id)

    def _kill_strays(self, sandbox_id: str) -> None:
        """Kill every node process of the sandbox, found by its environment (so nodes the
        state file does not know, after a crash between start and record, go too), and
        wait until none is left."""
        deadline = time.monotonic() + 5.0
        while True:
            pids = [
                pid
                for pid, owner in _node_processes().items()
                if owner == sandbox_id
                and self._is_mine(pid)
                and _proc_state(pid) not in {None, "Z", "X"}
            ]
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def add_node(self, spec: SandboxSpec, node: NodeSpec) -> NodeStatus:
        with self._locked(spec.sandbox_id) as state:
            if not state:
                raise EngineError(f"sandbox {spec.sandbox_id} does not exist")
            if node.name not in state["nodes"]:
                state["nodes"][node.name] = self._node_record(node)
            if self._alive(state, node.name) is None:
                self._start(state, node.name)
        return next(s for s in self.status(spec.sandbox_id) if s.name == node.name)

    def remove_node(self, sandbox_id: str, name: str) -> None:
        with self._locked(sandbox_id) as state:
            if not state or name not in state["nodes"]:
                return
            self._signal(state, name, signal.SIGCONT)
            self._signal(state, name, signal.SIGKILL)
            self._wait_gone(state, name)
            del state["nodes"][name]
            with contextlib.suppress(FileNotFoundError):
                self._socket(sandbox_id, name).unlink()

    def status(self, sandbox_id: str) -> list[NodeStatus]:
        state = self._read(sandbox_id)
        if state is None:
            return []
        result = []
        for name, node in state["nodes"].items():
            pid = self._alive(state, name)
            node_state: NodeState
            if pid is None:
                node_state = "exited"
            elif _proc_state(pid) == "T":
                node_state = "paused"
            else:
                node_state = "running"
            result.append(
                NodeStatus(
                    name=name,
                    role=node["role"],
                    state=node_state,
                    address=f"127.0.0.1:{node['port']}",
                    exit_code=node.get("exit_code"),
                )
            )
        return result

    def kill(self, sandbox_id: str, name: str) -> None:
        with self._locked(sandbox_id) as state:
            self._node(state, sandbox_id, name)
            self._signal(state, name, signal.SIGKILL)
            self._wait_gone(state, name)
            state["nodes"][name]["exit_code"] = -signal.SIGKILL

    def pause(self, sandbox_id: str, name: str) -> None:
        with self._locked(sandbox_id) as state:
            self._node(state, sandbox_id, name)
            if not self._signal(state, name, signal.SIGSTOP):
                raise EngineError(f"node {name} is not running")
            self._wait_proc_state(state, name, lambda s: s == "T")

    def resume(self, sandbox_id: str, name: str) -> None:
        with self._locked(sandbox_id) as state:
            self._node(state, sandbox_id, name)
            if self._signal(state, name, signal.SIGCONT):
                self._wait_proc_state(state, name, lambda s: s != "T")

    def restart(self, sandbox_id: str, name: str) -> None:
        with self._locked(sandbox_id) as state:
            self._node(state, sandbox_id, name)
            self._signal(state, name, signal.SIGCONT)
            if self._signal(state, name, signal.SIGTERM):
                self._wait_gone(state, name, timeout=3.0)
                self._signal(state, name, signal.SIGKILL)
                self._wait_gone(state, name)
            self._start(state, name)
            state["nodes"][name]["partitioned"] = False

    def partition(self, sandbox_id: str, name: str) -> None:
        self._set_partition(sandbox_id, name, True)

    def heal(self, sandbox_id: str, name: str) -> None:
        self._set_partition(sandbox_id, name, False)

    def _set_partition(self, sandbox_id: str, name: str, on: bool) -> None:
        message: dict[str, Any] = (
            {"op": "fault", "kind": "partition", "peers": ["*"]}
            if on
            else {"op": "clear", "kind": "partition"}
        )
        reply = self.control(sandbox_id, name, message)
        if not reply.get("ok"):
            raise EngineError(f"node {name} refused the partition: {reply.get('error')}")
        with self._locked(sandbox_id) as state:
            if state and name in state["nodes"]:
                state["nodes"][name]["partitioned"] = on

    def control(self, sandbox_id: str, name: str, message: Mapping[str, Any]) -> dict[str, Any]:
        self._node(self._read(sandbox_id), sandbox_id, name)
        from sandboxes.runtime.ctl import send

        try:
            return send(str(self._socket(sandbox_id, name)), dict(message), timeout=5.0)
        except (OSError, TimeoutError, ValueError) as exc:
            raise EngineError(f"node {name} does not answer its control channel: {exc}") from exc

    def follow(
        self, sandbox_id: str, name: str, *, since: float | None = None, stop: Any = None
    ) -> Iterator[bytes]:
        path = self._dir(sandbox_id) / f"{name}.log"
        self._node(self._read(sandbox_id), sandbox_id, name)
        with open(path, "rb") as log:
            pending = b""
            skipping = False  # inside a line longer than MAX_LINE_BYTES: dropped whole
            while True:
                chunk = log.readline(MAX_LINE_BYTES + 1)
                if chunk:
                    pending += chunk
                    if not pending.endswith(b"\n"):
                        if len(pending) > MAX_LINE_BYTES:
                            pending, skipping = b"", True
                        continue
                    line, pending = pending.rstrip(b"\n"), b""
                    if skipping:
                        skipping = False
                        continue
                    if since is not None and _line_time(line) < since:
                        continue
                    yield line
                    continue
                if stop is not None and stop.is_set():
                    return
                state = self._read(sandbox_id)
                if state is None or name not in state["nodes"]:
                    return
                time.sleep(0.05)

    def list_sandboxes(self) -> list[SandboxInfo]:
        infos = []
        known: set[str] = set()
        folders = sorted(self.state_dir.iterdir()) if self.state_dir.exists() else []
        for folder in folders:
            state = self._read(folder.name) if folder.name.isalnum() else None
            if state is None:
                continue
            expires = state.get("expires_at")
            infos.append(
                SandboxInfo(
                    sandbox_id=state["sandbox_id"],
                    owner=state.get("owner", ""),
                    pattern=state.get("pattern", ""),
                    expires_at=datetime.fromisoformat(expires) if expires else None,
                    nodes=tuple(state["nodes"]),
                )
            )
            known.add(state["sandbox_id"])
        # Node processes of this engine whose state file is gone still count: housekeeping
        # must be able to find and remove them.
        stray_ids = {
            owner
            for pid, owner in _node_processes().items()
            if owner not in known
            and owner.isalnum()
            and self._is_mine(pid)
            and _proc_state(pid) not in {None, "Z", "X"}
        }
        for sandbox_id in sorted(stray_ids):
            infos.append(SandboxInfo(sandbox_id, "", "", None, ()))
        return infos

    def _is_mine(self, pid: int) -> bool:
        """A node started by this engine (same state folder), not by another install."""
        return f"DISTLAB_STATE_DIR={self.state_dir}".encode() in _environ(pid)


def _line_time(line: bytes) -> float:
    try:
        return float(json.loads(line).get("ts", 0.0))
    except (ValueError, AttributeError, TypeError):
        return 0.0
