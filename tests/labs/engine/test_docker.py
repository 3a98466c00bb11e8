"""The Docker engine against a real daemon: what only containers can show — hardening read
back from the engine, network isolation, resource abuse, and every fault as Docker sees
it. (What every engine must do is in test_contract.py.)

Skips on a machine without Docker; fails in CI, where `.ci/run` starts dockerd and builds
the image. Traffic goes only to containers these tests create and to a listener they start
on this machine; no test sends anything to an outside address.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import docker
import docker.errors
import pytest

from apps.labs.engine.base import (
    LABEL_EXPIRES,
    LABEL_NODE,
    LABEL_OWNER,
    LABEL_PATTERN,
    LABEL_ROLE,
    LABEL_SANDBOX,
    NODE_PORT,
    EngineError,
    EngineUnavailable,
    NodeNotFound,
    NodeSpec,
    SandboxSpec,
)
from apps.labs.engine.docker import (
    CONTROL_USER,
    HOLDER_MEMORY,
    HOLDER_PIDS,
    LABEL_ADDRESS,
    LABEL_PART,
    NODE_USER,
    DockerEngine,
)
from apps.labs.patterns import load_pattern
from tests.conftest import require

OWNER = "docker-test"  # every sandbox these tests make carries it: the sweep finds leftovers


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        time.sleep(0.05)


def lb_spec(*, replicas: int = 3) -> SandboxSpec:
    nodes = load_pattern("replicated-lb").expand(count_overrides={"replica": replicas})
    return SandboxSpec(
        sandbox_id=uuid.uuid4().hex,
        owner=OWNER,
        pattern="replicated-lb",
        expires_at=datetime.now(UTC) + timedelta(minutes=10),
        nodes=tuple(NodeSpec(n.name, n.role, n.program, dict(n.env)) for n in nodes),
    )


def sweep(engine: DockerEngine) -> None:
    """Destroy every sandbox these tests made, by label, whatever state it is in."""
    for info in engine.list_sandboxes():
        if info.owner == OWNER:
            engine.destroy(info.sandbox_id)


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    engine = DockerEngine()
    try:
        engine.ping()
    except EngineUnavailable as exc:
        require(False, f"a Docker engine ({exc})")
    from apps.labs.image import ImageError, ensure_image

    try:
        ensure_image(engine.client)
    except ImageError as exc:
        require(False, f"the sandbox image ({exc})")
    sweep(engine)
    yield engine
    sweep(engine)
    engine.close()


def answers(engine: DockerEngine, spec: SandboxSpec, name: str) -> bool:
    try:
        return engine.control(spec.sandbox_id, name, {"op": "state"}).get("ok") is True
    except EngineError:
        return False


def launch(engine: DockerEngine, spec: SandboxSpec) -> SandboxSpec:
    engine.create(spec)
    for node in spec.nodes:
        wait_for(functools.partial(answers, engine, spec, node.name), what=f"{node.name} answers")
    return spec


@pytest.fixture
def sandbox_factory(engine: DockerEngine) -> Iterator[Callable[..., SandboxSpec]]:
    """Launches sandboxes that are destroyed afterwards, even when the test fails."""
    made: list[SandboxSpec] = []

    def make(*, replicas: int = 3) -> SandboxSpec:
        spec = lb_spec(replicas=replicas)
        made.append(spec)
        return launch(engine, spec)

    yield make
    for spec in made:
        engine.destroy(spec.sandbox_id)


@pytest.fixture(scope="module")
def lab(engine: DockerEngine) -> Iterator[SandboxSpec]:
    """One running sandbox shared by the tests that only look at it."""
    spec = lb_spec()
    try:
        yield launch(engine, spec)
    finally:
        engine.destroy(spec.sandbox_id)


@pytest.fixture(scope="module")
def neighbour(engine: DockerEngine) -> Iterator[SandboxSpec]:
    """Another learner's sandbox on the same engine."""
    spec = lb_spec(replicas=1)
    try:
        yield launch(engine, spec)
    finally:
        engine.destroy(spec.sandbox_id)


def container(engine: DockerEngine, spec: SandboxSpec, name: str) -> dict[str, Any]:
    info: dict[str, Any] = engine.api.inspect_container(
        engine.container_name(spec.sandbox_id, name)
    )
    return info


def holder(engine: DockerEngine, spec: SandboxSpec, name: str) -> dict[str, Any]:
    """The container that holds the node's network namespace (address, name, resolver)."""
    info: dict[str, Any] = engine.api.inspect_container(engine.holder_name(spec.sandbox_id, name))
    return info


def node_ip(engine: DockerEngine, spec: SandboxSpec, name: str) -> str:
    networks = holder(engine, spec, name)["NetworkSettings"]["Networks"]
    return str(networks[engine.network_name(spec.sandbox_id)]["IPAddress"])


