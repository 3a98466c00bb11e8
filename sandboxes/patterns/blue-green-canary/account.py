"""One replica of the account service, in one of two versions: the version running now
(1, the blue replicas) or the release being shipped (2, the green ones). The router sends
each user's request to one version or the other; the user should not be able to tell.

Both versions answer ``GET /v<version>/account/<user>`` with the user's balance, read from
the database both share (``db``). Version 2 keeps the balance in cents, with its currency:
a schema change. The first time it reads a row without those columns it migrates the row,
by its ``migration`` setting: ``expand`` adds them beside version 1's ``balance`` (both
versions can read the row), ``in place`` replaces ``balance`` with them (version 1 cannot
read the row any more: going back to version 1 is then not safe).

Version 2 also carries the release's bug, which the learner switches on with ``bug``:
``errors`` (one request in five fails), ``slow`` (300 ms more per request) or ``wrong
answer`` (forgets that the balance is now in cents: status 200, every figure normal, and
the answer off by a factor of 100). Version 1 has no bug to switch on.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from sandboxes.runtime.node import CallError, Node, Request, Response

BUGS = ("none", "errors", "slow", "wrong answer")
MIGRATIONS = ("expand", "in place")
BUG_ERROR_RATE = 0.2  # with `errors`, the share of requests that fail
BUG_SLOW_MS = 300  # with `slow`, the extra time per request


def migrated(row: dict[str, Any], how: str) -> dict[str, Any]:
    """Version 2's schema change on one row: the balance in cents, with its currency."""
    new = {"balance_cents": round(float(row["balance"]) * 100), "currency": "EUR"}
    return {**row, **new} if how == "expand" else new


def setup(node: Node) -> None:
    version = int(node.env_float("DISTLAB_VERSION", 1))
    work_ms = float(node.param("work_ms", 5))
    if version == 2:
        node.setting("bug", "none", choices=BUGS)
        node.setting("migration", "expand", choices=MIGRATIONS)

    def failed(status: int, error: str) -> Response:
        return node.json({"error": error, "version": version}, status=status)

    @node.route(f"/v{version}/account/{{user}}")
    async def account(request: Request) -> Response:
        user = request.match_info["user"]
        try:
            reply = await node.call("db", f"/accounts/{user}", route="/accounts/{user}")
            row = reply.json()
            await asyncio.sleep(work_ms / 1000)  # stands in for real work
            if version == 1:
                if "balance" not in row:
                    return failed(500, "column balance does not exist (version 2 replaced it)")
                return node.json({"user": user, "balance": row["balance"], "version": 1})

            if "balance_cents" not in row:  # first read since the release: migrate it
                row = migrated(row, node.config["migration"])
                await node.call(
                    "db", f"/accounts/{user}", method="PUT", json=row, route="/accounts/{user}"
                )
        except (CallError, ValueError) as exc:
            return failed(503, f"the database did not answer: {exc}")
        cents = int(row["balance_cents"])
        bug = node.config["bug"]
        if bug == "errors" and random.random() < BUG_ERROR_RATE:
            return failed(500, "NullPointerException in v2")
        if bug == "slow":
            await asyncio.sleep(BUG_SLOW_MS / 1000)
        if bug == "wrong answer":
            cents //= 100  # still treats the balance as whole euros
        return node.json({"user": user, "balance_cents": cents, "currency": "EUR", "version": 2})
