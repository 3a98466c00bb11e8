"""Operate sandboxes from a shell (operators, instructors' scripts, benchmarks)."""

from __future__ import annotations

import json
import time
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from apps.accounts.models import User
from apps.labs import selectors, services
from apps.labs.engine import EngineError, get_engine
from apps.labs.models import Sandbox
from apps.labs.patterns import PatternError

NO_ISOLATION = (
    "note: the local-process engine runs nodes as plain processes of this user, with NO "
    "isolation from this machine. Install Docker for real sandboxes."
)


def _params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--param expects KEY=VALUE, got {pair!r}")
        params[key] = value
    return params


def _describe(sandbox: Sandbox) -> dict[str, Any]:
    return {
        "id": sandbox.hex,
        "pattern": sandbox.pattern,
        "owner": sandbox.owner.username,
        "state": sandbox.state,
        "engine": sandbox.engine,
        "expires_at": sandbox.expires_at.isoformat(),
        "launch_seconds": sandbox.launch_seconds,
        "error": sandbox.error,
        "nodes": [{"name": n.name, "role": n.role} for n in sandbox.nodes.all()],
    }


class Command(BaseCommand):
    help = "Launch, list, break, stop and clean up sandboxes."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, parser_class=ArgumentParser)
        launch = sub.add_parser("launch", help="launch a sandbox of a pattern")
        launch.add_argument("pattern_id")
        launch.add_argument("--user", default=None, help="owner (default: the first superuser)")
        launch.add_argument("--wait", action="store_true", help="wait until it runs")
        launch.add_argument("--json", action="store_true")
        listing = sub.add_parser("list", help="active sandboxes")
        listing.add_argument("--all", action="store_true", help="include ended ones")
        listing.add_argument("--json", action="store_true")
        fault = sub.add_parser("fault", help="inject a fault into a node")
        fault.add_argument("sandbox_id")
        fault.add_argument("kind", choices=sorted(services.FAULT_PARAMS))
        fault.add_argument("node")
        fault.add_argument("--duration", type=int, default=None, help="seconds (default 30)")
        fault.add_argument("--param", action="append", default=[], metavar="K=V")
        stop = sub.add_parser("stop", help="stop a sandbox and remove its nodes")
        stop.add_argument("sandbox_id")
        sub.add_parser("reap", help="expire, reconcile and remove orphans now")

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        try:
            getattr(self, f"do_{action}")(**options)
        except (services.SandboxError, PatternError, EngineError) as exc:
            raise CommandError(str(exc)) from exc

    def _warn_isolation(self) -> None:
        if not get_engine().isolated:
            self.stderr.write(NO_ISOLATION)

    def _sandbox(self, sandbox_id: str) -> Sandbox:
        try:
            return selectors.sandbox_find(sandbox_id=sandbox_id)
        except Sandbox.DoesNotExist:
            raise CommandError(f"No sandbox with id {sandbox_id!r}.") from None

    def do_launch(
        self, pattern_id: str, user: str | None, wait: bool, json: bool, **_: Any
    ) -> None:
        owner = (
            User.objects.filter(username=user).first()
            if user
            else User.objects.filter(is_superuser=True).order_by("pk").first()
        )
        if owner is None:
            raise CommandError(f"No user named {user!r}." if user else "Give --user NAME.")
        self._warn_isolation()
        started = time.monotonic()
        sandbox = services.sandbox_launch(user=owner, pattern_id=pattern_id, enqueue=not wait)
        if wait:
            try:
                sandbox = services.sandbox_start(sandbox_id=sandbox.hex)
            except (EngineError, TimeoutError) as exc:
                raise CommandError(f"launch failed: {exc}") from exc
        seconds = round(time.monotonic() - started, 3)
        if json:
            self.stdout.write(_json({**_describe(sandbox), "seconds": seconds}))
        else:
            self.stdout.write(f"{sandbox.hex} {sandbox.pattern} {sandbox.state} ({seconds} s)")

    def do_list(self, all: bool, json: bool, **_: Any) -> None:
        qs = Sandbox.objects.select_related("owner").prefetch_related("nodes")
        sandboxes = list(qs if all else qs.filter(pk__in=selectors.sandbox_list_active()))
        if json:
            self.stdout.write(_json([_describe(s) for s in sandboxes]))
            return
        if not sandboxes:
            self.stdout.write("No active sandboxes.")
        now = timezone.now()
        for s in sandboxes:
            left = max(0, int((s.expires_at - now).total_seconds() // 60))
            self.stdout.write(
                f"{s.hex}  {s.pattern:<20} {s.state:<9} {s.owner.username:<12} "
                f"{len(s.nodes.all())} nodes  {left} min left"
            )

    def do_fault(
        self,
        sandbox_id: str,
        kind: str,
        node: str,
        duration: int | None,
        param: list[str],
        **_: Any,
    ) -> None:
        sandbox = self._sandbox(sandbox_id)
        fault = services.fault_inject(
            sandbox=sandbox, node_name=node, kind=kind, duration=duration, params=_params(param)
        )
        until = f" until {fault.expires_at:%H:%M:%S}" if fault.expires_at else ""
        self.stdout.write(f"{kind} on {node}{until}")

    def do_stop(self, sandbox_id: str, **_: Any) -> None:
        sandbox = self._sandbox(sandbox_id)
        services.sandbox_stop(sandbox=sandbox, enqueue=False)
        sandbox = services.sandbox_teardown(sandbox_id=sandbox.hex)
        self.stdout.write(f"{sandbox.hex} {sandbox.state}")

    def do_reap(self, **_: Any) -> None:
        reverted = services.fault_revert_due()
        report = services.sandbox_reap(enqueue=False)
        for sandbox_id in report.expired + report.idle:
            services.sandbox_teardown(sandbox_id=sandbox_id)
        for sandbox_id in report.relaunched:
            try:
                services.sandbox_start(sandbox_id=sandbox_id)
            except (EngineError, TimeoutError) as exc:
                self.stderr.write(f"{sandbox_id}: launch failed: {exc}")
        self.stdout.write(
            f"reap: {len(report.expired)} expired, {len(report.idle)} idle, "
            f"{len(report.vanished)} vanished, {len(report.orphans_removed)} orphans removed, "
            f"{len(report.relaunched)} stuck launches, {len(reverted)} faults reverted"
        )


def _json(value: Any) -> str:
    return json.dumps(value, indent=None, default=str)