def labelled(engine: DockerEngine, spec: SandboxSpec) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = engine.api.containers(
        all=True, filters={"label": f"{LABEL_SANDBOX}={spec.sandbox_id}"}
    )
    return found


def network(engine: DockerEngine, spec: SandboxSpec) -> dict[str, Any]:
    info: dict[str, Any] = engine.api.inspect_network(engine.network_name(spec.sandbox_id))
    return info


def run_in(
    engine: DockerEngine, spec: SandboxSpec, name: str, code: str, timeout: float = 60
) -> tuple[int, str]:
    """Run a Python snippet inside a node (as the node's user); (exit code, output)."""
    api = engine.api
    exec_id = api.exec_create(
        engine.container_name(spec.sandbox_id, name), ["python3", "-c", code]
    )["Id"]
    output = api.exec_start(exec_id)
    return int(api.exec_inspect(exec_id)["ExitCode"]), output.decode(errors="replace")


CONNECT = """
import json, socket, sys, threading
results = {}
def probe(host, port):
    try:
        socket.create_connection((host, port), timeout=%(timeout)s).close()
        results[f"{host}:{port}"] = "connected"
    except OSError as exc:
        results[f"{host}:{port}"] = type(exc).__name__ + ": " + str(exc)
threads = [threading.Thread(target=probe, args=t) for t in %(targets)r]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(results))
"""


def connect_from(
    engine: DockerEngine,
    spec: SandboxSpec,
    name: str,
    targets: list[tuple[str, int]],
    timeout: float = 2.0,
) -> dict[str, str]:
    """Try a TCP connection from inside a node to each target: what happened to each."""
    code, output = run_in(engine, spec, name, CONNECT % {"targets": targets, "timeout": timeout})
    assert code == 0, output
    results: dict[str, str] = json.loads(output.strip().splitlines()[-1])
    return results


def http_get(engine: DockerEngine, spec: SandboxSpec, name: str, url: str) -> bool:
    code, _ = run_in(
        engine,
        spec,
        name,
        f"import urllib.request; urllib.request.urlopen({url!r}, timeout=1.5).read()",
    )
    return code == 0


def states(engine: DockerEngine, spec: SandboxSpec) -> dict[str, str]:
    return {s.name: s.state for s in engine.status(spec.sandbox_id)}


# -- launch ------------------------------------------------------------------------------


def test_it_launches_every_node_of_the_pattern(engine: DockerEngine, lab: SandboxSpec) -> None:
    statuses = engine.status(lab.sandbox_id)
    assert [(s.name, s.role) for s in statuses] == [(n.name, n.role) for n in lab.nodes]
    assert {s.state for s in statuses} == {"running"}
    assert [s.address for s in statuses] == [f"{n.name}:{NODE_PORT}" for n in lab.nodes]
    for node in lab.nodes:
        reply = engine.control(lab.sandbox_id, node.name, {"op": "state"})
        assert reply["ok"] is True
        assert (reply["node"], reply["role"]) == (node.name, node.role)
    containers = engine.api.containers(filters={"label": f"{LABEL_SANDBOX}={lab.sandbox_id}"})
    nodes = [c["Labels"][LABEL_NODE] for c in containers if LABEL_PART not in c["Labels"]]
    holders = [c["Labels"][LABEL_NODE] for c in containers if LABEL_PART in c["Labels"]]
    assert sorted(nodes) == sorted(holders) == sorted(n.name for n in lab.nodes)


