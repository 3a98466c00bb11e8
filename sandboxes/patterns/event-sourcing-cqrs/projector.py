"""A projector: follows the event log in order and keeps one read model up to date.

The read side of CQRS. Two nodes run this program, each with its own projection
(``DISTLAB_PROJECTION`` in pattern.yaml):

- ``balances``: account → current balance, served at ``GET /balances/{account}``;
- ``history``: account → its transactions, served newest first at
  ``GET /statements/{account}``.

Each keeps a **checkpoint**, the position of the last event it applied, and polls the
event store for the events after it (``batch_size`` at a time, every
``poll_interval_s``; at once again while a full batch comes back, which is how it catches
up). Applying an event costs ``apply_ms`` (it stands in for a write to a real read-model
database), so a projector applies at most about ``1000 / apply_ms`` events a second.

It reports its ``checkpoint`` and its ``lag`` (how many events the log held beyond its
checkpoint when it last looked) as gauges, and its state: ``rebuilding`` after a start,
``catching-up`` when it finds itself more than two batches behind, ``caught-up``, or
``stopped``. Leaving ``rebuilding`` or ``catching-up`` it announces how many events it
applied and how long that took.

The live setting ``consuming`` stops and starts applying events; while stopped it still
asks the store for its head, so its lag shows how far behind it is falling. The read
model lives in memory: after a kill and a restart the projector starts from an empty
model at position 1 and rebuilds it by replaying the whole log. (In memory, the model and
its checkpoint cannot disagree after a crash; a real projector must store them together,
or be idempotent, or it will apply some events twice.)

Read-your-writes: a query may carry ``min_position``, the position of the asker's own
last command. The projector answers once its checkpoint has reached it, waiting up to
``rw_wait_s``, and otherwise answers 503 ("retry shortly").
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sandboxes.runtime.node import CallError, Node, Request, Response

STORE = "event-store"
STATEMENT_LINES = 10  # a statement shows the newest ten transactions


def balances(model: dict[str, Any], event: dict[str, Any]) -> None:
    """The balances read model: account → balance."""
    amount = event["data"].get("amount", 0)
    if event["type"] == "MoneyWithdrawn":
        amount = -amount
    model[event["stream"]] = model.get(event["stream"], 0) + amount


def history(model: dict[str, Any], event: dict[str, Any]) -> None:
    """The history read model: account → its transactions, oldest first."""
    lines = model.setdefault(event["stream"], [])
    if event["type"] != "AccountOpened":
        amount = event["data"]["amount"]
        lines.append({"position": event["position"], "type": event["type"], "amount": amount})


def balance_rows(model: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"account": a, "balance": b} for a, b in sorted(model.items())]


def statement_rows(model: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for account, lines in sorted(model.items()):
        last = f"{lines[-1]['type']} {lines[-1]['amount']}" if lines else ""
        rows.append({"account": account, "entries": len(lines), "last": last})
    return rows


# projection → (how it applies an event, the route it answers on, its table, table id)
PROJECTIONS = {
    "balances": (balances, "/balances/{account}", balance_rows, "balances"),
    "history": (history, "/statements/{account}", statement_rows, "statements"),
}


class Progress:
    """Where this projector is in the log."""

    def __init__(self) -> None:
        self.checkpoint = 0  # position of the last event applied
        self.head = 0  # the log's last position, as last seen
        self.state = ""
        self.behind_since: float | None = None  # when the current catch-up began
        self.behind_from = 0  # its first position
        self.behind_by = 0  # how far behind it was then


def setup(node: Node) -> None:
    projection = node.env.get("DISTLAB_PROJECTION", "balances")
    handle, route, rows, table_id = PROJECTIONS[projection]
    batch_size = int(node.param("batch_size", 10))
    poll_interval_s = float(node.param("poll_interval_s", 0.25))
    wait_s = float(node.param("rw_wait_s", 1.0))
    node.setting("consuming", True)
    node.setting("apply_ms", float(node.param("apply_ms", 10.0)), minimum=0, maximum=1000)

    model: dict[str, Any] = {}
    progress = Progress()

    def set_state(state: str) -> None:
        progress.state = state
        node.set_state("projector", state)

    def report(lag: int) -> None:
        node.gauge("lag", lag)
        node.gauge("checkpoint", progress.checkpoint)

    def begin_catch_up(now: float, lag: int) -> None:
        progress.behind_since = now
        progress.behind_from = progress.checkpoint + 1
        progress.behind_by = lag

    def caught_up(now: float) -> None:
        """Announce how long the rebuild or catch-up took, and how fast it went."""
        if progress.behind_since is not None and progress.checkpoint >= progress.behind_from:
            seconds = now - progress.behind_since
            applied = progress.checkpoint - progress.behind_from + 1
            node.event(
                "caught_up",
                was=progress.state,
                behind=progress.behind_by,
                applied=applied,
                from_position=progress.behind_from,
                checkpoint=progress.checkpoint,
                seconds=round(seconds, 2),
                rate=round(applied / seconds) if seconds > 0 else 0,
            )
        progress.behind_since = None
        set_state("caught-up")

    def overdrawn(account: str, amount: int) -> None:
        """A read model can spot what must never happen: a rule broken on the write side
        (here, commands appending without an expected version)."""
        balance = model[account]
        if balance < 0 <= balance + amount:
            node.event("overdrawn", account=account, balance=balance)

    async def poll_once() -> int:
        """Read and apply the next batch; return how many events it held."""
        reply = await node.call(
            STORE, "/events", params={"after": str(progress.checkpoint), "limit": str(batch_size)}
        )
        if reply.status != 200:
            raise CallError(STORE, f"status {reply.status}")
        body = reply.json()
        progress.head = body["head"]
        lag = progress.head - progress.checkpoint
        report(lag)
        now = time.monotonic()
        if progress.state == "rebuilding" and progress.behind_since is None:
            begin_catch_up(now, lag)
        elif progress.state in ("caught-up", "stopped") and lag > 2 * batch_size:
            begin_catch_up(now, lag)
            set_state("catching-up")
        # Writing the batch to the read model's database, with the new checkpoint in the
        # same transaction: apply_ms an event.
        await asyncio.sleep(len(body["events"]) * node.config["apply_ms"] / 1000)
        for event in body["events"]:
            handle(model, event)
            progress.checkpoint = event["position"]  # saved with the work, never before
            if projection == "balances" and event["type"] == "MoneyWithdrawn":
                overdrawn(event["stream"], event["data"]["amount"])
        node.gauge("checkpoint", progress.checkpoint)
        node.table(table_id, rows(model)[:50])
        return len(body["events"])

    @node.task
    async def follow() -> None:
        set_state("rebuilding")  # an empty model: everything from position 1
        report(0)
        while True:
            try:
                if not node.config["consuming"]:
                    if progress.state != "stopped":
                        set_state("stopped")
                    reply = await node.call(STORE, "/head")
                    if reply.status == 200:
                        progress.head = reply.json()["head"]
                        report(progress.head - progress.checkpoint)
                elif await poll_once() == batch_size:
                    continue  # a full batch: there is more, read again at once
                elif progress.state != "caught-up":
                    caught_up(time.monotonic())
            except CallError:
                pass  # the call event says what happened; try again next time
            await asyncio.sleep(poll_interval_s)

    @node.route(route)
    async def query(request: Request) -> Response:
        account = request.match_info["account"]
        wanted = int(request.query.get("min_position", 0))
        # Read-your-writes: wait (briefly) until the asker's own last event is applied.
        deadline = time.monotonic() + wait_s
        while progress.checkpoint < wanted:
            if time.monotonic() >= deadline:
                error = f"{node.name} is at {progress.checkpoint}, you need {wanted}: retry shortly"
                return node.json({"error": error, "checkpoint": progress.checkpoint}, status=503)
            await asyncio.sleep(0.01)
        if account not in model:
            return node.json({"error": f"no account {account} (yet)"}, status=404)
        if projection == "balances":
            answer: dict[str, Any] = {"balance": model[account]}
        else:
            lines = model[account]
            answer = {"entries": len(lines), "newest": lines[::-1][:STATEMENT_LINES]}
        return node.json({"account": account, **answer, "checkpoint": progress.checkpoint})

    @node.status
    def status() -> dict[str, Any]:
        return {
            "projection": projection,
            "state": progress.state,
            "checkpoint": progress.checkpoint,
            "head": progress.head,
            "lag": progress.head - progress.checkpoint,
        }
