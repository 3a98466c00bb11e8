"""The accounts database both versions share (chapter 11): one row per user, with the
columns it has. Version 1 reads ``balance`` (euros, as a string); version 2 reads
``balance_cents`` and ``currency``, and migrates a row the first time it reads one that
lacks them. How it migrates is version 2's schema change (``account.py``): *expand* adds
the new columns beside the old one, *in place* replaces the old one. Which shapes the rows
are in is what decides whether going back to version 1 is safe.

- ``GET /accounts/{user}``: the user's row (a user seen for the first time gets a row in
  version 1's shape, as every row was before the release),
- ``PUT /accounts/{user}``: replace the user's row.

It keeps its rows in memory: a restart puts every row back in version 1's shape, as
restoring the backup taken before the release would.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from sandboxes.runtime.node import Node, Request, Response

SHAPES = {
    "v1": "balance only (version 1's)",
    "both": "balance and balance_cents (expanded)",
    "v2": "balance_cents only (version 2's)",
}


def first_row(user: str) -> dict[str, Any]:
    """A user's row before the release: the balance in euros, as version 1 keeps it."""
    return {"balance": f"{zlib.crc32(user.encode()) % 1_000_000 / 100:.2f}"}


def shape(row: dict[str, Any]) -> str:
    if "balance" in row:
        return "both" if "balance_cents" in row else "v1"
    return "v2"


def setup(node: Node) -> None:
    rows: dict[str, dict[str, Any]] = {}

    @node.route("/accounts/{user}")
    async def read(request: Request) -> Response:
        user = request.match_info["user"]
        return node.json(rows.setdefault(user, first_row(user)))

    @node.route("/accounts/{user}", method="PUT")
    async def write(request: Request) -> Response:
        rows[request.match_info["user"]] = await request.json()
        return node.json({"ok": True})

    @node.task
    async def report() -> None:
        await asyncio.sleep(0.5)  # once the runtime has said "started"
        while True:
            counts = {key: 0 for key in SHAPES}
            for row in rows.values():
                counts[shape(row)] += 1
            node.table("rows", [{"shape": SHAPES[k], "rows": n} for k, n in counts.items()])
            node.gauge("rows_blue_cannot_read", counts["v2"])
            await asyncio.sleep(1)
