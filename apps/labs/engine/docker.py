"""The Docker engine: a sandbox is a private network and one hardened container per node.

Each sandbox gets its own ``internal`` bridge network, named ``distlab-<id[:12]>``, with a
subnet this engine allocates from a pool it owns (default ``10.213.0.0/16`` cut into /26s:
1024 sandboxes, 61 nodes each), because Docker's default address pools stop at about 30
networks. The bridge carries no host address (``inhibit_ipv4``), so a node cannot reach
the host or anything beyond it, only the other nodes of its sandbox; ``internal`` keeps
Docker from routing it anywhere else, and the embedded DNS answers only node names.

Each node is a pair of containers, the way a Kubernetes pod is a "pause" container and
its application:

- the **holder** ``distlab-<id[:12]>-<node>.net`` owns the node's network namespace: its
  fixed address on the sandbox network (kept in a label), the node's name as its DNS alias,
  the hostname and the resolver options. It runs ``sleep infinity`` from the same image,
  with tiny pids/memory/CPU limits, and nothing else ever happens to it;
- the **node** ``distlab-<id[:12]>-<node>`` runs ``python3 -m sandboxes.runtime.run
  <pattern> <program>`` inside the holder's namespace (``network_mode=container:<holder>``).

Both are hardened alike: a non-root user, every capability dropped, ``no-new-privileges``,
a read-only root (the node has a small tmpfs on /tmp), pids, memory (no swap) and CPU
limits, size-capped json-file logs, an init process, the configured OCI runtime, and no
published ports.

Faults act on the part that makes them look as the course says. ``kill`` and ``restart``
act on the node container only: its address stays up in the holder, so callers' connects
are refused at once (the kernel answers RST: a crash is a *fast* failure), instead of the
address vanishing from the bridge and every connect hanging until its timeout. ``pause``
freezes the node container: the kernel still queues connections on its listening socket
and nobody answers (a *slow* failure). ``partition`` and ``heal`` disconnect and reconnect
the holder, which cuts the node off with it; ``heal`` puts it back at the same address.

Everything carries the ``io.distlab.*`` labels of ``base.py``: the engine finds its objects
by label, never by remembering them, so any process may call any operation, and ``create``
adopts what a previous attempt left behind. Control messages go through ``docker exec`` of
``sandboxes.runtime.ctl``; telemetry comes from the container's log stream. Neither needs
a network route into the sandbox.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar

import docker
import docker.errors
import requests
from docker.types import IPAMConfig, IPAMPool, LogConfig

from apps.labs.engine.base import (
    LABEL_EXPIRES,
    LABEL_INSTANCE,
    LABEL_NODE,
    LABEL_OWNER,
    LABEL_PATTERN,
    LABEL_PREFIX,
    LABEL_ROLE,
    LABEL_SANDBOX,
    MAX_LINE_BYTES,
    NODE_PORT,
    Engine,
    EngineError,
    EngineUnavailable,
    NodeNotFound,
    NodeSpec,
    NodeState,
    NodeStatus,
    SandboxInfo,
    SandboxSpec,
    split_lines,
)

# Labels of this engine only, on containers: the node's position (status() lists nodes in
# creation order) and its fixed address on the sandbox network (heal reconnects with it).
LABEL_INDEX = f"{LABEL_PREFIX}.index"
LABEL_ADDRESS = f"{LABEL_PREFIX}.address"
# On a node's network holder (value "holder"); the node's own container has none. A holder
# carries its node's name in LABEL_NODE, so a pair is found by one label listing.
LABEL_PART = f"{LABEL_PREFIX}.part"
HOLDER = "holder"
HOLDER_COMMAND = ["sleep", "infinity"]  # coreutils, in every Debian image

NAME_PREFIX = "distlab"
RUNTIME_DIR = "/opt/distlab"  # where the image keeps sandboxes/ (cwd and PYTHONPATH)
CONTROL_SOCKET = "/tmp/distlab/control.sock"  # noqa: S108 (inside the node, on its tmpfs)
NODE_USER = "20001:20001"  # the image's unprivileged user (not the platform's 10001)
# Control messages run as another user than the node's, in an isolated interpreter (-I: no
# PYTHON* variables, no user site-packages; -S: no site module, so no .pth files), from the
# read-only image: code a compromised node plants in its /tmp cannot run in them, and the
# node cannot ptrace them.
CONTROL_USER = "20002:20001"  # in the node's group: its control socket is 0660
CONTROL_COMMAND = ["python3", "-I", "-S", "/opt/distlab/sandboxes/runtime/ctl.py"]
MiB = 1024 * 1024
# A holder runs docker-init and sleep: two processes, well under a MiB of memory. The
# limit is higher than that because runc's own init runs in the container's cgroup while
# the container starts (it copies the runc binary): under ~10 MiB it is sometimes
# OOM-killed and the start fails with "cannot start a stopped process" (moby#41167).
HOLDER_MEMORY = 32 * MiB
HOLDER_PIDS = 8
HOLDER_NANO_CPUS = 100_000_000

DEFAULT_SUBNET_POOL = "10.213.0.0/16"
DEFAULT_SUBNET_PREFIX = 26

_SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_NODE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,40}[a-z0-9])?$")
_STATES: dict[str, NodeState] = {"running": "running", "restarting": "running", "paused": "paused"}

T = TypeVar("T")


def _explain(exc: docker.errors.APIError) -> str:
    text = exc.explanation if isinstance(exc.explanation, str) else str(exc)
    return text.strip() or str(exc)


def _stamp_seconds(stamp: bytes) -> float:
    """A Docker log timestamp (RFC 3339, UTC, nine fixed digits) as a Unix time."""
    text = stamp.decode()
    whole = datetime.fromisoformat(text[:19] + "+00:00").timestamp()
    return whole + float("0" + text[19:].rstrip("Z"))


class DockerEngine(Engine):
    name = "docker"
    isolated = True

    def __init__(
        self,
        *,
        base_url: str | None = None,
        image: str | None = None,
        runtime: str = "runc",
        subnet_pool: str = DEFAULT_SUBNET_POOL,
        subnet_prefix: int = DEFAULT_SUBNET_PREFIX,
        mem_limit: int = 128 * MiB,
        nano_cpus: int = 500_000_000,
        pids_limit: int = 64,
        tmpfs_size: int = 16 * MiB,
        log_max_size: str = "2m",
        log_max_file: int = 2,
        stop_timeout: int = 2,
        timeout: float = 60.0,
        instance: str = "default",
    ) -> None:
        """``image`` defaults to the tag of the current ``sandboxes/`` (apps.labs.image);
        the other arguments are the per-node limits and the address pool."""
        try:
            self.subnet_pool = ipaddress.IPv4Network(subnet_pool)
        except ValueError as exc:
            raise EngineError(f"subnet pool {subnet_pool!r} is not an IPv4 network: {exc}") from exc
        if not self.subnet_pool.prefixlen <= subnet_prefix <= 29:
            raise EngineError(
                f"subnet prefix /{subnet_prefix} must lie between the pool's "
                f"/{self.subnet_pool.prefixlen} and /29"
            )
        self.subnet_prefix = subnet_prefix
        self.base_url = base_url or None
        self.runtime = runtime
        self.mem_limit = mem_limit
        self.nano_cpus = nano_cpus
        self.pids_limit = pids_limit
        self.tmpfs_size = tmpfs_size
        self.log_max_size = log_max_size
        self.log_max_file = log_max_file
        self.stop_timeout = stop_timeout
        self.timeout = timeout
        self.instance = instance
        self._image = image or None
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls) -> DockerEngine:
        from django.conf import settings

        return cls(
            base_url=getattr(settings, "DOCKER_HOST", "") or None,
            image=getattr(settings, "SANDBOX_IMAGE", "") or None,
            runtime=getattr(settings, "SANDBOX_RUNTIME", "runc") or "runc",
            subnet_pool=getattr(settings, "SANDBOX_SUBNET_POOL", DEFAULT_SUBNET_POOL),
            subnet_prefix=getattr(settings, "SANDBOX_SUBNET_PREFIX", DEFAULT_SUBNET_PREFIX),
            instance=getattr(settings, "SANDBOX_INSTANCE", "") or "default",
        )

    # -- plumbing ----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """How many sandbox networks the address pool holds."""
        return int(2 ** (self.subnet_prefix - self.subnet_pool.prefixlen))

    @property
    def image(self) -> str:
        if self._image is None:
            from apps.labs.image import image_tag

            self._image = image_tag()
        return self._image

    def _where(self) -> str:
        if self.base_url:
            return self.base_url
        return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    def _unavailable(self, exc: BaseException) -> EngineUnavailable:
        where = self._where()
        reason = str(exc)
        if where.startswith("unix://") and not os.path.exists(where.removeprefix("unix://")):
            reason = f"the socket {where.removeprefix('unix://')} does not exist"
        return EngineUnavailable(f"The Docker engine does not answer at {where}: {reason}")

    @property
    def client(self) -> docker.DockerClient:
        """The Docker SDK client, made on first use (so a missing daemon is reported by the
        operation that needs it, as EngineUnavailable)."""
        with self._lock:
            if self._client is None:
                kwargs = docker.utils.kwargs_from_env()
                if self.base_url:
                    kwargs["base_url"] = self.base_url
                try:
                    self._client = docker.DockerClient(
                        version="auto", timeout=self.timeout, max_pool_size=64, **kwargs
                    )
                except (docker.errors.DockerException, requests.RequestException) as exc:
                    raise self._unavailable(exc) from exc
            return self._client

    @property
    def api(self) -> docker.APIClient:
        """The low-level API (one call per request: what the engine uses)."""
        return self.client.api

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    @contextlib.contextmanager
    def _errors(self, what: str, *, sandbox_id: str = "", node: str = "") -> Iterator[None]:
        """Turn Docker's and the HTTP layer's exceptions into the engine's, worded for
        people: ``what`` completes "Docker could not …"."""
        try:
            yield
        except EngineError:
            raise
        except docker.errors.NotFound as exc:
            if node:
                raise NodeNotFound(f"Sandbox {sandbox_id} has no node named {node!r}.") from exc
            raise EngineError(f"Docker could not {what}: {_explain(exc)}") from exc
        except docker.errors.APIError as exc:
            raise EngineError(f"Docker could not {what}: {_explain(exc)}") from exc
        except requests.Timeout as exc:
            raise EngineError(f"Docker did not answer in time to {what}.") from exc
        except (requests.ConnectionError, docker.errors.DockerException) as exc:
            raise self._unavailable(exc) from exc

    @staticmethod
    def _check_ids(sandbox_id: str, node: str | None = None) -> None:
        if not _SANDBOX_ID.match(sandbox_id):
            raise EngineError(f"{sandbox_id!r} is not a valid sandbox id.")
        if node is not None and not _NODE_NAME.match(node):
            raise NodeNotFound(
                f"{node!r} is not a valid node name (lower-case letters, digits and '-')."
            )

    @staticmethod
    def network_name(sandbox_id: str) -> str:
        return f"{NAME_PREFIX}-{sandbox_id[:12]}"

    @staticmethod
    def container_name(sandbox_id: str, node: str) -> str:
        return f"{NAME_PREFIX}-{sandbox_id[:12]}-{node}"

    @staticmethod
    def holder_name(sandbox_id: str, node: str) -> str:
        """The node's network holder ('.' never occurs in a node name: no clash)."""
        return f"{NAME_PREFIX}-{sandbox_id[:12]}-{node}.net"

    @staticmethod
    def _is_holder(container: Mapping[str, Any]) -> bool:
        return (container.get("Labels") or {}).get(LABEL_PART) == HOLDER

    @staticmethod
    def _parallel(fn: Callable[[T], Any], items: list[T]) -> list[Any]:
        """Run ``fn`` over ``items`` on threads (the daemon does the work concurrently);
        the first exception is raised once every call has ended."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(len(items), 8)) as pool:
            futures = [pool.submit(fn, item) for item in items]
        return [future.result() for future in futures]

    def _sandbox_labels(self, spec: SandboxSpec) -> dict[str, str]:
        return {
            LABEL_SANDBOX: spec.sandbox_id,
            LABEL_OWNER: spec.owner,
            LABEL_PATTERN: spec.pattern,
            LABEL_EXPIRES: spec.expires_at.isoformat(),
            LABEL_INSTANCE: self.instance,
        }

    def _containers(self, sandbox_id: str | None = None) -> list[dict[str, Any]]:
        label = f"{LABEL_SANDBOX}={sandbox_id}" if sandbox_id else LABEL_SANDBOX
        containers: list[dict[str, Any]] = self.api.containers(all=True, filters={"label": label})
        return sorted(containers, key=lambda c: (int(c["Labels"].get(LABEL_INDEX, 0)), c["Id"]))

    def _pairs(
        self, sandbox_id: str
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """The sandbox's node containers and network holders, each by node name (node
        containers in creation order)."""
        nodes: dict[str, dict[str, Any]] = {}
        holders: dict[str, dict[str, Any]] = {}
        for container in self._containers(sandbox_id):
            name = container["Labels"].get(LABEL_NODE, "")
            (holders if self._is_holder(container) else nodes)[name] = container
        return nodes, holders

    def _networks(self, sandbox_id: str | None = None) -> list[dict[str, Any]]:
        label = f"{LABEL_SANDBOX}={sandbox_id}" if sandbox_id else LABEL_SANDBOX
        networks: list[dict[str, Any]] = self.api.networks(filters={"label": label})
        return networks

    def _inspect_node(self, sandbox_id: str, name: str) -> dict[str, Any]:
        self._check_ids(sandbox_id, name)
        with self._errors(f"find node {name}", sandbox_id=sandbox_id, node=name):
            info: dict[str, Any] = self.api.inspect_container(self.container_name(sandbox_id, name))
        labels = info["Config"].get("Labels") or {}
        if (
            labels.get(LABEL_SANDBOX) != sandbox_id
            or labels.get(LABEL_NODE) != name
            or labels.get(LABEL_PART) == HOLDER
        ):
            raise NodeNotFound(f"Sandbox {sandbox_id} has no node named {name!r}.")
        return info

    def _inspect_holder(self, sandbox_id: str, name: str) -> dict[str, Any]:
        """The node's network holder (after _inspect_node said the node exists)."""
        try:
            info: dict[str, Any] = self.api.inspect_container(self.holder_name(sandbox_id, name))
        except docker.errors.NotFound:
            info = {}
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_SANDBOX) != sandbox_id or labels.get(LABEL_PART) != HOLDER:
            raise EngineError(
                f"Node {name} has lost the container that holds its network address: "
                "stop and relaunch the sandbox."
            )
        return info

    # -- the network -------------------------------------------------------------------

    @staticmethod
    def _subnet_of(network: Mapping[str, Any]) -> ipaddress.IPv4Network | None:
        for config in (network.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(KeyError, ValueError):
                return ipaddress.IPv4Network(config["Subnet"])
        return None

    def _free_subnet(
        self, sandbox_id: str, taken: set[ipaddress.IPv4Network]
    ) -> ipaddress.IPv4Network:
        """A subnet of the pool overlapping no Docker network. The search starts at a
        place drawn from the sandbox id, so concurrent launches rarely pick the same."""
        used = list(taken)
        for network in self.api.networks():
            subnet = self._subnet_of(network)
            if subnet is not None:
                used.append(subnet)
        size = 2 ** (32 - self.subnet_prefix)
        count = self.capacity
        start = zlib.crc32(sandbox_id.encode()) % count
        base = int(self.subnet_pool.network_address)
        for step in range(count):
            index = (start + step) % count
            candidate = ipaddress.IPv4Network((base + index * size, self.subnet_prefix))
            if not any(candidate.overlaps(other) for other in used):
                return candidate
        raise EngineError(
            f"No free subnet is left in the sandbox address pool {self.subnet_pool} "
            f"({count} networks of /{self.subnet_prefix}): stop some sandboxes or widen "
            "the pool (SANDBOX_SUBNET_POOL)."
        )

    def _ensure_network(self, spec: SandboxSpec) -> tuple[str, ipaddress.IPv4Network]:
        """The sandbox's network (name, subnet), created unless it exists."""
        for network in self._networks(spec.sandbox_id):
            subnet = self._subnet_of(network)
            if subnet is not None:
                return network["Name"], subnet
        name = self.network_name(spec.sandbox_id)
        taken: set[ipaddress.IPv4Network] = set()
        for _attempt in range(20):
            subnet = self._free_subnet(spec.sandbox_id, taken)
            try:
                self.api.create_network(
                    name,
                    driver="bridge",
                    internal=True,
                    check_duplicate=True,
                    labels=self._sandbox_labels(spec),
                    options={
                        # No address of the host on the bridge: nodes cannot reach it.
                        "com.docker.network.bridge.inhibit_ipv4": "true",
                        "com.docker.network.bridge.enable_icc": "true",
                    },
                    ipam=IPAMConfig(
                        pool_configs=[IPAMPool(subnet=str(subnet), gateway=str(subnet[1]))]
                    ),
                )
            except docker.errors.APIError as exc:
                text = _explain(exc).lower()
                if exc.status_code == 409 or "already exists" in text:
                    # Another launch of this sandbox got there first: use its network.
                    for network in self._networks(spec.sandbox_id):
                        found = self._subnet_of(network)
                        if found is not None:
                            return network["Name"], found
                    raise EngineError(
                        f"A Docker network named {name} exists but belongs to no sandbox "
                        f"{spec.sandbox_id}."
                    ) from exc
                if "overlap" in text:
                    taken.add(subnet)  # a concurrent launch took it: try another
                    continue
                raise
            return name, subnet
        raise EngineError(f"Could not allocate a subnet for sandbox {spec.sandbox_id}.")

    # -- nodes -------------------------------------------------------------------------

    @staticmethod
    def _free_addresses(subnet: ipaddress.IPv4Network, used: set[str], count: int) -> list[str]:
        free: list[str] = []
        hosts = iter(subnet.hosts())
        next(hosts)  # the gateway's address (reserved, though not on the host)
        for host in hosts:
            if len(free) == count:
                break
            if str(host) not in used:
                free.append(str(host))
        if len(free) < count:
            raise EngineError(f"The sandbox network {subnet} has no free address left.")
        return free

    def _environment(
        self, spec: SandboxSpec, node: NodeSpec, peers: list[tuple[str, str]]
    ) -> dict[str, str]:
        return {
            "DISTLAB_SANDBOX": spec.sandbox_id,
            "DISTLAB_NODE": node.name,
            "DISTLAB_ROLE": node.role,
            "DISTLAB_PATTERN": spec.pattern,
            "DISTLAB_LISTEN": f"0.0.0.0:{NODE_PORT}",
            "DISTLAB_PEERS": json.dumps(
                [
                    {"name": name, "role": role, "address": f"{name}:{NODE_PORT}"}
                    for name, role in peers
                ]
            ),
            "DISTLAB_CONTROL": CONTROL_SOCKET,
            **node.env,
        }

    def _log_config(self) -> LogConfig:
        return LogConfig(
            type="json-file",
            config={"max-size": self.log_max_size, "max-file": str(self.log_max_file)},
        )

    def _holder_host_config(self, network: str) -> dict[str, Any]:
        """A node's network holder: the network, the resolver options, and limits that
        fit two sleeping processes. (Docker refuses a hostname, DNS settings, extra hosts,
        ports and network endpoints on a container that joins another's namespace: all
        of that lives here.)"""
        host_config: dict[str, Any] = self.api.create_host_config(
            network_mode=network,
            init=True,
            runtime=self.runtime,
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=HOLDER_PIDS,
            mem_limit=HOLDER_MEMORY,
            memswap_limit=HOLDER_MEMORY,
            nano_cpus=HOLDER_NANO_CPUS,
            ipc_mode="private",
            # Names outside the sandbox never resolve (nothing forwards them), so fail
            # in 1 s rather than the resolver's default 2 x 5 s: a killed peer's name
            # must not stall its callers. The node shares this resolver configuration.
            dns_opt=["timeout:1", "attempts:1"],
            log_config=self._log_config(),
        )
        return host_config

    def _node_host_config(self, holder_id: str) -> dict[str, Any]:
        host_config: dict[str, Any] = self.api.create_host_config(
            network_mode=f"container:{holder_id}",
            init=True,
            runtime=self.runtime,
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={self.tmpfs_size},mode=1777"},  # noqa: S108
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=self.pids_limit,
            mem_limit=self.mem_limit,
            memswap_limit=self.mem_limit,  # equal: no swap
            nano_cpus=self.nano_cpus,
            ipc_mode="private",
            log_config=self._log_config(),
        )
        return host_config

    def _create(self, sandbox_id: str, name: str, what: str, **kwargs: Any) -> str:
        """Create one container (or adopt the one a concurrent launch just made under
        the same name); returns its id."""
        with self._errors(f"create {what}"):
            try:
                created = self.api.create_container(
                    self.image, name=name, use_config_proxy=False, **kwargs
                )
                container_id: str = created["Id"]
            except docker.errors.ImageNotFound as exc:
                raise EngineError(
                    f"The sandbox image {self.image} is missing: build it with `make image` "
                    "(python -m apps.labs.image)."
                ) from exc
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
                # A concurrent launch created it between our listing and now: adopt it.
                info = self.api.inspect_container(name)
                if (info["Config"].get("Labels") or {}).get(LABEL_SANDBOX) != sandbox_id:
                    raise
                container_id = info["Id"]
        return container_id

    def _remove(self, container_id: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            try:
                self.api.remove_container(container_id, force=True, v=True)
            except docker.errors.APIError as exc:
                if "already in progress" not in _explain(exc):
                    raise

    def _bring_up(
        self,
        spec: SandboxSpec,
        node: NodeSpec,
        *,
        index: int,
        address: str,
        network: str,
        peers: list[tuple[str, str]],
        holder: Mapping[str, Any] | None = None,
        found: Mapping[str, Any] | None = None,
    ) -> str:
        """Make (or adopt and start) one node's holder and container, holder first;
        returns the node container's id. ``holder`` and ``found`` are what a listing
        showed of them, if anything: a node container that joined another holder than
        this one (its holder was removed since) is replaced."""
        labels = {
            **self._sandbox_labels(spec),
            LABEL_NODE: node.name,
            LABEL_ROLE: node.role,
            LABEL_INDEX: str(index),
            LABEL_ADDRESS: address,
        }
        holder_running = False
        if holder is None:
            endpoint = self.api.create_endpoint_config(aliases=[node.name], ipv4_address=address)
            holder_id = self._create(
                spec.sandbox_id,
                self.holder_name(spec.sandbox_id, node.name),
                f"the network holder of node {node.name}",
                entrypoint=HOLDER_COMMAND,
                hostname=node.name,
                user=NODE_USER,
                labels={**labels, LABEL_PART: HOLDER},
                host_config=self._holder_host_config(network),
                networking_config=self.api.create_networking_config({network: endpoint}),
                stop_timeout=1,
            )
        else:
            holder_id = holder["Id"]
            holder_running = holder.get("State") == "running"
        restarted = False
        if not holder_running:
            with self._errors(f"start the network holder of node {node.name}"):
                self.api.start(holder_id)
            restarted = True
        mode = f"container:{holder_id}"
        if found is not None and (found.get("HostConfig") or {}).get("NetworkMode") != mode:
            with self._errors(f"replace node {node.name}"):
                self._remove(found["Id"])
            found = None
        if found is None:
            container_id = self._create(
                spec.sandbox_id,
                self.container_name(spec.sandbox_id, node.name),
                f"node {node.name}",
                command=["python3", "-m", "sandboxes.runtime.run", spec.pattern, node.program],
                user=NODE_USER,
                working_dir=RUNTIME_DIR,
                environment=self._environment(spec, node, peers),
                labels=labels,
                host_config=self._node_host_config(holder_id),
                stop_timeout=self.stop_timeout,
            )
            with self._errors(f"start node {node.name}"):
                self.api.start(container_id)
            return container_id
        container_id = found["Id"]
        with self._errors(f"start node {node.name}"):
            if found.get("State") in {"created", "exited"}:
                self.api.start(container_id)
            elif restarted:  # it runs in the namespace of a holder that has stopped
                self.api.restart(container_id, timeout=self.stop_timeout)
        return container_id

    def _statuses(self, containers: list[dict[str, Any]]) -> list[NodeStatus]:
        def one(container: dict[str, Any]) -> NodeStatus:
            labels = container["Labels"]
            name = labels.get(LABEL_NODE, "")
            state = _STATES.get(container.get("State", ""), "exited")
            exit_code: int | None = None
            oom_killed = False
            if state == "exited":  # the listing has no exit code: ask for the details
                with contextlib.suppress(docker.errors.NotFound):
                    info = self.api.inspect_container(container["Id"])["State"]
                    oom_killed = bool(info.get("OOMKilled"))
                    if info.get("Status") != "created":
                        exit_code = info.get("ExitCode")
            return NodeStatus(
                name=name,
                role=labels.get(LABEL_ROLE, ""),
                state=state,
                address=f"{name}:{NODE_PORT}",
                exit_code=exit_code,
                oom_killed=oom_killed,
            )

        return [one(container) for container in containers]

    # -- the interface -----------------------------------------------------------------

    def ping(self) -> None:
        try:
            self.api.ping()
        except EngineUnavailable:
            raise
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise self._unavailable(exc) from exc

    def create(self, spec: SandboxSpec) -> list[NodeStatus]:
        self._check_ids(spec.sandbox_id)
        names = [node.name for node in spec.nodes]
        for name in names:
            self._check_ids(spec.sandbox_id, name)
        if len(set(names)) != len(names):
            raise EngineError(f"Sandbox {spec.sandbox_id} names a node twice.")
        with self._errors(f"launch sandbox {spec.sandbox_id}"):
            network, subnet = self._ensure_network(spec)
            nodes, holders = self._pairs(spec.sandbox_id)
            kept = {
                name: (holders.get(name) or nodes[name])["Labels"].get(LABEL_ADDRESS, "")
                for name in {*nodes, *holders}
            }
            kept = {name: address for name, address in kept.items() if address}
            missing = [node for node in spec.nodes if node.name not in kept]
            addresses = iter(self._free_addresses(subnet, set(kept.values()), len(missing)))
            peers = [(node.name, node.role) for node in spec.nodes]
            jobs: list[Callable[[], Any]] = []
            for index, node in enumerate(spec.nodes):
                holder, found = holders.get(node.name), nodes.get(node.name)
                if (
                    holder is not None
                    and found is not None
                    and holder["State"] == "running"
                    and found["State"] not in {"created", "exited"}
                ):
                    continue  # up already
                jobs.append(
                    functools.partial(
                        self._bring_up,
                        spec,
                        node,
                        index=index,
                        address=kept.get(node.name) or next(addresses),
                        network=network,
                        peers=peers,
                        holder=holder,
                        found=found,
                    )
                )
            self._parallel(lambda job: job(), jobs)
        return self.status(spec.sandbox_id)

    def destroy(self, sandbox_id: str) -> None:
        self._check_ids(sandbox_id)
        with self._errors(f"remove sandbox {sandbox_id}"):
            for _attempt in range(3):
                containers = self._containers(sandbox_id)
                # Nodes before their holders: no node is ever left in a holder's
                # namespace after the holder went.
                self._parallel(
                    self._remove, [c["Id"] for c in containers if not self._is_holder(c)]
                )
                self._parallel(self._remove, [c["Id"] for c in containers if self._is_holder(c)])
                try:
                    for network in self._networks(sandbox_id):
                        with contextlib.suppress(docker.errors.NotFound):
                            self.api.remove_network(network["Id"])
                except docker.errors.APIError as exc:
                    # A node appeared meanwhile (a late launch): remove it too.
                    if "active endpoints" not in _explain(exc):
                        raise
                    continue
                if self._containers(sandbox_id):
                    continue  # made by a late launch after the listing: go again
                return
            raise EngineError(f"Sandbox {sandbox_id} kept gaining nodes while being removed.")

    def add_node(self, spec: SandboxSpec, node: NodeSpec) -> NodeStatus:
        self._check_ids(spec.sandbox_id, node.name)
        with self._errors(f"add node {node.name}"):
            network, subnet = self._ensure_network(spec)
            nodes, holders = self._pairs(spec.sandbox_id)
            holder, found = holders.get(node.name), nodes.get(node.name)
            existing = holder or found
            address = (existing["Labels"].get(LABEL_ADDRESS, "") if existing else "") or ""
            if not address:
                used = {
                    c["Labels"].get(LABEL_ADDRESS, "") for c in [*nodes.values(), *holders.values()]
                }
                address = self._free_addresses(subnet, used, 1)[0]
            index = (
                int(existing["Labels"].get(LABEL_INDEX, 0))
                if existing
                else 1
                + max(
                    (
                        int(c["Labels"].get(LABEL_INDEX, 0))
                        for c in [*nodes.values(), *holders.values()]
                    ),
                    default=-1,
                )
            )
            peers = [
                (c["Labels"].get(LABEL_NODE, ""), c["Labels"].get(LABEL_ROLE, ""))
                for c in nodes.values()
                if c["Labels"].get(LABEL_NODE) != node.name
            ] + [(node.name, node.role)]
            if not (
                holder is not None
                and found is not None
                and holder["State"] == "running"
                and found["State"] not in {"created", "exited"}
            ):
                self._bring_up(
                    spec,
                    node,
                    index=index,
                    address=address,
                    network=network,
                    peers=peers,
                    holder=holder,
                    found=found,
                )
        for status in self.status(spec.sandbox_id):
            if status.name == node.name:
                return status
        raise NodeNotFound(f"Node {node.name} vanished right after it was started.")

    def remove_node(self, sandbox_id: str, name: str) -> None:
        self._check_ids(sandbox_id, name)
        with self._errors(f"remove node {name}"):
            nodes, holders = self._pairs(sandbox_id)
            if name in nodes:
                self._remove(nodes[name]["Id"])
            if name in holders:
                self._remove(holders[name]["Id"])

    def status(self, sandbox_id: str) -> list[NodeStatus]:
        self._check_ids(sandbox_id)
        with self._errors(f"read the state of sandbox {sandbox_id}"):
            nodes, _holders = self._pairs(sandbox_id)
            return self._statuses(list(nodes.values()))

    def kill(self, sandbox_id: str, name: str) -> None:
        info = self._inspect_node(sandbox_id, name)
        if not info["State"].get("Running"):
            return
        with self._errors(f"kill node {name}", sandbox_id=sandbox_id, node=name):
            try:
                self.api.kill(info["Id"], signal="SIGKILL")
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: it stopped by itself meanwhile
                    raise
            self.api.wait(info["Id"], timeout=self.timeout, condition="not-running")

    def pause(self, sandbox_id: str, name: str) -> None:
        info = self._inspect_node(sandbox_id, name)
        if info["State"].get("Paused"):
            return
        if not info["State"].get("Running"):
            raise EngineError(f"Node {name} is not running: there is nothing to pause.")
        with self._errors(f"pause node {name}", sandbox_id=sandbox_id, node=name):
            self.api.pause(info["Id"])

    def resume(self, sandbox_id: str, name: str) -> None:
        info = self._inspect_node(sandbox_id, name)
        if not info["State"].get("Paused"):
            return
        with self._errors(f"resume node {name}", sandbox_id=sandbox_id, node=name):
            self.api.unpause(info["Id"])

    def restart(self, sandbox_id: str, name: str) -> None:
        info = self._inspect_node(sandbox_id, name)
        with self._errors(f"restart node {name}", sandbox_id=sandbox_id, node=name):
            holder = self._inspect_holder(sandbox_id, name)
            if not holder["State"].get("Running"):
                self.api.start(holder["Id"])  # the node cannot start without its namespace
            if info["State"].get("Paused"):
                self.api.unpause(info["Id"])
            self.api.restart(info["Id"], timeout=self.stop_timeout)

    def partition(self, sandbox_id: str, name: str) -> None:
        """Disconnect the node's holder: the node shares its namespace, so it is cut off
        with it (and keeps running, its control channel needs no network)."""
        self._inspect_node(sandbox_id, name)
        network = self.network_name(sandbox_id)
        with self._errors(f"partition node {name}", sandbox_id=sandbox_id, node=name):
            holder = self._inspect_holder(sandbox_id, name)
            if network not in (holder["NetworkSettings"].get("Networks") or {}):
                return
            try:
                self.api.disconnect_container_from_network(holder["Id"], network)
            except docker.errors.APIError as exc:
                if "is not connected" not in _explain(exc):
                    raise

    def heal(self, sandbox_id: str, name: str) -> None:
        """Reconnect the node's holder at the address and under the name it had."""
        self._inspect_node(sandbox_id, name)
        network = self.network_name(sandbox_id)
        with self._errors(f"heal node {name}", sandbox_id=sandbox_id, node=name):
            holder = self._inspect_holder(sandbox_id, name)
            if network in (holder["NetworkSettings"].get("Networks") or {}):
                return
            address = (holder["Config"].get("Labels") or {}).get(LABEL_ADDRESS) or None
            try:
                self.api.connect_container_to_network(
                    holder["Id"], network, ipv4_address=address, aliases=[name]
                )
            except docker.errors.APIError as exc:
                if "already exists" not in _explain(exc):
                    raise

    def control(self, sandbox_id: str, name: str, message: Mapping[str, Any]) -> dict[str, Any]:
        info = self._inspect_node(sandbox_id, name)
        if info["State"].get("Paused"):
            raise EngineError(f"Node {name} is paused: it cannot answer until it is resumed.")
        if not info["State"].get("Running"):
            raise EngineError(f"Node {name} is not running: it cannot answer.")
        command = [*CONTROL_COMMAND, json.dumps(dict(message))]
        with self._errors(f"reach node {name}", sandbox_id=sandbox_id, node=name):
            exec_id = self.api.exec_create(
                info["Id"],
                command,
                stdout=True,
                stderr=True,
                workdir=RUNTIME_DIR,
                user=CONTROL_USER,
            )["Id"]
            out, err = self.api.exec_start(exec_id, demux=True)
            code = self.api.exec_inspect(exec_id).get("ExitCode")
        out_text = (out or b"").decode(errors="replace").strip()
        err_text = (err or b"").decode(errors="replace").strip()
        if code not in (0, 1):
            why = (err_text or out_text).splitlines()[-1:] or [f"exit status {code}"]
            raise EngineError(f"Node {name} does not answer its control channel: {why[0]}")
        try:
            reply = json.loads(out_text.splitlines()[-1])
        except (IndexError, ValueError) as exc:
            raise EngineError(
                f"Node {name} sent an unreadable control reply: {out_text[:200]!r}"
            ) from exc
        if not isinstance(reply, dict):
            raise EngineError(f"Node {name} sent an unreadable control reply: {reply!r}")
        return reply

    def follow(
        self, sandbox_id: str, name: str, *, since: float | None = None, stop: Any = None
    ) -> Iterator[bytes]:
        """Docker's log stream of the node's stdout, line by line (without the newline).
        It ends when the node stops; then this waits for a restart and goes on from the
        last line seen, so a follower outlives kill and restart. Ends when the node is
        removed or ``stop`` is set."""
        container_id = self._inspect_node(sandbox_id, name)["Id"]
        last = b""  # timestamp of the last line yielded (fixed width: compares as text)
        start: float | None = since if since is not None and since > 0 else None
        while not (stop is not None and stop.is_set()):
            try:
                with self._errors(f"follow node {name}", sandbox_id=sandbox_id, node=name):
                    stream = self.api.logs(
                        container_id,
                        stdout=True,
                        stderr=False,
                        stream=True,
                        follow=True,
                        timestamps=True,
                        since=start,
                    )
            except NodeNotFound:
                return
            done = threading.Event()
            if stop is not None:
                threading.Thread(
                    target=self._close_on_stop, args=(stream, stop, done), daemon=True
                ).start()
            try:
                # Each line starts with its timestamp (about 31 bytes) and a space.
                for raw in split_lines(stream, MAX_LINE_BYTES + 64):
                    stamp, _, line = raw.partition(b" ")
                    if stamp <= last or len(line) > MAX_LINE_BYTES:
                        continue  # seen before this stream was reopened, or too long
                    last = stamp
                    yield line
            except (requests.RequestException, OSError, ValueError, AttributeError):
                # Closed by the stop watcher, or broken (the daemon restarting): either
                # way, look at the node below and go on if it still runs.
                if stop is None or not stop.is_set():
                    time.sleep(0.2)
            finally:
                done.set()
                with contextlib.suppress(Exception):
                    stream.close()
            if last:
                start = max(_stamp_seconds(last) - 0.001, 1e-9)
            if not self._wait_running(container_id, stop):
                return

    @staticmethod
    def _close_on_stop(stream: Any, stop: threading.Event, done: threading.Event) -> None:
        while not done.is_set():
            if stop.wait(0.1):
                with contextlib.suppress(Exception):
                    stream.close()
                return

    def _wait_running(self, container_id: str, stop: Any) -> bool:
        """After a log stream ended: wait until the node runs again (True), or is removed
        or ``stop`` is set (False)."""
        while not (stop is not None and stop.is_set()):
            try:
                state = self.api.inspect_container(container_id)["State"]
            except docker.errors.NotFound:
                return False
            except (requests.RequestException, docker.errors.DockerException) as exc:
                raise self._unavailable(exc) from exc
            if state.get("Running"):
                return True
            time.sleep(0.2)
        return False

    def list_sandboxes(self) -> list[SandboxInfo]:
        with self._errors("list sandboxes"):
            containers = self._containers()
            networks = self._networks()
        found: dict[str, tuple[dict[str, str], list[str]]] = {}
        for labels in [n.get("Labels") or {} for n in networks]:
            if labels.get(LABEL_INSTANCE, "default") != self.instance:
                continue  # another installation's sandbox: never ours to reap
            found.setdefault(labels[LABEL_SANDBOX], (labels, []))
        for container in containers:
            labels = container["Labels"]
            if labels.get(LABEL_INSTANCE, "default") != self.instance:
                continue
            entry = found.setdefault(labels[LABEL_SANDBOX], (labels, []))
            if not self._is_holder(container):  # a lone holder still lists its sandbox
                entry[1].append(labels.get(LABEL_NODE, ""))
        infos = []
        for sandbox_id, (labels, nodes) in sorted(found.items()):
            expires: datetime | None = None
            with contextlib.suppress(KeyError, ValueError):
                expires = datetime.fromisoformat(labels[LABEL_EXPIRES])
            infos.append(
                SandboxInfo(
                    sandbox_id=sandbox_id,
                    owner=labels.get(LABEL_OWNER, ""),
                    pattern=labels.get(LABEL_PATTERN, ""),
                    expires_at=expires,
                    nodes=tuple(nodes),
                )
            )
        return infos
