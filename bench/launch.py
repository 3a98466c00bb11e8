"""Launch-to-healthy time of a pattern's sandbox (default: the load-balanced service, 5
nodes: 10 containers, each node a network holder and the node's own container) on the
Docker engine, against the baseline of starting the same containers one by one with the
CLI. Prints one JSON object.

    make bench            # or: .venv/bin/python bench/launch.py [--runs N] [--pattern ID]

Both sides are timed the same way: from nothing to every node answering a control
``{"op": "state"}`` (through ``docker exec``, once its log says its runtime started),
network included. The engine creates the
network, then creates and starts the nodes concurrently through the API (each node's
holder, then the node in the holder's network namespace). The baseline runs ``docker
network create`` and then, for each node in a row, ``docker run -d`` of its holder and
``docker run -d --network container:<holder>`` of the node, with the same image, network,
addresses, hardening flags and labels. Runs alternate
between the two, after one warm-up of each. Everything made is removed at the end.

Target on the 2-core reference machine: engine p50 <= 2.0 s, ratio (engine / baseline
p50) <= 1.0. Needs a Docker engine; builds the sandbox image if it is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from apps.labs.engine.base import (  # noqa: E402
    LABEL_NODE,
    LABEL_ROLE,
    EngineError,
    NodeSpec,
    SandboxSpec,
)
from apps.labs.engine.docker import (  # noqa: E402
    HOLDER,
    HOLDER_COMMAND,
    HOLDER_MEMORY,
    HOLDER_NANO_CPUS,
    HOLDER_PIDS,
    LABEL_ADDRESS,
    LABEL_INDEX,
    LABEL_PART,
    NODE_USER,
    DockerEngine,
)
from apps.labs.image import ensure_image  # noqa: E402
from apps.labs.patterns import load_pattern  # noqa: E402

OWNER = "bench-launch"
DEFAULT_PATTERN = "replicated-lb"  # --pattern picks another


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def make_spec(pattern: str) -> SandboxSpec:
    nodes = load_pattern(pattern).expand()
    return SandboxSpec(
        sandbox_id=uuid.uuid4().hex,
        owner=OWNER,
        pattern=pattern,
        expires_at=datetime.now(UTC) + timedelta(minutes=10),
        nodes=tuple(NodeSpec(n.name, n.role, n.program, dict(n.env)) for n in nodes),
    )


def wait_healthy(engine: DockerEngine, spec: SandboxSpec, timeout: float = 60.0) -> None:
    """Until every node answers a control state. Each node's log stream says when its
    runtime has started; only then is it asked (through ``docker exec``), since an exec
    runs inside the node's own CPU quota and asking early would slow the start down."""
    deadline = time.monotonic() + timeout
    failures: list[str] = []

    def wait(name: str) -> None:
        stop = threading.Event()
        timer = threading.Timer(timeout, stop.set)
        timer.start()
        try:
            for raw in engine.follow(spec.sandbox_id, name, stop=stop):
                line = json.loads(raw)
                if line.get("type") == "state" and line.get("event") == "started":
                    break
        finally:
            timer.cancel()
        while time.monotonic() < deadline:
            try:
                if engine.control(spec.sandbox_id, name, {"op": "state"}).get("ok"):
                    return
            except EngineError:
                pass
            time.sleep(0.05)
        failures.append(name)

    threads = [threading.Thread(target=wait, args=(n.name,)) for n in spec.nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"nodes never answered: {', '.join(failures)}")


def engine_launch(engine: DockerEngine, pattern: str) -> tuple[float, float]:
    """(seconds until create() returned, seconds until every node answered)."""
    spec = make_spec(pattern)
    try:
        start = time.perf_counter()
        engine.create(spec)
        created = time.perf_counter() - start
        wait_healthy(engine, spec)
        return created, time.perf_counter() - start
    finally:
        engine.destroy(spec.sandbox_id)


