"""What the benchmarks that run the platform share (not a benchmark itself).

``platform()`` gives a throwaway installation: a temporary folder with its own SQLite
database, engine state and ``SANDBOX_INSTANCE`` (so nothing of another installation is
touched), Django set up and migrated in this process, and helpers to sign users in with a
real session, launch sandboxes through the platform's services, and run platform commands
(``manage.py serve``, ``manage.py supervise``, a Celery worker and beat) as processes on
the same database, and restart or kill them. With ``redis="private"`` it runs a Redis of
its own on a free loopback port (never the machine's shared one), which it may restart.
On the way out, normally or on Ctrl+C or SIGTERM, every process it started is stopped and
every sandbox of the installation is removed.

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

    def __init__(self, tmp: Path, env: dict[str, str], *, redis_port: int | None = None) -> None:
        from apps.labs.engine import get_engine

        self.tmp = tmp
        self.env = env  # for the commands this starts: same database, engine, Redis
        engine: Any = get_engine()
        self.engine = engine
        if engine.name == "docker":  # the sandbox image, built once if missing
            from apps.labs.image import ensure_image

            ensure_image(engine.client)
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.sandboxes: list[Any] = []
        self._users = 0
        # How each named process was started (to start it again), and the private Redis.
        self._how: dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]] = {}
        self.redis_process: subprocess.Popen[bytes] | None = None
        self.redis_port = redis_port
        if redis_port is not None:
            self.redis()

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
        return self.run(name, [sys.executable, "manage.py", *args])

    def run(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Any command, as ``start`` runs ``manage.py``. A name started again (``restart``)
        appends to its log and replaces its entry in ``processes``."""
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 (the process owns it)
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes = [(n, p) for n, p in self.processes if n != name or p.poll() is None]
        self.processes.append((name, process))
        return process

    def process(self, name: str) -> subprocess.Popen[bytes]:
        """The latest process started under ``name``."""
        return next(p for n, p in reversed(self.processes) if n == name)

    def _log_size(self, name: str) -> int:
        path = self.tmp / f"{name}.log"
        return path.stat().st_size if path.exists() else 0

    def _wait_log(
        self, name: str, process: subprocess.Popen[bytes], text: str, since: int, timeout: float
    ) -> None:
        """Until ``text`` appears in ``name``'s log after byte ``since``."""
        path, wanted = self.tmp / f"{name}.log", text.encode()
        deadline = time.monotonic() + timeout
        while wanted not in path.read_bytes()[since:]:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start:\n{self.output(name)[-4000:]}")
            time.sleep(0.1)

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def serve(self, port: int, *args: str, timeout: float = 60.0) -> subprocess.Popen[bytes]:
        """``manage.py serve`` (Daphne) on 127.0.0.1:``port``, once it answers."""
        self._how["serve"] = (self.serve, (port, *args), {"timeout": timeout})
        process = self.start("serve", "serve", "--port", str(port), *args)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    return process
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"serve did not answer:\n{self.output('serve')}") from None
                time.sleep(0.2)

    def supervise(self, *args: str, timeout: float = 30.0) -> subprocess.Popen[bytes]:
        """``manage.py supervise``, once it says it runs."""
        self._how["supervise"] = (self.supervise, args, {"timeout": timeout})
        since = self._log_size("supervise")
        process = self.start("supervise", "supervise", *args)
        self._wait_log("supervise", process, "supervisor:", since, timeout)
        return process

    def worker(self, *args: str, timeout: float = 60.0) -> subprocess.Popen[bytes]:
        """A Celery worker (``celery -A config worker``, prefork, 2 processes, as the
        classroom stack's ``worker``), once it is ready. Needs a Redis (``redis=``)."""
        self._how["worker"] = (self.worker, args, {"timeout": timeout})
        since = self._log_size("worker")
        argv = [sys.executable, "-m", "celery", "-A", "config", "worker", "--loglevel=INFO"]
        process = self.run("worker", [*argv, "--concurrency=2", "--without-mingle", *args])
        self._wait_log("worker", process, " ready.", since, timeout)
        return process

    def beat(self, timeout: float = 30.0) -> subprocess.Popen[bytes]:
        """Celery beat (housekeeping every SANDBOX_REAP_INTERVAL s), once it runs."""
        self._how["beat"] = (self.beat, (), {"timeout": timeout})
        since = self._log_size("beat")
        schedule = str(self.tmp / "celerybeat-schedule")
        argv = [sys.executable, "-m", "celery", "-A", "config", "beat", "--loglevel=INFO"]
        process = self.run("beat", [*argv, f"--schedule={schedule}"])
        self._wait_log("beat", process, "maxinterval", since, timeout)  # its banner
        return process

    def redis(self, timeout: float = 20.0) -> subprocess.Popen[bytes]:
        """The installation's own Redis (no persistence) on 127.0.0.1:``redis_port``."""
        import redis

        assert self.redis_port is not None, "platform(..., redis='private') runs one"
        self._how["redis"] = (self.redis, (), {"timeout": timeout})
        server = shutil.which("redis-server") or "redis-server"
        argv = [server, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", ""]
        process = self.run("redis", [*argv, "--appendonly", "no", "--dir", str(self.tmp)])
        self.processes.remove(("redis", process))  # stopped last, after the sandboxes
        self.redis_process = process
        client = redis.Redis(port=self.redis_port, socket_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return process
            except redis.RedisError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"redis did not start:\n{self.output('redis')}") from None
                time.sleep(0.1)
            finally:
                client.close()

    def restart(self, name: str, *, kill: bool = False) -> subprocess.Popen[bytes]:
        """Stop the process started as ``name`` (SIGTERM, as a deploy does; ``kill``:
        SIGKILL to its whole process group, as a crash does), then start it again the
        same way, and return once it is ready again."""
        method, args, kwargs = self._how[name]
        process = self.redis_process if name == "redis" else self.process(name)
        assert process is not None
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        else:
            self.stop(process)
        return method(*args, **kwargs)

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
        installation's instance label and state folder are its own), the private Redis
        last."""
        from apps.labs import services
        from apps.labs.models import ACTIVE_STATES, Sandbox

        for _name, process in reversed(self.processes):
            with contextlib.suppress(Exception):
                self.stop(process)
        # Those launched here, and any other one of this throwaway database (launched
        # through the web server).
        others = Sandbox.objects.filter(state__in=ACTIVE_STATES).exclude(
            pk__in=[s.pk for s in self.sandboxes]
        )
        for created in [*self.sandboxes, *others]:
            with contextlib.suppress(Exception):
                created.refresh_from_db()
                services.sandbox_stop(sandbox=created, enqueue=False)
            with contextlib.suppress(Exception):
                services.sandbox_teardown(sandbox_id=created.hex)
        with contextlib.suppress(Exception):
            for info in self.engine.list_sandboxes():
                self.engine.destroy(info.sandbox_id)
        if self.redis_process is not None:
            with contextlib.suppress(Exception):
                self.stop(self.redis_process)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl+C does


@contextlib.contextmanager
def platform(
    prefix: str, *, engine: str = "local", redis: bool | str = False, **settings: str
) -> Iterator[Platform]:
    """A throwaway installation (see the module docstring). ``redis``: the Redis channel
    layer, cache and broker at REDIS_URL (default redis://127.0.0.1:6379/0), or with
    ``"private"`` at a redis-server of the installation's own (``Platform.redis``);
    otherwise the in-memory ones. ``settings``: more environment variables."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.setdefault("DEBUG", "true")
    os.environ["DATABASE_URL"] = f"sqlite:///{tmp}/bench.sqlite3"
    os.environ["DISTLAB_VAR_DIR"] = str(tmp)
    os.environ["SANDBOX_ENGINE"] = engine
    os.environ["SANDBOX_INSTANCE"] = f"bench-{os.getpid()}"
    os.environ["REDIS_PREFIX"] = f"distlab-bench-{os.getpid()}"  # its own keys and groups
    os.environ["CONTENT_AUTO_SYNC"] = "false"
    os.environ["LOG_LEVEL"] = "WARNING"
    redis_port = None
    if redis == "private":
        redis_port = free_port()
        os.environ["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    elif redis:
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
        lab = Platform(tmp, dict(os.environ), redis_port=redis_port)
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
