"""The router: users know only its address. It sends each request to version 1 (the blue
replicas) or version 2 (the green ones), by a weight: the share of requests green gets.

- **Blue-green**: the weight is 0 or 100, so switching is one change of a number, and so
  is switching back. Nothing is deployed at that moment: both versions are running.
- **Canary**: with ``canary`` on, the weight is no longer the learner's slider but the
  analysis node's, which raises it step by step and sets it back to 0 when green does
  worse than blue. The router only keeps score: every answer's version, status and time,
  which the analysis reads at ``GET /stats``.
- **Sticky users**: by default each request is weighed on its own, so a user may see
  version 2, then version 1, then 2. Sticky, a user's id decides: the same user stays on
  the same version while the weight does not move past them.

Within a version it takes the replicas in turn. A replica that does not answer (refused,
or timed out) is ejected for a few seconds; a refused request, which the replica never
saw, is tried once more on another replica of the same version.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time
import zlib

from sandboxes.runtime.node import CallError, Node, Request, Response

COLOURS = ("blue", "green")
VERSION = {"blue": 1, "green": 2}
KEEP_S = 120  # how long the scores are kept for /stats


class Replica:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ejected_until = 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def setup(node: Node) -> None:
    timeout_s = float(node.param("router_timeout_s", 1.0))
    eject_s = float(node.param("eject_s", 5.0))

    pools = {c: [Replica(p.name) for p in node.peers_with_role(c)] for c in COLOURS}
    turns = {c: itertools.count() for c in COLOURS}
    scores: collections.deque[tuple[float, str, bool, float]] = collections.deque()
    canary = {"run": 0, "weight": 0}  # the analysis's weight, for the current canary run

    def weight() -> int:
        """The share of requests green gets now, in percent."""
        return canary["weight"] if node.config["canary"] else node.config["green_weight"]

    def show_weight() -> None:
        node.gauge("green_weight", weight())

    def canary_switched(on: bool, previous: bool) -> None:
        if on:  # a new run: green gets nothing until the analysis gives its first step
            canary["run"] += 1
            canary["weight"] = 0
        show_weight()

    node.setting("green_weight", 0, minimum=0, maximum=100, on_change=lambda *_: show_weight())
    node.setting("canary", False, on_change=canary_switched)
    node.setting("sticky", False)

    def version_for(user: str) -> str:
        # Sticky: the user's own bucket, 0 to 99, the same every time; else a fresh draw.
        sticky = node.config["sticky"]
        bucket = zlib.crc32(user.encode()) % 100 if sticky else random.randrange(100)
        return "green" if bucket < weight() else "blue"

    def pick(colour: str, avoid: str | None = None) -> Replica | None:
        now = time.monotonic()
        pool = [r for r in pools[colour] if r.ejected_until <= now and r.name != avoid]
        if not pool:
            return None
        return pool[next(turns[colour]) % len(pool)]

    def eject(replica: Replica, reason: str) -> None:
        if replica.ejected_until <= time.monotonic():
            node.event("ejected", target=replica.name, reason=reason, for_s=eject_s)
        replica.ejected_until = time.monotonic() + eject_s

    async def send(colour: str, user: str) -> tuple[Response, str]:
        path = f"/v{VERSION[colour]}/account/{user}"
        route = f"/v{VERSION[colour]}/account/{{user}}"
        replica, tried = pick(colour), None
        for _ in range(2):  # once more only if the replica refused the connection
            if replica is None:
                return node.json({"error": f"no {colour} replica in rotation"}, status=503), "-"
            try:
                reply = await node.call(replica.name, path, timeout=timeout_s, route=route)
            except CallError as exc:
                eject(replica, exc.reason)
                if exc.reason == "timeout":
                    return node.json(
                        {"error": "timeout", "replica": replica.name}, status=504
                    ), replica.name
                tried, replica = replica.name, pick(colour, avoid=replica.name)
                continue
            return node.relay(reply), replica.name
        return node.json({"error": "refused", "replica": tried}, status=502), tried or "-"

    @node.route("/account/{user}")
    async def forward(request: Request) -> Response:
        user = request.match_info["user"]
        colour = version_for(user)
        started = time.monotonic()
        response, served_by = await send(colour, user)
        scores.append((time.time(), colour, response.status < 500, time.monotonic() - started))
        response.headers["X-Distlab-Served-By"] = served_by
        response.headers["X-Distlab-Version"] = str(VERSION[colour])
        return response

    # ---- what the analysis reads and sets ----

    @node.route("/stats")
    async def stats(request: Request) -> Response:
        """Each version's requests, errors and p99 since ``since`` (Unix seconds)."""
        since = float(request.query.get("since", 0))
        out = {}
        for colour in COLOURS:
            mine = [s for s in scores if s[1] == colour and s[0] >= since]
            errors = sum(1 for s in mine if not s[2])
            out[colour] = {
                "requests": len(mine),
                "errors": errors,
                "error_pct": round(100 * errors / len(mine), 2) if mine else 0.0,
                "p99_ms": round(1000 * percentile([s[3] for s in mine], 0.99), 1),
            }
        return node.json(
            {"canary": node.config["canary"], "run": canary["run"], "weight": weight(), **out}
        )

    @node.route("/weight", method="POST")
    async def set_weight(request: Request) -> Response:
        """The analysis moves the weight, for the canary run it is analysing only."""
        body = await request.json()
        if not node.config["canary"] or body.get("run") != canary["run"]:
            return node.json({"error": "no such canary run"}, status=409)
        new = int(body["weight"])
        if not 0 <= new <= 100:
            return node.json({"error": "weight must be from 0 to 100"}, status=400)
        if new != canary["weight"]:
            node.event("weight", previous=canary["weight"], weight=new, by=body.get("why", "?"))
            canary["weight"] = new
            show_weight()
        return node.json({"weight": new})

    @node.task
    async def housekeeping() -> None:
        show_weight()
        while True:
            cutoff = time.time() - KEEP_S
            while scores and scores[0][0] < cutoff:
                scores.popleft()
            for replicas in pools.values():
                for r in replicas:
                    if r.ejected_until and r.ejected_until <= time.monotonic():
                        r.ejected_until = 0.0
                        node.event("readmitted", target=r.name, reason=f"{eject_s:g} s passed")
            show_weight()
            await asyncio.sleep(0.5)
