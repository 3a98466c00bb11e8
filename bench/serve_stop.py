"""How long Ctrl+C takes to stop `manage.py serve` (what `make run` runs) while a sandbox
runs: from SIGINT to the process gone, over several starts. The sandbox (local engine) is
left running, as the README says, and removed at the end. Prints one JSON object.

    make bench   # or: .venv/bin/python bench/serve_stop.py [--runs 5]

Target (issue 15): within 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(env: dict[str, str]) -> subprocess.Popen[bytes]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("serve did not start")
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        drop = {"DATABASE_URL", "REDIS_URL", "SANDBOX_SUPERVISOR_IN_PROCESS"}
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(
            DEBUG="true",
            DATABASE_URL=f"sqlite:///{folder}/db.sqlite3",
            SANDBOX_ENGINE="local",
            DISTLAB_VAR_DIR=folder,
            SANDBOX_INSTANCE=f"bench-serve-stop-{os.getpid()}",
        )
        manage = [sys.executable, "manage.py"]
        subprocess.run([*manage, "migrate", "-v", "0"], cwd=REPO, env=env, check=True)
        subprocess.run([*manage, "demo_users"], cwd=REPO, env=env, check=True, capture_output=True)
        server = serve(env)
        launch = [*manage, "sandbox", "launch", "hello-cluster", "--user", "learner", "--wait"]
        subprocess.run(launch, cwd=REPO, env=env, check=True, capture_output=True)
        samples = []
        try:
            for run in range(args.runs):
                if run:
                    server = serve(env)
                time.sleep(2)  # the supervisor follows the sandbox
                started = time.monotonic()
                server.send_signal(signal.SIGINT)
                server.wait(30)
                samples.append(round(time.monotonic() - started, 3))
        finally:
            if server.poll() is None:
                server.kill()
            from apps.labs.engine.local import LocalEngine

            engine = LocalEngine(Path(folder) / "sandboxes")
            for info in engine.list_sandboxes():
                engine.destroy(info.sandbox_id)
    print(
        json.dumps(
            {
                "benchmark": "serve_stop",
                "measure": "SIGINT to process gone, one sandbox running (local engine)",
                "runs": len(samples),
                "p50_s": statistics.median(samples),
                "max_s": max(samples),
                "samples_s": samples,
                "target_s": TARGET_S,
                "meets_target": max(samples) <= TARGET_S,
            }
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