def test_it_creates_twice_without_duplicating(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    spec = sandbox_factory(replicas=2)
    before = {
        c["Id"]
        for c in engine.api.containers(
            all=True, filters={"label": f"{LABEL_SANDBOX}={spec.sandbox_id}"}
        )
    }

    engine.create(spec)  # a redelivered launch task

    after = engine.api.containers(all=True, filters={"label": f"{LABEL_SANDBOX}={spec.sandbox_id}"})
    assert {c["Id"] for c in after} == before
    assert len(engine.api.networks(filters={"label": f"{LABEL_SANDBOX}={spec.sandbox_id}"})) == 1


def test_it_adopts_a_launch_that_died_half_way(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    spec = sandbox_factory(replicas=2)
    # What a worker killed mid-launch leaves: one node never made, one made but not
    # started, one whose holder never came (its node joined a holder that is gone), one
    # whose holder stopped under it.
    address = node_ip(engine, spec, "replica-1")
    engine.api.remove_container(engine.container_name(spec.sandbox_id, "lb"), force=True)
    engine.api.kill(engine.container_name(spec.sandbox_id, "traffic"))
    engine.api.remove_container(engine.holder_name(spec.sandbox_id, "replica-1"), force=True)
    engine.api.kill(engine.holder_name(spec.sandbox_id, "replica-2"))
    wait_for(lambda: states(engine, spec).get("traffic") == "exited")

    statuses = engine.create(spec)

    assert [(s.name, s.state) for s in statuses] == [(n.name, "running") for n in spec.nodes]
    assert len(labelled(engine, spec)) == 2 * len(spec.nodes)
    assert {c["State"] for c in labelled(engine, spec)} == {"running"}
    assert node_ip(engine, spec, "replica-1") == address  # the label kept its address
    for name in ("lb", "replica-1", "replica-2"):
        wait_for(functools.partial(answers, engine, spec, name), what=f"the re-made {name}")
    assert http_get(engine, spec, "traffic", f"http://replica-1:{NODE_PORT}/health")
    assert http_get(engine, spec, "traffic", f"http://replica-2:{NODE_PORT}/health")


def test_it_gives_each_sandbox_its_own_subnet_from_the_pool(
    engine: DockerEngine, lab: SandboxSpec, neighbour: SandboxSpec
) -> None:
    assert engine.capacity >= 200
    subnets = []
    for spec in (lab, neighbour):
        config = network(engine, spec)["IPAM"]["Config"]
        subnet = ipaddress.IPv4Network(config[0]["Subnet"])
        assert subnet.subnet_of(engine.subnet_pool)
        assert subnet.prefixlen == engine.subnet_prefix
        subnets.append(subnet)
    assert not subnets[0].overlaps(subnets[1])


def test_concurrent_launches_share_out_a_small_pool(engine: DockerEngine) -> None:
    """Four launches at once on a pool of exactly four subnets: each gets its own (the
    races are settled by retrying), and the fifth is told the pool is full."""
    small = DockerEngine(subnet_pool="10.214.0.0/24", subnet_prefix=26)
    specs = [
        SandboxSpec(
            sandbox_id=uuid.uuid4().hex,
            owner=OWNER,
            pattern="replicated-lb",
            expires_at=datetime.now(UTC) + timedelta(minutes=5),
            nodes=(NodeSpec("replica-1", "replica", "replica.py"),),
        )
        for _ in range(5)
    ]
    try:
        errors: list[Exception] = []

        def create(spec: SandboxSpec) -> None:
            try:
                small.create(spec)
            except EngineError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=create, args=(s,)) for s in specs[:4]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        subnets = {str(network(small, s)["IPAM"]["Config"][0]["Subnet"]) for s in specs[:4]}
        assert len(subnets) == 4
        with pytest.raises(EngineError, match="No free subnet"):
            small.create(specs[4])
    finally:
        for spec in specs:
            small.destroy(spec.sandbox_id)
        small.close()


# -- hardening ---------------------------------------------------------------------------


def assert_hardened(info: dict[str, Any]) -> None:
    host = info["HostConfig"]
    assert info["Config"]["User"] == NODE_USER != "10001:10001"  # not the platform's
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["Privileged"] is False
    assert host["ReadonlyRootfs"] is True
    assert host["Init"] is True
    assert host["Runtime"] == "runc"
    assert host["Memory"] == host["MemorySwap"] > 0
    assert host["PidsLimit"] > 0 and host["NanoCpus"] > 0
    assert host["LogConfig"]["Type"] == "json-file" and host["LogConfig"]["Config"]
    assert not host["PortBindings"] and not info["NetworkSettings"]["Ports"]


def test_the_image_has_no_setuid_or_setgid_binary(engine: DockerEngine) -> None:
    """With no-new-privileges a setuid binary could not raise privileges anyway; the image
    has none at all, so that nothing depends on that one setting (docs/security.md)."""
    found = engine.client.containers.run(
        engine.image,
        ["find", "/", "-xdev", "-perm", "/6000", "-type", "f"],
        entrypoint=[],
        network_mode="none",
        user="0:0",  # root sees every file; a node runs as 20001
        remove=True,
    )
    assert found.decode().split() == []


def test_every_container_is_hardened(engine: DockerEngine, lab: SandboxSpec) -> None:
    for node in lab.nodes:
        info = container(engine, lab, node.name)
        held = holder(engine, lab, node.name)
        assert_hardened(info)
        assert_hardened(held)
        # The node lives in its holder's network namespace, which alone is on the network.
        assert info["HostConfig"]["NetworkMode"] == f"container:{held['Id']}"
        assert info["NetworkSettings"]["Networks"] == {}
        assert list(held["NetworkSettings"]["Networks"]) == [engine.network_name(lab.sandbox_id)]
        endpoint = held["NetworkSettings"]["Networks"][engine.network_name(lab.sandbox_id)]
        assert node.name in endpoint["Aliases"]
        assert endpoint["IPAddress"] == info["Config"]["Labels"][LABEL_ADDRESS]
        assert held["Config"]["Hostname"] == node.name
        assert held["HostConfig"]["DnsOptions"] == ["timeout:1", "attempts:1"]
        assert held["HostConfig"]["PidsLimit"] == HOLDER_PIDS
        assert held["HostConfig"]["Memory"] == HOLDER_MEMORY
        assert held["Config"]["Entrypoint"] == ["sleep", "infinity"]
        held_labels = held["Config"]["Labels"]
        assert held_labels[LABEL_PART] == "holder" and held_labels[LABEL_NODE] == node.name
        assert held_labels[LABEL_SANDBOX] == lab.sandbox_id
        assert held_labels[LABEL_OWNER] == OWNER
        host = info["HostConfig"]
        assert info["Config"]["User"] == NODE_USER != "10001:10001"  # not the platform's
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["Privileged"] is False
        assert host["ReadonlyRootfs"] is True
        assert set(host["Tmpfs"]) == {"/tmp"} and "size=" in host["Tmpfs"]["/tmp"]
        assert host["PidsLimit"] == engine.pids_limit
        assert host["Memory"] == host["MemorySwap"] == engine.mem_limit
        assert host["NanoCpus"] == engine.nano_cpus
        assert host["LogConfig"] == {
            "Type": "json-file",
            "Config": {"max-size": engine.log_max_size, "max-file": str(engine.log_max_file)},
        }
        assert host["Init"] is True
        assert host["Runtime"] == "runc"
        labels = info["Config"]["Labels"]
        assert labels[LABEL_SANDBOX] == lab.sandbox_id
        assert labels[LABEL_OWNER] == OWNER
        assert labels[LABEL_PATTERN] == "replicated-lb"
        assert datetime.fromisoformat(labels[LABEL_EXPIRES]) == lab.expires_at
        assert (labels[LABEL_NODE], labels[LABEL_ROLE]) == (node.name, node.role)

    net = network(engine, lab)
    assert net["Internal"] is True
    assert net["Options"]["com.docker.network.bridge.inhibit_ipv4"] == "true"
    assert net["Labels"][LABEL_SANDBOX] == lab.sandbox_id
    assert net["Labels"][LABEL_OWNER] == OWNER
    assert net["Labels"][LABEL_PATTERN] == "replicated-lb"
    assert LABEL_EXPIRES in net["Labels"]


def test_nodes_run_unprivileged_on_a_read_only_root(engine: DockerEngine, lab: SandboxSpec) -> None:
    code, output = run_in(
        engine,
        lab,
        "replica-1",
        """
import os
print(os.getuid(), os.getgid())
for path in ("/opt/distlab/x", "/etc/x", "/tmp/x"):
    try:
        open(path, "w").write("x")
        print(path, "writable")
    except OSError as exc:
        print(path, exc.errno)
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines())
print(status["CapEff"].strip(), status["NoNewPrivs"].strip())
""",
    )
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0] == "20001 20001"
    assert lines[1] == "/opt/distlab/x 30" and lines[2] == "/etc/x 30"  # EROFS
    assert lines[3] == "/tmp/x writable"
    assert lines[4] == "0000000000000000 1"  # no capability, no new privileges


