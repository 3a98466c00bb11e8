"""The command service: the write side of CQRS, event-sourced.

A command is a request that may be refused ("withdraw 30 from acct-2"); an event is the
record of a decision already made ("30 was withdrawn"). For each command it:

1. loads the account's stream from the event store and replays it (``apply``) into the
   current state, remembering the stream's version;
2. checks the business rule (no withdrawal beyond the balance);
3. appends the new event *expecting that version*.

If another command appended to the same account in between, the store refuses the
append (409, a *conflict*): nothing was written, so the handler backs off a moment, then
reloads and decides again on fresh state, up to ``command_attempts`` times. Conflicts are
counted (the ``conflicts`` gauge: how many in the last second) and announced once a
second in the event log.

The live setting ``check_version`` turns the expected version off: appends then go
through whatever happened in between, and two withdrawals that each fit the balance can
both be recorded, overdrawing the account. That is the bug the expected version exists
to prevent.

Answers: 200 ``{"position", "version", "balance"}`` (the position of the new event, for
read-your-writes, and the new balance), 422 when the rule refuses the command, 404 for a
withdrawal from an account never opened, 409 after too many conflicts, 503 when the
event store gives no answer.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

from sandboxes.runtime.node import CallError, Node, Request, Response

STORE = "event-store"


def apply(state: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any] | None:
    """State + one event -> new state. No checks here: events are facts."""
    kind, data = event["type"], event["data"]
    if kind == "AccountOpened":
        return {"balance": 0}
    if state is None:
        return None
    if kind == "MoneyDeposited":
        return {**state, "balance": state["balance"] + data["amount"]}
    if kind == "MoneyWithdrawn":
        return {**state, "balance": state["balance"] - data["amount"]}
    return state  # an event type this code does not know: ignore it


def setup(node: Node) -> None:
    timeout_s = float(node.param("store_timeout_s", 1.0))
    attempts = int(node.param("command_attempts", 5))
    backoff_ms = float(node.param("retry_backoff_ms", 20))
    node.setting("check_version", True)

    conflicts: Counter[str] = Counter()  # since the last summary: conflicts, per account
    outcome: Counter[str] = Counter()  # since the last summary: retried, gave_up

    async def load(account: str) -> tuple[dict[str, Any] | None, int]:
        """Replay the account's stream: (current state or None, the stream's version)."""
        reply = await node.call(
            STORE, f"/streams/{account}", timeout=timeout_s, route="/streams/{stream}"
        )
        if reply.status != 200:
            raise CallError(STORE, f"status {reply.status}")
        stream = reply.json()
        state = None
        for event in stream["events"]:
            state = apply(state, event)
        return state, stream["version"]

    async def handle(account: str, kind: str, amount: int) -> Response:
        for attempt in range(1, attempts + 1):
            state, version = await load(account)
            if kind == "withdraw":
                if state is None:
                    return node.json({"error": f"no account {account}"}, status=404)
                if amount > state["balance"]:  # the business rule, on the write model
                    return node.json(
                        {"error": "insufficient funds", "balance": state["balance"]}, status=422
                    )
                new = [{"type": "MoneyWithdrawn", "data": {"amount": amount}}]
                balance = state["balance"] - amount
            else:
                new = [{"type": "MoneyDeposited", "data": {"amount": amount}}]
                if state is None:  # the first deposit opens the account
                    new.insert(0, {"type": "AccountOpened", "data": {"owner": account}})
                balance = (state or {"balance": 0})["balance"] + amount
            expected = version if node.config["check_version"] else None
            reply = await node.call(
                STORE,
                f"/streams/{account}",
                method="POST",
                json={"expected_version": expected, "events": new},
                timeout=timeout_s,
                route="/streams/{stream}",
            )
            if reply.status == 200:
                if attempt > 1:
                    outcome["retried"] += 1
                result = reply.json()
                return node.json({**result, "balance": balance, "attempts": attempt})
            if reply.status != 409:
                raise CallError(STORE, f"status {reply.status}")
            # Someone appended since we read: back off a little, at random, so the
            # writers that lost do not collide again, then decide again on fresh state.
            conflicts[account] += 1
            await asyncio.sleep(random.uniform(0, backoff_ms) / 1000)
        outcome["gave_up"] += 1
        return node.json({"error": f"gave up after {attempts} conflicts"}, status=409)

    async def command(request: Request, kind: str) -> Response:
        account = request.match_info["account"]
        try:
            amount = int((await request.json())["amount"])
        except (ValueError, KeyError, TypeError):
            return node.json({"error": 'send {"amount": N}'}, status=400)
        if amount <= 0:
            return node.json({"error": "the amount must be positive"}, status=400)
        try:
            return await handle(account, kind, amount)
        except CallError as exc:
            return node.json({"error": f"event store unavailable: {exc.reason}"}, status=503)

    @node.route("/accounts/{account}/deposit", method="POST")
    async def deposit(request: Request) -> Response:
        return await command(request, "deposit")

    @node.route("/accounts/{account}/withdraw", method="POST")
    async def withdraw(request: Request) -> Response:
        return await command(request, "withdraw")

    @node.task
    async def summarise() -> None:
        """Once a second: the conflicts gauge, and an event when there were any."""
        while True:
            await asyncio.sleep(1.0)
            total = sum(conflicts.values())
            node.gauge("conflicts", total)
            if total:
                hottest = ", ".join(f"{a} {n}" for a, n in conflicts.most_common(3))
                node.event(
                    "conflicts",
                    count=total,
                    accounts=hottest,
                    retried=outcome["retried"],
                    gave_up=outcome["gave_up"],
                )
            conflicts.clear()
            outcome.clear()