def cli_launch(engine: DockerEngine, docker_cli: str, pattern: str) -> float:
    """The baseline: the same sandbox, one `docker run -d` after the other (a holder,
    then its node)."""
    spec = make_spec(pattern)
    labels = engine._sandbox_labels(spec)
    peers = [(n.name, n.role) for n in spec.nodes]
    network = engine.network_name(spec.sandbox_id)
    try:
        start = time.perf_counter()
        subnet = engine._free_subnet(spec.sandbox_id, set())
        run(
            docker_cli, "network", "create", "--internal", "--driver", "bridge",
            "--subnet", str(subnet), "--gateway", str(subnet[1]),
            "--opt", "com.docker.network.bridge.inhibit_ipv4=true",
            *(f"--label={k}={v}" for k, v in labels.items()),
            network,
        )  # fmt: skip
        addresses = engine._free_addresses(subnet, set(), len(spec.nodes))
        for index, (node, address) in enumerate(zip(spec.nodes, addresses, strict=True)):
            node_labels = {
                **labels,
                LABEL_NODE: node.name,
                LABEL_ROLE: node.role,
                LABEL_INDEX: str(index),
                LABEL_ADDRESS: address,
            }
            env = engine._environment(spec, node, peers)
            holder = engine.holder_name(spec.sandbox_id, node.name)
            hardening = [
                "--user", NODE_USER, "--read-only",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--ipc", "private",
                "--log-driver", "json-file", "--log-opt", f"max-size={engine.log_max_size}",
                "--log-opt", f"max-file={engine.log_max_file}",
                "--init", "--runtime", engine.runtime,
            ]  # fmt: skip
            run(
                docker_cli, "run", "-d", "--name", holder,
                "--network", network, "--ip", address, "--network-alias", node.name,
                "--hostname", node.name, *hardening,
                "--pids-limit", str(HOLDER_PIDS),
                "--memory", str(HOLDER_MEMORY), "--memory-swap", str(HOLDER_MEMORY),
                "--cpus", str(HOLDER_NANO_CPUS / 1e9),
                "--dns-opt", "timeout:1", "--dns-opt", "attempts:1", "--stop-timeout", "1",
                *(f"--label={k}={v}" for k, v in {**node_labels, LABEL_PART: HOLDER}.items()),
                "--entrypoint", HOLDER_COMMAND[0], engine.image, *HOLDER_COMMAND[1:],
            )  # fmt: skip
            run(
                docker_cli, "run", "-d",
                "--name", engine.container_name(spec.sandbox_id, node.name),
                "--network", f"container:{holder}", "--workdir", "/opt/distlab", *hardening,
                "--tmpfs", f"/tmp:rw,nosuid,nodev,noexec,size={engine.tmpfs_size},mode=1777",
                "--pids-limit", str(engine.pids_limit),
                "--memory", str(engine.mem_limit), "--memory-swap", str(engine.mem_limit),
                "--cpus", str(engine.nano_cpus / 1e9), "--stop-timeout", str(engine.stop_timeout),
                *(f"--label={k}={v}" for k, v in node_labels.items()),
                *(f"--env={k}={v}" for k, v in env.items()),
                engine.image, "python3", "-m", "sandboxes.runtime.run", spec.pattern, node.program,
            )  # fmt: skip
        wait_healthy(engine, spec)
        return time.perf_counter() - start
    finally:
        engine.destroy(spec.sandbox_id)


def run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed: {done.stderr.strip()}")


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "p50_s": round(statistics.median(samples), 3),
        "p95_s": round(percentile(samples, 95), 3),
        "min_s": round(min(samples), 3),
        "max_s": round(max(samples), 3),
        "samples_s": [round(s, 3) for s in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="launches of each kind (>= 10)")
    parser.add_argument("--pattern", default=DEFAULT_PATTERN, help="the pattern to launch")
    args = parser.parse_args()
    pattern = args.pattern
    nodes = len(load_pattern(pattern).expand())
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        raise SystemExit("the docker command line is missing (apt-get install docker.io)")

    engine = DockerEngine()
    engine.ping()
    ensure_image(engine.client)
    for info in engine.list_sandboxes():  # left by an interrupted run
        if info.owner == OWNER:
            engine.destroy(info.sandbox_id)
    try:
        engine_launch(engine, pattern)  # warm-ups: page cache, image layers, the daemon's own
        cli_launch(engine, docker_cli, pattern)
        created: list[float] = []
        healthy: list[float] = []
        baseline: list[float] = []
        for _ in range(args.runs):
            made, ready = engine_launch(engine, pattern)
            created.append(made)
            healthy.append(ready)
            baseline.append(cli_launch(engine, docker_cli, pattern))
    finally:
        for info in engine.list_sandboxes():
            if info.owner == OWNER:
                engine.destroy(info.sandbox_id)
        engine.close()

    engine_p50 = statistics.median(healthy)
    baseline_p50 = statistics.median(baseline)
    ratio = engine_p50 / baseline_p50
    print(
        json.dumps(
            {
                "benchmark": "launch",
                "pattern": pattern,
                "nodes": nodes,
                "containers": 2 * nodes,  # a network holder and a node container per node
                "runs": args.runs,
                "measure": "launch to every node answering a control state, network included",
                "engine": {
                    **summary(healthy),
                    "create_p50_s": round(statistics.median(created), 3),
                },
                "baseline_docker_run": summary(baseline),
                "ratio_p50": round(ratio, 3),
                "target": {"p50_s": 2.0, "ratio": 1.0},
                "meets_target": engine_p50 <= 2.0 and ratio <= 1.0,
            }
        )
    )


if __name__ == "__main__":
    main()