def test_the_image_has_no_set_user_or_group_id_program(
    engine: DockerEngine, lab: SandboxSpec
) -> None:
    code, output = run_in(
        engine,
        lab,
        "replica-1",
        """
import os, stat
found = []
for top in ("/bin", "/sbin", "/usr", "/lib", "/etc", "/opt", "/var"):
    for folder, _, files in os.walk(top):
        for name in files:
            try:
                mode = os.lstat(os.path.join(folder, name)).st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(os.path.join(folder, name))
print(len(found), found[:5])
""",
    )
    assert code == 0, output
    assert output.strip() == "0 []", output  # Debian's slim base has passwd, mount, su…


# -- isolation ---------------------------------------------------------------------------


def test_a_node_reaches_its_own_sandbox_but_not_another(
    engine: DockerEngine, lab: SandboxSpec, neighbour: SandboxSpec
) -> None:
    own = ("replica-1", NODE_PORT)
    other = (node_ip(engine, neighbour, "replica-1"), NODE_PORT)

    results = connect_from(engine, lab, "lb", [own, other])

    assert results[f"replica-1:{NODE_PORT}"] == "connected"  # the probe itself works
    assert results[f"{other[0]}:{NODE_PORT}"] != "connected", results
    # …and the other way round, by name and by address.
    back = connect_from(
        engine, neighbour, "lb", [("replica-1", NODE_PORT), (node_ip(engine, lab, "lb"), NODE_PORT)]
    )
    assert back[f"replica-1:{NODE_PORT}"] == "connected"
    assert back[f"{node_ip(engine, lab, 'lb')}:{NODE_PORT}"] != "connected", back


