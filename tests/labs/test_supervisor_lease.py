"""Two `manage.py supervise` processes on one installation: one supervises, the other
waits; killed, the active one's standby takes over within seconds and follows the same
sandboxes; a supervisor whose database connection is cut stops and supervises again only
once it holds the lease again (chaos: the supervisor killed, two started by mistake, the
database dropping a connection)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from apps.accounts.models import User
from apps.labs.engine.base import Engine
from apps.labs.lease import lease_key
from apps.labs.models import Sandbox
from tests.conftest import REPO, shared_test_database_url
from tests.labs.engine.test_contract import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class Process:
    """A manage.py command as a process, its output gathered line by line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def test_one_supervisor_is_active_and_its_standby_takes_over(
    local_engine: Engine, settings, processes: list[Process]
) -> None:  # type: ignore[no-untyped-def]
    User.objects.create_user(username="op", password="x")
    call_command("sandbox", "launch", "replicated-lb", "--user", "op", "--wait", stdout=StringIO())
    sandbox = Sandbox.objects.get()
    assert sandbox.state == Sandbox.State.RUNNING
    env = {
        **os.environ,
        "DEBUG": "true",
        "DATABASE_URL": shared_test_database_url(),
        "SANDBOX_ENGINE": "local",
        "DISTLAB_VAR_DIR": str(settings.VAR_DIR),
        "SANDBOX_INSTANCE": settings.SANDBOX_INSTANCE,
    }
    env.pop("REDIS_URL", None)
    following = f"supervising sandbox {sandbox.hex}"

    first = Process(env, "supervise")
    processes.append(first)
    wait_for(lambda: first.said(following), timeout=30)
    assert first.said("supervisor: active")

    second = Process(env, "supervise")
    processes.append(second)
    wait_for(lambda: second.said("supervisor: standby"), timeout=30)
    time.sleep(2)  # a standby stays one: it follows nothing
    assert not second.said(following) and not second.said("supervisor: active")

    first.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: second.said(following), timeout=15)
    took_over = time.monotonic() - killed_at
    assert second.said("supervisor: active")
    assert took_over < 6, f"the standby took {took_over:.1f} s to take over"

    # The database drops the active supervisor's lease connection (as a restart would):
    # it stops supervising, then holds the lease again and supervises again.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND objid = %s",
            [lease_key("supervisor")],
        )
    wait_for(lambda: second.said("lease lost"), timeout=15)
    wait_for(lambda: sum(following in line for line in second.lines) >= 2, timeout=15)
    assert second.proc.poll() is None

    # Stopping asks nicely and is quick.
    second.proc.terminate()
    assert second.proc.wait(timeout=15) == 0
    assert second.said("supervisor: stopped")
