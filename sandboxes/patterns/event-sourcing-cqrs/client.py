"""The client: users of a small bank, sending commands and queries.

Open-loop, like real users: requests leave on schedule whether or not earlier ones were
answered (up to ``max_in_flight`` at once; beyond that they are skipped and counted).

- **Commands**, ``rps`` a second, to ``commands``: deposits (10 to 50) and withdrawals
  (10 % to 60 % of the balance the last answer reported) on a handful of accounts
  (``acct-1`` …), which it opens first with a deposit of 100 each.
- **Queries**, ``query_rps`` a second to each read model: balances to
  ``projector-balances``, statements to ``projector-history``.

Every command's answer carries the position of its event in the log; the client
remembers the latest one per account. With ``read_your_writes`` set to
``wait-for-position`` each query carries it (``min_position``) and the read model waits
until it has applied it; with ``off`` queries carry nothing, and an answer from a read
model that has not yet applied the client's own last write is counted as a *stale read*
(the gauges ``stale_balance_reads`` and ``stale_statement_reads``: how many in the last
second).

``writers`` makes concurrent writers: with N, commands leave in groups of N at the same
moment, all the same command for the same account (as when several people act on one
account at once), so the command service sees them race. ``rps`` stays the number of
commands a second.

Once a second it emits a ``traffic`` summary (as the shared traffic generator does) and
reports its ``in_flight``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from sandboxes.runtime.node import CallError, Node, Reply

COMMANDS, BALANCES, HISTORY = "commands", "projector-balances", "projector-history"
OPENING_DEPOSIT = 100


def answer(reply: Reply) -> dict[str, Any]:
    try:
        body = reply.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def setup(node: Node) -> None:
    profile = node.env_json("DISTLAB_TRAFFIC", {})  # the traffic profile from pattern.yaml
    timeout_s = float(profile.get("timeout_s", 2.0))
    max_in_flight = int(profile.get("max_in_flight", 200))
    weights = {"deposit": 1.0, "withdraw": 1.0}  # the mix: which commands, how often
    for kind in profile.get("mix", []):
        weights[kind["path"].rsplit("/", 1)[-1]] = float(kind.get("weight", 1))
    accounts = [f"acct-{n}" for n in range(1, int(profile.get("keys", {}).get("count", 5)) + 1)]

    node.setting("rps", float(profile.get("rps", 20)), minimum=0, maximum=100)
    node.setting("query_rps", 10.0, minimum=0, maximum=100)
    node.setting("read_your_writes", "off", choices=["off", "wait-for-position"])
    node.setting("writers", 1, minimum=1, maximum=8)

    balance: dict[str, int] = {}  # per account, as the last command's answer said
    position: dict[str, int] = {}  # per account, the position of our last event
    in_flight: set[asyncio.Task[None]] = set()
    counts: Counter[str] = Counter()  # since the last summary
    served_by: Counter[str] = Counter()

    async def command(account: str, kind: str, amount: int) -> int:
        """Send one command; remember what its answer says. Returns the status (0: none)."""
        try:
            reply = await node.call(
                COMMANDS,
                f"/accounts/{account}/{kind}",
                method="POST",
                json={"amount": amount},
                timeout=timeout_s,
                route="/accounts/{account}/" + kind,
            )
        except CallError:
            return 0
        body = answer(reply)
        if reply.status == 200:
            position[account] = max(position.get(account, 0), body["position"])
        if "balance" in body:  # 200, or 422 (refused: the answer says the real balance)
            balance[account] = body["balance"]
        served_by[COMMANDS] += 1
        return reply.status

    async def query(target: str, path: str, route: str, account: str) -> int:
        wait = node.config["read_your_writes"] == "wait-for-position"
        own = position.get(account, 0)
        params = {"min_position": str(own)} if wait else {}
        try:
            reply = await node.call(target, path, params=params, timeout=timeout_s, route=route)
        except CallError:
            return 0
        served_by[target] += 1
        if reply.status == 200 and answer(reply)["checkpoint"] < own:
            counts["stale_" + target] += 1  # it has not applied our own last write yet
        return reply.status

    def next_command() -> Callable[[], Awaitable[int]]:
        account = random.choice(accounts)
        kind = random.choices(list(weights), list(weights.values()))[0]
        known = balance.get(account, 0)
        if kind == "withdraw" and known >= 2:
            amount = max(1, round(known * random.uniform(0.1, 0.6)))
        else:
            kind, amount = "deposit", random.randint(10, 50)
        return lambda: command(account, kind, amount)

    def next_balance() -> Callable[[], Awaitable[int]]:
        account = random.choice(accounts)
        return lambda: query(BALANCES, f"/balances/{account}", "/balances/{account}", account)

    def next_statement() -> Callable[[], Awaitable[int]]:
        account = random.choice(accounts)
        path = f"/statements/{account}"
        return lambda: query(HISTORY, path, "/statements/{account}", account)

    async def one(send: Callable[[], Awaitable[int]]) -> None:
        status = await send()
        counts["failed" if status == 0 else "ok" if status < 400 else "errors"] += 1

    def launch(send: Callable[[], Awaitable[int]]) -> None:
        if len(in_flight) >= max_in_flight:
            counts["skipped"] += 1  # too many unanswered: this user gives up
            return
        counts["sent"] += 1
        task = asyncio.get_running_loop().create_task(one(send))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    async def wait_until_open() -> None:
        """Users arrive once the bank is up: every service answers, every account opened."""
        for name in (COMMANDS, BALANCES, HISTORY):
            while True:
                try:
                    if (await node.call(name, "/health", timeout=1.0)).status == 200:
                        break
                except CallError:
                    pass
                await asyncio.sleep(0.2)
        for account in accounts:
            while await command(account, "deposit", OPENING_DEPOSIT) != 200:
                await asyncio.sleep(0.2)
        # ...and both read models have seen them (read-your-writes, once, at the door).
        opened = {"min_position": str(max(position.values()))}
        for name, path in ((BALANCES, "/balances/"), (HISTORY, "/statements/")):
            while True:
                try:
                    reply = await node.call(name, path + accounts[-1], params=opened)
                    if reply.status == 200:
                        break
                except CallError:
                    pass
                await asyncio.sleep(0.2)

    async def run_at(rate: Callable[[], float], make: Callable[[], Any], group: int = 1) -> None:
        """Launch ``make()``'s request ``rate()`` times a second, in groups of ``group``."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            n = group if group > 0 else node.config["writers"]
            per_s = rate() / n
            if per_s <= 0:
                await asyncio.sleep(0.1)
                next_at = loop.time()
                continue
            # One group every n/rate seconds; if we fell behind (a busy machine), catch up
            # at most one second's worth, never a huge burst.
            next_at = max(next_at + 1 / per_s, loop.time() - 1.0)
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            send = make()
            for _ in range(n):  # the same command, from n writers at the same moment
                launch(send)

    @node.task
    async def drive() -> None:
        await wait_until_open()
        try:
            await asyncio.gather(
                run_at(lambda: node.config["rps"], next_command, group=0),
                run_at(lambda: node.config["query_rps"], next_balance),
                run_at(lambda: node.config["query_rps"], next_statement),
            )
        finally:  # shutting down: abandon what is in flight
            for task in in_flight:
                task.cancel()

    @node.task
    async def summarise() -> None:
        while True:
            await asyncio.sleep(1.0)
            node.gauge("in_flight", len(in_flight))
            node.gauge("stale_balance_reads", counts.pop("stale_" + BALANCES, 0))
            node.gauge("stale_statement_reads", counts.pop("stale_" + HISTORY, 0))
            if counts or in_flight:
                totals = {k: counts[k] for k in ("sent", "skipped", "ok", "errors", "failed")}
                node.emit(
                    "traffic",
                    rps=node.config["rps"],
                    in_flight=len(in_flight),
                    served_by=dict(served_by),
                    **totals,
                )
            counts.clear()
            served_by.clear()