def host_addresses(engine: DockerEngine, spec: SandboxSpec) -> list[str]:
    """Every IPv4 address this machine might be reached at from a container: the gateway
    of the sandbox's subnet, Docker's default bridge, and the host's interfaces."""
    addresses = {str(network(engine, spec)["IPAM"]["Config"][0]["Gateway"])}
    with contextlib.suppress(docker.errors.NotFound):
        for config in engine.api.inspect_network("bridge")["IPAM"]["Config"]:
            if config.get("Gateway"):
                addresses.add(config["Gateway"])
    if shutil.which("ip"):
        shown = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True)
        for line in shown.stdout.splitlines():
            address = line.split()[3].split("/")[0]
            if not address.startswith("127."):
                addresses.add(address)
    return sorted(addresses)


def test_a_node_cannot_reach_a_listener_on_the_host(engine: DockerEngine, lab: SandboxSpec) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))  # noqa: S104 (every address of this machine, on purpose)
    listener.listen(16)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted: list[Any] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(peer)
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        wait_for(lambda: accepted, what="the listener accepts from the host itself")
        accepted.clear()
        targets = [(address, port) for address in host_addresses(engine, lab)]

        results = connect_from(engine, lab, "traffic", targets)

        assert all(outcome != "connected" for outcome in results.values()), results
        assert accepted == []
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=2)


def test_a_node_cannot_resolve_outside_names(engine: DockerEngine, lab: SandboxSpec) -> None:
    # getaddrinfo only asks Docker's embedded resolver: nothing is sent to these names.
    code, output = run_in(
        engine,
        lab,
        "traffic",
        """
import socket
for name in ("lb", "deb.debian.org", "example.com"):
    try:
        socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)
        print(name, "resolved")
    except socket.gaierror as exc:
        print(name, "failed", exc.errno)
""",
    )
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0] == "lb resolved"
    assert lines[1].startswith("deb.debian.org failed")
    assert lines[2].startswith("example.com failed")


# -- resource abuse ----------------------------------------------------------------------

FORK_BOMB = """
import os, signal, time
children, error = [], None
for _ in range(1000):
    try:
        pid = os.fork()
    except OSError as exc:
        error = exc.errno
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
time.sleep(%(hold)s)  # hold every pid while the test looks around
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
print(len(children), error)
"""


def test_a_fork_bomb_stops_at_the_pids_limit(
    engine: DockerEngine, lab: SandboxSpec, neighbour: SandboxSpec
) -> None:
    name = engine.container_name(lab.sandbox_id, "replica-2")
    result: list[tuple[int, str]] = []
    bomb = threading.Thread(
        target=lambda: result.append(run_in(engine, lab, "replica-2", FORK_BOMB % {"hold": 6}))
    )
    bomb.start()
    try:

        def pids() -> int:
            stats = engine.api.stats(name, stream=False, one_shot=True)
            return int(stats["pids_stats"].get("current", 0))

        wait_for(lambda: pids() >= engine.pids_limit - 1, what="the bomb fills the pids limit")
        assert pids() <= engine.pids_limit
        # The neighbouring sandbox keeps answering, and so does the rest of this one.
        assert answers(engine, neighbour, "replica-1")
        assert answers(engine, neighbour, "lb")
        assert answers(engine, lab, "lb")
    finally:
        bomb.join(timeout=60)
    code, output = result[0]
    assert code == 0, output
    forked, errno = output.split()
    assert int(forked) < engine.pids_limit and errno == "11"  # EAGAIN
    wait_for(lambda: answers(engine, lab, "replica-2"), what="replica-2 answers again")


def test_a_memory_bomb_takes_down_only_its_node(
    engine: DockerEngine,
    sandbox_factory: Callable[..., SandboxSpec],
    neighbour: SandboxSpec,
) -> None:
    spec = sandbox_factory(replicas=2)
    limit_mib = engine.mem_limit // 2**20

    code, output = run_in(
        engine,
        spec,
        "replica-1",
        f"""
chunks = []
for _ in range({2 * limit_mib // 16}):
    chunks.append(bytearray(16 * 2**20))
print("survived")
""",
    )

    assert code == 137 and "survived" not in output  # SIGKILL, from the OOM killer
    wait_for(lambda: states(engine, spec)["replica-1"] == "exited", what="replica-1 exited")
    status = {s.name: s for s in engine.status(spec.sandbox_id)}
    assert status["replica-1"].oom_killed is True
    assert status["replica-1"].exit_code == 137
    assert all(s.state == "running" for n, s in status.items() if n != "replica-1")
    assert answers(engine, spec, "replica-2") and answers(engine, spec, "lb")
    assert answers(engine, neighbour, "replica-1")

    engine.restart(spec.sandbox_id, "replica-1")
    wait_for(lambda: answers(engine, spec, "replica-1"), what="replica-1 back")
    assert engine.status(spec.sandbox_id)[0].oom_killed is False


# -- faults ------------------------------------------------------------------------------


