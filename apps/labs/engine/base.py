"""The engine interface: what runs a sandbox's nodes.

One small interface, several implementations (``docker.py``: real containers on a
private network; ``local.py``: subprocesses on 127.0.0.1 where no Docker engine runs), and
one shared test suite (``tests/labs/engine/``). The engine knows nothing about users,
quotas or the database: services call it with ids and specs, and it answers with what
exists. Every operation is idempotent where that makes sense (create adopts what already
exists; destroy of something gone is fine), because a Celery task may run it twice.

The node contract (environment, control messages, telemetry) is documented in
``sandboxes/README.md`` and ``sandboxes/runtime/TELEMETRY.md``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

NodeState = Literal["running", "paused", "exited", "missing"]

# Labels on every container and network the Docker engine creates (and, for the local
# engine, fields of its state file), so housekeeping can find them without the database.
LABEL_PREFIX = "io.distlab"
LABEL_SANDBOX = f"{LABEL_PREFIX}.sandbox"
LABEL_OWNER = f"{LABEL_PREFIX}.owner"
LABEL_PATTERN = f"{LABEL_PREFIX}.pattern"
LABEL_EXPIRES = f"{LABEL_PREFIX}.expires"
LABEL_NODE = f"{LABEL_PREFIX}.node"
LABEL_ROLE = f"{LABEL_PREFIX}.role"
# Which Distlab installation made it: housekeeping only ever touches its own.
LABEL_INSTANCE = f"{LABEL_PREFIX}.instance"

NODE_PORT = 8080  # every node listens here inside its container
# The longest line an engine's ``follow`` yields. A node's output is untrusted: a longer
# line (a 10 MB one, or one with no end) is dropped whole, and no more than this is held.
MAX_LINE_BYTES = 64 * 1024


def split_lines(chunks: Iterable[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The lines of a stream of chunks, without their newline. A line longer than
    ``limit`` is dropped, and no more than ``limit`` bytes of one are ever kept."""
    pending = b""
    skipping = False  # inside a line already known to be too long
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if skipping:
                skipping = False
            elif len(line) <= limit:
                yield line
        if len(pending) > limit:
            pending, skipping = b"", True


class EngineError(RuntimeError):
    """The engine could not do what was asked (engine down, object missing, …). The
    message is shown to people: say what failed in plain words."""


class EngineUnavailable(EngineError):
    """The engine does not answer at all (Docker daemon down, socket missing)."""


class NodeNotFound(EngineError):
    pass


@dataclass(frozen=True)
class NodeSpec:
    """One node to run: the program ``sandboxes/patterns/<pattern>/<program>`` under the
    runtime, with ``env`` added to the runtime's own ``DISTLAB_*`` variables."""

    name: str  # unique within the sandbox: "lb", "replica-2"
    role: str  # "balancer", "replica", "client", …
    program: str  # file name inside the pattern folder: "replica.py"
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SandboxSpec:
    sandbox_id: str  # the Sandbox row's id (hex), used in names and labels
    owner: str  # username, for labels
    pattern: str  # pattern id
    expires_at: datetime
    nodes: tuple[NodeSpec, ...]


@dataclass(frozen=True)
class NodeStatus:
    name: str
    role: str
    state: NodeState
    address: str  # host:port other nodes (and only they) use to reach it
    exit_code: int | None = None
    oom_killed: bool = False


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the engine sees it (from labels), for housekeeping."""

    sandbox_id: str
    owner: str
    pattern: str
    expires_at: datetime | None
    nodes: tuple[str, ...]


class Engine(abc.ABC):
    """Runs sandboxes. Implementations must be safe to call from several processes (the
    web server, Celery workers, the supervisor) at once."""

    name: str = "abstract"
    #: False when nodes are plain processes of the platform's user: the UI says so.
    isolated: bool = True

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise EngineUnavailable unless the engine answers."""

    @abc.abstractmethod
    def create(self, spec: SandboxSpec) -> list[NodeStatus]:
        """Create the sandbox's network and start every node; adopt whatever of it
        already exists (a redelivered launch). Returns once every node process runs."""

    @abc.abstractmethod
    def destroy(self, sandbox_id: str) -> None:
        """Remove every node and the network of a sandbox. Fine if already gone."""

    @abc.abstractmethod
    def add_node(self, spec: SandboxSpec, node: NodeSpec) -> NodeStatus:
        """Start one more node in a running sandbox (scaling a replicated role)."""

    @abc.abstractmethod
    def remove_node(self, sandbox_id: str, name: str) -> None:
        """Stop and remove one node. Fine if already gone."""

    @abc.abstractmethod
    def status(self, sandbox_id: str) -> list[NodeStatus]:
        """Every node the engine has for this sandbox, in creation order."""

    @abc.abstractmethod
    def kill(self, sandbox_id: str, name: str) -> None:
        """SIGKILL the node's process; the node stays (exited) until restart."""

    @abc.abstractmethod
    def pause(self, sandbox_id: str, name: str) -> None:
        """Freeze the node (cgroup freezer / SIGSTOP): connections hang, nothing fails."""

    @abc.abstractmethod
    def resume(self, sandbox_id: str, name: str) -> None: ...

    @abc.abstractmethod
    def restart(self, sandbox_id: str, name: str) -> None:
        """Start the node again (after kill, or a fresh process if running)."""

    @abc.abstractmethod
    def partition(self, sandbox_id: str, name: str) -> None:
        """Cut the node off from every other node of its sandbox."""

    @abc.abstractmethod
    def heal(self, sandbox_id: str, name: str) -> None: ...

    @abc.abstractmethod
    def control(self, sandbox_id: str, name: str, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send one control message to the node's runtime and return its reply, through a
        path that needs no network route into the sandbox (docker exec, or the node's
        unix socket for local processes)."""

    @abc.abstractmethod
    def follow(
        self, sandbox_id: str, name: str, *, since: float | None = None, stop: Any = None
    ) -> Iterator[bytes]:
        """Yield the node's stdout lines (telemetry), from ``since`` (a Unix time) or
        the start, and keep following until the node is removed or ``stop`` (a
        ``threading.Event``) is set."""

    @abc.abstractmethod
    def list_sandboxes(self) -> list[SandboxInfo]:
        """Every sandbox this engine has objects for (from labels), for reconciling."""
