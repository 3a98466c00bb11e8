"""What the benchmarks that run the platform share (not a benchmark itself).

``platform()`` gives a throwaway installation: a temporary folder with its own SQLite
database, engine state and ``SANDBOX_INSTANCE`` (so nothing of another installation is
touched), Django set up and migrated in this process, and helpers to sign users in with a
real session, launch sandboxes through the platform's services, and run platform commands
(``manage.py serve``, ``manage.py supervise``) as processes on the same database. On the
way out, normally or on Ctrl+C or SIGTERM, every process it started is stopped and every
sandbox it launched is removed.

    from _harness import platform

    with platform("distlab-fanout-", engine="local", redis=True) as lab:
        user = lab.user("owner")
        sandbox = lab.launch(user)
        server = lab.serve(port)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TICKS = os.sysconf("SC_CLK_TCK")


def percentile(samples: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0 to 100) of ``samples``, by rank, to 0.1; None when empty."""
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))], 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Platform:
    """One throwaway installation; see the module docstring."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        from apps.labs.engine import get_engine

        self.tmp = tmp
        self.env = env  # for the commands this starts: same database, engine, Redis
        self.engine: Any = get_engine()
        if self.engine.name == "docker":  # the sandbox image, built once if missing
            from apps.labs.image import ensure_image

            ensure_image(self.engine.client)
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.sandboxes: list[Any] = []
        self._users = 0

    # --- users and sandboxes -----------------------------------------------------------

    def user(self, username: str | None = None, **fields: Any) -> Any:
        from apps.accounts.models import User

        self._users += 1
        return User.objects.create_user(username=username or f"bench-{self._users}", **fields)

    def cookie(self, user: Any) -> str:
        """A ``Cookie`` header value with a real session of ``user`` (a session row)."""
        from django.test import Client

        client = Client()
        client.force_login(user)
        return f"sessionid={client.cookies['sessionid'].value}"

    def launch(self, user: Any, pattern: str = "replicated-lb", *, rps: float | None = None) -> Any:
        """A running sandbox of ``user``'s, started here (no worker needed)."""
        from apps.labs import services

        created = services.sandbox_launch(user=user, pattern_id=pattern, enqueue=False)
        self.sandboxes.append(created)
        sandbox = services.sandbox_start(sandbox_id=created.hex)
        if rps is not None:
            services.sandbox_control(sandbox=sandbox, control_id="rps", value=rps)
        return sandbox

    # --- processes ---------------------------------------------------------------------

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """``manage.py <args>`` in its own session (Ctrl+C reaches only us: we stop it),
        output to ``<tmp>/<name>.log``."""
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 (the process owns it)
        process = subprocess.Popen(
            [sys.executable, "manage.py", *args],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append((name, process))
        return process

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def serve(self, port: int, *args: str, timeout: float = 60.0) -> subprocess.Popen[bytes]:
        """``manage.py serve`` (Daphne) on 127.0.0.1:``port``, once it answers."""
        process = self.start("serve", "serve", "--port", str(port), *args)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                    return process
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"serve did not answer:\n{self.output('serve')}") from None
                time.sleep(0.2)

    def supervise(self, *args: str, timeout: float = 30.0) -> subprocess.Popen[bytes]:
        """``manage.py supervise``, once it says it runs."""
        process = self.start("supervise", "supervise", *args)
        deadline = time.monotonic() + timeout
        while "supervisor:" not in self.output("supervise"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"supervise did not start:\n{self.output('supervise')}")
            time.sleep(0.1)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def close(self) -> None:
        """Stop every process, then remove every sandbox (the engine's too: this
        installation's instance label and state folder are its own)."""
        from apps.labs import services

        for _name, process in reversed(self.processes):
            with contextlib.suppress(Exception):
                self.stop(process)
        for created in self.sandboxes:
            with contextlib.suppress(Exception):
                created.refresh_from_db()
                services.sandbox_stop(sandbox=created, enqueue=False)
            with contextlib.suppress(Exception):
                services.sandbox_teardown(sandbox_id=created.hex)
        with contextlib.suppress(Exception):
            for info in self.engine.list_sandboxes():
                self.engine.destroy(info.sandbox_id)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl+C does


@contextlib.contextmanager
def platform(
    prefix: str, *, engine: str = "local", redis: bool = False, **settings: str
) -> Iterator[Platform]:
    """A throwaway installation (see the module docstring). ``redis``: the Redis channel
    layer, cache and broker at REDIS_URL (default redis://127.0.0.1:6379/0); otherwise
    the in-memory ones. ``settings``: more environment variables."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.setdefault("DEBUG", "true")
    os.environ["DATABASE_URL"] = f"sqlite:///{tmp}/bench.sqlite3"
    os.environ["DISTLAB_VAR_DIR"] = str(tmp)
    os.environ["SANDBOX_ENGINE"] = engine
    os.environ["SANDBOX_INSTANCE"] = f"bench-{os.getpid()}"
    os.environ["REDIS_PREFIX"] = f"distlab-bench-{os.getpid()}"  # its own keys and groups
    os.environ["CONTENT_AUTO_SYNC"] = "false"
    os.environ["LOG_LEVEL"] = "WARNING"
    if redis:
        os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    else:
        os.environ.pop("REDIS_URL", None)
    os.environ.update(settings)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    lab = None
    try:
        lab = Platform(tmp, dict(os.environ))
        yield lab
    finally:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl+C waits
        try:
            if lab is not None:
                lab.close()
        finally:
            signal.signal(signal.SIGINT, interrupt)
            signal.signal(signal.SIGTERM, previous)
            shutil.rmtree(tmp, ignore_errors=True)