def test_kill_and_restart(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    spec = sandbox_factory(replicas=2)
    engine.kill(spec.sandbox_id, "replica-1")

    status = engine.status(spec.sandbox_id)[0]
    assert (status.name, status.state, status.exit_code) == ("replica-1", "exited", 137)
    assert status.oom_killed is False
    assert not http_get(engine, spec, "lb", f"http://replica-1:{NODE_PORT}/health")
    with pytest.raises(EngineError, match="not running"):
        engine.control(spec.sandbox_id, "replica-1", {"op": "state"})
    with pytest.raises(EngineError, match="not running"):
        engine.pause(spec.sandbox_id, "replica-1")
    engine.kill(spec.sandbox_id, "replica-1")  # again: fine

    engine.restart(spec.sandbox_id, "replica-1")

    assert states(engine, spec)["replica-1"] == "running"
    wait_for(lambda: answers(engine, spec, "replica-1"), what="replica-1 answers")
    assert http_get(engine, spec, "lb", f"http://replica-1:{NODE_PORT}/health")


TIMED_CALL = """
import json, socket, time
start = time.perf_counter()
try:
    with socket.create_connection((%(host)r, %(port)d), timeout=1.0) as conn:
        conn.sendall(b"GET /health HTTP/1.0\\r\\n\\r\\n")
        outcome = "answered" if conn.recv(1) else "closed"
except OSError as exc:
    outcome = type(exc).__name__
print(json.dumps([outcome, time.perf_counter() - start]))
"""


def timed_call(engine: DockerEngine, spec: SandboxSpec, name: str, host: str) -> tuple[str, float]:
    """From inside node ``name``, one HTTP request to ``host`` with a 1 s timeout: what
    happened (answered, ConnectionRefusedError, TimeoutError…) and how long it took. (The
    host itself has no route to a sandbox's subnet: its bridge carries no host address.)"""
    code, output = run_in(engine, spec, name, TIMED_CALL % {"host": host, "port": NODE_PORT})
    assert code == 0, output
    outcome, took = json.loads(output.strip().splitlines()[-1])
    return str(outcome), float(took)


def test_a_killed_node_keeps_its_address_and_refuses_at_once(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    """Kill stops the node's process, not its network: the holder keeps the address and
    the name, so a connect is refused by the kernel at once (a crash fails fast), where a
    vanished address would leave callers waiting for their timeout."""
    spec = sandbox_factory(replicas=2)
    address = node_ip(engine, spec, "replica-1")
    held = holder(engine, spec, "replica-1")["Id"]
    assert timed_call(engine, spec, "lb", "replica-1")[0] == "answered"

    engine.kill(spec.sandbox_id, "replica-1")

    assert holder(engine, spec, "replica-1")["State"]["Running"] is True
    assert node_ip(engine, spec, "replica-1") == address
    for target in ("replica-1", address):
        outcome, took = timed_call(engine, spec, "lb", target)
        assert (outcome, took < 0.25) == ("ConnectionRefusedError", True), (target, took)

    engine.restart(spec.sandbox_id, "replica-1")

    assert holder(engine, spec, "replica-1")["Id"] == held
    wait_for(lambda: answers(engine, spec, "replica-1"), what="replica-1 answers")
    assert timed_call(engine, spec, "lb", "replica-1")[0] == "answered"


def test_a_paused_node_takes_connections_and_never_answers(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    spec = sandbox_factory(replicas=1)
    engine.pause(spec.sandbox_id, "replica-1")
    try:
        outcome, took = timed_call(engine, spec, "lb", "replica-1")
    finally:
        engine.resume(spec.sandbox_id, "replica-1")
    assert outcome == "TimeoutError" and took >= 0.9, (outcome, took)


def test_pause_and_resume(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    spec = sandbox_factory(replicas=2)
    engine.pause(spec.sandbox_id, "replica-2")
    engine.pause(spec.sandbox_id, "replica-2")  # again: fine

    assert states(engine, spec)["replica-2"] == "paused"
    with pytest.raises(EngineError, match="paused"):
        engine.control(spec.sandbox_id, "replica-2", {"op": "state"})
    # The kernel still takes the connection, but nobody answers: requests hang.
    assert not http_get(engine, spec, "lb", f"http://replica-2:{NODE_PORT}/health")

    engine.resume(spec.sandbox_id, "replica-2")
    engine.resume(spec.sandbox_id, "replica-2")  # again: fine

    assert states(engine, spec)["replica-2"] == "running"
    assert http_get(engine, spec, "lb", f"http://replica-2:{NODE_PORT}/health")
    assert answers(engine, spec, "replica-2")


def test_restart_of_a_running_node_starts_a_fresh_process(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    spec = sandbox_factory(replicas=1)
    started = container(engine, spec, "replica-1")["State"]["StartedAt"]

    engine.restart(spec.sandbox_id, "replica-1")

    assert container(engine, spec, "replica-1")["State"]["StartedAt"] != started
    wait_for(lambda: answers(engine, spec, "replica-1"), what="replica-1 answers")
    assert engine.control(spec.sandbox_id, "replica-1", {"op": "state"})["uptime_s"] < 30


def test_partition_cuts_a_node_off_and_heal_puts_it_back(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    spec = sandbox_factory(replicas=2)
    address = node_ip(engine, spec, "replica-1")
    assert container(engine, spec, "replica-1")["Config"]["Labels"][LABEL_ADDRESS] == address
    assert holder(engine, spec, "replica-1")["Config"]["Labels"][LABEL_ADDRESS] == address

    engine.partition(spec.sandbox_id, "replica-1")
    engine.partition(spec.sandbox_id, "replica-1")  # again: fine

    assert states(engine, spec)["replica-1"] == "running"
    assert holder(engine, spec, "replica-1")["NetworkSettings"]["Networks"] == {}
    cut = connect_from(engine, spec, "lb", [("replica-1", NODE_PORT), (address, NODE_PORT)])
    assert all(outcome != "connected" for outcome in cut.values()), cut
    out = connect_from(engine, spec, "replica-1", [("lb", NODE_PORT)])
    assert all(outcome != "connected" for outcome in out.values()), out
    assert answers(engine, spec, "replica-1")  # control needs no network

    engine.heal(spec.sandbox_id, "replica-1")
    engine.heal(spec.sandbox_id, "replica-1")  # again: fine

    assert node_ip(engine, spec, "replica-1") == address
    back = connect_from(engine, spec, "lb", [("replica-1", NODE_PORT), (address, NODE_PORT)])
    assert set(back.values()) == {"connected"}, back
    assert connect_from(engine, spec, "replica-1", [("lb", NODE_PORT)]) == {
        f"lb:{NODE_PORT}": "connected"
    }


def test_scaling_gives_new_nodes_the_whole_picture(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    spec = sandbox_factory(replicas=1)
    template = next(n for n in spec.nodes if n.role == "replica")

    status = engine.add_node(spec, NodeSpec("replica-2", "replica", "replica.py", template.env))
    again = engine.add_node(spec, NodeSpec("replica-2", "replica", "replica.py", template.env))

    assert (status.name, status.state) == ("replica-2", "running") and again == status
    assert [s.name for s in engine.status(spec.sandbox_id)] == [
        *(n.name for n in spec.nodes),
        "replica-2",
    ]
    wait_for(lambda: answers(engine, spec, "replica-2"), what="replica-2 answers")
    peers = engine.control(spec.sandbox_id, "replica-2", {"op": "state"})["peers"]
    assert {p["name"] for p in peers} == {*(n.name for n in spec.nodes), "replica-2"}
    assert http_get(engine, spec, "lb", f"http://replica-2:{NODE_PORT}/health")

    assert len(labelled(engine, spec)) == 2 * (len(spec.nodes) + 1)
    engine.remove_node(spec.sandbox_id, "replica-2")
    engine.remove_node(spec.sandbox_id, "replica-2")

    assert "replica-2" not in states(engine, spec)
    assert len(labelled(engine, spec)) == 2 * len(spec.nodes)
    assert "replica-2" not in {c["Labels"][LABEL_NODE] for c in labelled(engine, spec)}
    with pytest.raises(NodeNotFound, match="replica-2"):
        engine.control(spec.sandbox_id, "replica-2", {"op": "state"})


# -- telemetry ---------------------------------------------------------------------------


def test_follow_goes_on_across_a_kill_and_restart(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    spec = sandbox_factory(replicas=1)
    stop = threading.Event()
    events: list[dict[str, Any]] = []

    def follow() -> None:
        for raw in engine.follow(spec.sandbox_id, "replica-1", stop=stop):
            line = json.loads(raw)
            if line["type"] == "state":
                events.append(line)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        wait_for(lambda: [e for e in events if e["event"] == "started"], what="first start")
        engine.kill(spec.sandbox_id, "replica-1")
        engine.restart(spec.sandbox_id, "replica-1")
        wait_for(
            lambda: len([e for e in events if e["event"] == "started"]) == 2,
            what="the follower sees the second start",
        )
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive(), "follow() did not end when stop was set"
    starts = [e for e in events if e["event"] == "started"]
    assert starts[0]["ts"] < starts[1]["ts"]  # in order, none twice


def test_follow_ends_when_the_node_is_removed(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    spec = sandbox_factory(replicas=1)
    lines: list[bytes] = []
    thread = threading.Thread(
        target=lambda: lines.extend(engine.follow(spec.sandbox_id, "traffic")), daemon=True
    )
    thread.start()
    wait_for(lambda: lines, what="some telemetry")

    engine.destroy(spec.sandbox_id)

    thread.join(timeout=10)
    assert not thread.is_alive()


# -- housekeeping and errors -------------------------------------------------------------


def test_list_and_destroy_leave_no_labelled_object(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    spec = sandbox_factory(replicas=1)
    info = next(i for i in engine.list_sandboxes() if i.sandbox_id == spec.sandbox_id)
    assert (info.owner, info.pattern, info.expires_at) == (OWNER, "replicated-lb", spec.expires_at)
    assert sorted(info.nodes) == sorted(n.name for n in spec.nodes)

    engine.destroy(spec.sandbox_id)
    engine.destroy(spec.sandbox_id)  # again: fine

    label = {"label": f"{LABEL_SANDBOX}={spec.sandbox_id}"}
    assert engine.api.containers(all=True, filters=label) == []
    assert engine.api.networks(filters=label) == []
    assert spec.sandbox_id not in {i.sandbox_id for i in engine.list_sandboxes()}
    assert engine.status(spec.sandbox_id) == []


def test_a_sandbox_left_with_only_holders_is_listed_and_removed(
    engine: DockerEngine, sandbox_factory: Callable[..., SandboxSpec]
) -> None:
    """Reconciling finds a sandbox by any labelled object: holders whose nodes are gone
    (a worker died between the two removals) are never orphaned."""
    spec = sandbox_factory(replicas=1)
    for node in spec.nodes:
        engine.api.remove_container(engine.container_name(spec.sandbox_id, node.name), force=True)

    info = next(i for i in engine.list_sandboxes() if i.sandbox_id == spec.sandbox_id)
    assert info.nodes == () and engine.status(spec.sandbox_id) == []

    engine.destroy(spec.sandbox_id)

    assert labelled(engine, spec) == []
    assert engine.api.networks(filters={"label": f"{LABEL_SANDBOX}={spec.sandbox_id}"}) == []


def test_unknown_nodes_and_sandboxes_are_clear_errors(
    engine: DockerEngine, lab: SandboxSpec
) -> None:
    for operation in (
        engine.kill,
        engine.pause,
        engine.resume,
        engine.restart,
        engine.partition,
        engine.heal,
    ):
        with pytest.raises(NodeNotFound, match="no node named 'nobody'"):
            operation(lab.sandbox_id, "nobody")
    with pytest.raises(NodeNotFound):
        engine.control(uuid.uuid4().hex, "lb", {"op": "state"})
    with pytest.raises(NodeNotFound, match="not a valid node name"):
        engine.kill(lab.sandbox_id, "../etc")
    with pytest.raises(EngineError, match="not a valid sandbox id"):
        engine.destroy("-rf /")


def test_a_missing_image_is_a_clear_error(engine: DockerEngine) -> None:
    broken = DockerEngine(image="distlab-sandbox:does-not-exist")
    spec = lb_spec(replicas=1)
    try:
        with pytest.raises(EngineError, match="image distlab-sandbox:does-not-exist is missing"):
            broken.create(spec)
    finally:
        broken.destroy(spec.sandbox_id)
        broken.close()


def test_ping_says_when_docker_does_not_answer(tmp_path: Any) -> None:
    socket_path = tmp_path / "docker.sock"
    engine = DockerEngine(base_url=f"unix://{socket_path}")
    with pytest.raises(EngineUnavailable, match=f"{socket_path} does not exist"):
        engine.ping()
    with pytest.raises(EngineUnavailable, match="does not answer"):
        engine.status(uuid.uuid4().hex)


def test_ping_answers_with_a_running_daemon(engine: DockerEngine) -> None:
    engine.ping()
    assert isinstance(engine.client, docker.DockerClient)


HIJACK = r"""
import os, sys
site = "/tmp/.local/lib/python3.%d/site-packages" % sys.version_info.minor
os.makedirs(site, exist_ok=True)
with open(site + "/hijack.pth", "w") as pth:  # run by any interpreter that imports site
    pth.write("import os; os.write(1, b'{\"ok\": true, \"forged\": true}\\n'); os._exit(0)\n")
print("planted")
"""


def test_a_compromised_node_cannot_hijack_its_control_channel(
    engine: DockerEngine, lab: SandboxSpec
) -> None:
    """Code running in the node plants a .pth file in its user site-packages (HOME=/tmp):
    the platform's control messages still reach the real runtime and get its real reply,
    run as another user than the node's, and the planted code never runs."""
    code, output = run_in(engine, lab, "replica-1", HIJACK)
    assert (code, output.strip()) == (0, "planted")
    reply = engine.control(lab.sandbox_id, "replica-1", {"op": "state"})
    assert reply.get("ok") is True and "forged" not in reply, reply
    assert reply["node"] == "replica-1"
    assert CONTROL_USER.split(":")[0] != NODE_USER.split(":")[0]
