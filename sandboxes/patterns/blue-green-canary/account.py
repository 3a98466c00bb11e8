"""One replica of the account service, in one of two versions: the version running now
(1, the blue replicas) or the release being shipped (2, the green ones). The router sends
each user's request to one version or the other; the user should not be able to tell.

Both versions answer ``GET /v<version>/account/<user>`` with the user's balance. Version 2
changes the answer's shape (the balance in cents, with its currency): a change a careful
release keeps compatible, since for a while both versions answer the same users.

Version 2 also carries the release's bug, which the learner switches on with ``bug``:
``errors`` (one request in five fails), ``slow`` (300 ms more per request) or ``wrong
answer`` (forgets that the balance is now in cents: status 200, every figure normal, and
the answer off by a factor of 100). Version 1 has no bug to switch on.
"""

from __future__ import annotations

import asyncio
import random
import zlib

from sandboxes.runtime.node import Node, Request, Response

BUGS = ("none", "errors", "slow", "wrong answer")
BUG_ERROR_RATE = 0.2  # with `errors`, the share of requests that fail
BUG_SLOW_MS = 300  # with `slow`, the extra time per request


def balance_cents(user: str) -> int:
    """Every user's balance, the same on every replica (the shared data, in short)."""
    return zlib.crc32(user.encode()) % 1_000_000


def setup(node: Node) -> None:
    version = int(node.env_float("DISTLAB_VERSION", 1))
    work_ms = float(node.param("work_ms", 5))
    if version == 2:
        node.setting("bug", "none", choices=BUGS)

    @node.route(f"/v{version}/account/{{user}}")
    async def account(request: Request) -> Response:
        user = request.match_info["user"]
        await asyncio.sleep(work_ms / 1000)  # stands in for real work
        cents = balance_cents(user)
        if version == 1:
            return node.json({"user": user, "balance": f"{cents / 100:.2f}", "version": 1})

        bug = node.config["bug"]
        if bug == "errors" and random.random() < BUG_ERROR_RATE:
            return node.json({"error": "NullPointerException in v2"}, status=500)
        if bug == "slow":
            await asyncio.sleep(BUG_SLOW_MS / 1000)
        if bug == "wrong answer":
            cents //= 100  # still treats the balance as whole euros
        return node.json({"user": user, "balance_cents": cents, "currency": "EUR", "version": 2})
