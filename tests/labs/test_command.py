"""`manage.py sandbox …`: the operators' command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from apps.accounts.models import User
from apps.labs.engine.base import Engine
from apps.labs.models import Fault, Sandbox
from tests.conftest import REPO, shared_test_database_url
from tests.labs.engine.test_contract import wait_for

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command("sandbox", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_launch_wait_json_list_fault_stop(learner: User, local_engine: Engine) -> None:
    launched = json.loads(
        run("launch", "replicated-lb", "--user", learner.username, "--wait", "--json")
    )
    assert launched["state"] == "running" and launched["seconds"] > 0
    assert {n["name"] for n in launched["nodes"]} == {
        "traffic",
        "lb",
        "replica-1",
        "replica-2",
        "replica-3",
    }

    listed = json.loads(run("list", "--json"))
    assert [s["id"] for s in listed] == [launched["id"]]

    out = run(
        "fault", launched["id"][:8], "latency", "replica-1", "--duration", "9", "--param", "ms=120"
    )
    assert out.startswith("latency on replica-1 until")
    fault = Fault.objects.get()
    assert fault.params["ms"] == 120

    assert run("stop", launched["id"]).strip().endswith("stopped")
    assert local_engine.list_sandboxes() == []
    assert run("list").strip() == "No active sandboxes."


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("launch", "no-such-pattern", "--user", "alice"), "no-such-pattern"),
        (("launch", "replicated-lb", "--user", "nobody"), "No user named 'nobody'"),
        (("stop", "0123456789abcdef"), "No sandbox with id"),
        (("fault", "zzzz", "kill", "lb"), "No sandbox with id"),
    ],
)
def test_errors_are_one_clear_line(
    learner: User, local_engine: Engine, args: tuple[str, ...], message: str
) -> None:
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert not Sandbox.objects.exists()


def test_fault_errors_from_the_command(learner: User, local_engine: Engine) -> None:
    launched = json.loads(
        run("launch", "replicated-lb", "--user", learner.username, "--wait", "--json")
    )
    with pytest.raises(CommandError, match="no node named 'replica-7'"):
        run("fault", launched["id"], "kill", "replica-7")
    with pytest.raises(CommandError, match="--param expects KEY=VALUE"):
        run("fault", launched["id"], "latency", "lb", "--param", "oops")


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_launch_leaves_exactly_one_sandbox(
    tmp_path: Path, local_engine: Engine, settings
) -> None:  # type: ignore[no-untyped-def]
    """Kill the launching process while it brings nodes up; housekeeping then finishes
    the launch by adopting what exists: one sandbox, nothing orphaned."""
    url = shared_test_database_url()
    User.objects.create_user(username="op", password="x")
    env = {
        **os.environ,
        "DEBUG": "true",
        "DATABASE_URL": url,
        "SANDBOX_ENGINE": "local",
        "DISTLAB_VAR_DIR": str(settings.VAR_DIR),
    }
    env.pop("REDIS_URL", None)
    worker = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "sandbox",
            "launch",
            "replicated-lb",
            "--user",
            "op",
            "--wait",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # Kill it once the engine has started some nodes but before the launch is recorded.
    wait_for(lambda: local_engine.list_sandboxes() or worker.poll() is not None, timeout=30)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)

    sandbox = Sandbox.objects.get()
    assert sandbox.state in {Sandbox.State.STARTING, Sandbox.State.RUNNING}
    Sandbox.objects.filter(pk=sandbox.pk).update(created_at=timezone.now() - timedelta(hours=1))
    run("reap")  # re-runs the stuck launch, adopting the nodes that exist
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.RUNNING
    assert [i.sandbox_id for i in local_engine.list_sandboxes()] == [sandbox.hex]
    assert len(local_engine.status(sandbox.hex)) == 5
