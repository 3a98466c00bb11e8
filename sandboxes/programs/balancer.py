"""The load balancer: clients know only its address; it forwards each request to a replica.

Shared by the patterns that balance (replicated-lb, capstone). It keeps a list of
backends (the nodes with role ``params.backend_role``, "replica" unless a pattern says
otherwise, in its address book) and forwards the routes ``params.routes`` names ("GET /"
by default; the capstone's: "GET /product/{key}, POST /order/{key}"). It picks
one per request with the current policy, and passes the replica's answer back with an
``X-Distlab-Served-By`` header. Two things make it better than the outline's sketch:

- Active health checks. Every ``health_interval_s`` it sends ``GET /health`` to each
  replica. After ``unhealthy_threshold`` failures in a row a replica is ejected (it gets
  no traffic); after ``healthy_threshold`` passes in a row it is re-admitted. Set
  ``health_checks`` to false to get the naive balancer back: it never ejects anyone, so a
  dead replica keeps receiving its share of requests, and every one of them fails.
- A policy, switchable live: round-robin, least-connections or random.

It never retries: a replica that gives no answer costs the client a 502 (connection
failed) or a 504 (too slow), so the price of a crash stays visible.
"""

from __future__ import annotations

import asyncio
import itertools
import random

from sandboxes.runtime.node import CallError, Node, Request, Response

POLICIES = ("round-robin", "least-connections", "random")


class Backend:
    """What the balancer knows about one replica."""

    def __init__(self, name: str, in_rotation: bool) -> None:
        self.name = name
        self.in_rotation = in_rotation  # False: ejected, or added and not yet checked
        self.was_admitted = in_rotation
        self.fails = 0  # health checks failed in a row
        self.passes = 0  # health checks passed in a row
        self.in_flight = 0  # requests sent to it and not answered yet


def _checks(n: int) -> str:
    return f"{n} health check" if n == 1 else f"{n} health checks"


def setup(node: Node) -> None:
    # The pattern's constants (pattern.yaml, `params`).
    timeout_s = float(node.param("lb_timeout_s", 1.0))  # how long to wait for a replica
    check_path = node.param("health_path", "/health")
    check_timeout_s = float(node.param("health_timeout_s", 0.5))
    role = node.param("backend_role", "replica")
    routes = node.param("routes", "GET /").split(",")  # "METHOD /path, …", forwarded as is

    # The replicas we start with are trusted; scaling adds and removes some later.
    backends = {p.name: Backend(p.name, True) for p in node.peers_with_role(role)}

    def admit(b: Backend, reason: str) -> None:
        b.in_rotation = True
        node.event("readmitted" if b.was_admitted else "admitted", target=b.name, reason=reason)
        b.was_admitted = True

    # ---- live settings: the sandbox's controls change them while traffic flows ----

    def health_checks_switched(on: bool, previous: bool) -> None:
        for b in backends.values():
            b.fails = b.passes = 0
            if not on and not b.in_rotation:  # the naive balancer trusts every replica
                admit(b, "health checks switched off")

    # A change is announced by the runtime's own `config` event: no second event for it.
    node.setting("policy", "round-robin", choices=POLICIES)
    node.setting("health_checks", True, on_change=health_checks_switched)
    node.setting(
        "health_interval_s", float(node.param("health_interval_s", 1.0)), minimum=0.1, maximum=60
    )
    node.setting(
        "unhealthy_threshold", int(node.param("unhealthy_threshold", 1)), minimum=1, maximum=10
    )
    node.setting(
        "healthy_threshold", int(node.param("healthy_threshold", 2)), minimum=1, maximum=10
    )

    @node.on_peers
    def follow_replicas() -> None:
        """Scaling changed the address book. A new replica joins once it passes its health
        checks (at once if they are off); a removed one is forgotten."""
        names = [p.name for p in node.peers_with_role(role)]
        for name in names:
            if name not in backends:
                backends[name] = Backend(name, in_rotation=not node.config["health_checks"])
        for name in set(backends) - set(names):
            del backends[name]

    # ---- balancing ----

    turn = itertools.count()  # round robin's own turn counter

    def choose(pool: list[Backend]) -> Backend:
        policy = node.config["policy"]
        if policy == "least-connections":
            fewest = min(b.in_flight for b in pool)
            return random.choice([b for b in pool if b.in_flight == fewest])
        if policy == "random":
            return random.choice(pool)
        # Round robin. The outline picks `servers[request.id % len(servers)]`, which is
        # round robin only if request ids count up one by one, and which keeps choosing
        # dead servers. We count turns ourselves, over the replicas in rotation only.
        return pool[next(turn) % len(pool)]

    async def forward(request: Request, route: str) -> Response:
        pool = [b for b in backends.values() if b.in_rotation]
        if not pool:
            return node.json({"error": "no healthy replica"}, status=503)
        backend = choose(pool)
        backend.in_flight += 1
        try:
            body = await request.json() if request.can_read_body else None
            reply = await node.call(
                backend.name, request.path, method=request.method, params=request.query,
                json=body, timeout=timeout_s, route=route,
            )  # fmt: skip
        except CallError as exc:  # no answer at all: no retry, the client sees it
            status = 504 if exc.reason == "timeout" else 502
            return node.json({"error": exc.reason, "replica": backend.name}, status=status)
        finally:
            backend.in_flight -= 1
        return node.relay(reply, headers={"X-Distlab-Served-By": backend.name})

    for method, path in (r.split() for r in routes):
        node.route(path, method=method)(lambda request, path=path: forward(request, path))

    # ---- active health checks ----

    async def check(b: Backend) -> None:
        try:
            reply = await node.call(b.name, check_path, timeout=check_timeout_s)
            problem = None if reply.status == 200 else f"status {reply.status}"
        except CallError as exc:
            problem = exc.reason
        if problem is None:
            b.fails, b.passes = 0, b.passes + 1
            if not b.in_rotation and b.passes >= node.config["healthy_threshold"]:
                admit(b, f"passed {_checks(b.passes)} in a row")
        else:
            b.passes, b.fails = 0, b.fails + 1
            if b.in_rotation and b.fails >= node.config["unhealthy_threshold"]:
                b.in_rotation = False
                reason = f"failed {_checks(b.fails)} in a row, last: {problem}"
                node.event("ejected", target=b.name, reason=reason)

    @node.task
    async def health_checker() -> None:
        """A round of checks every health_interval_s, the first one interval after start."""
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while True:
            next_round = max(next_round + node.config["health_interval_s"], loop.time())
            await asyncio.sleep(next_round - loop.time())
            if node.config["health_checks"]:
                await asyncio.gather(*(check(b) for b in list(backends.values())))

    # ---- what the lab shows: the rotation as a table, and how many replicas are in it ----

    @node.task
    async def report() -> None:
        while True:
            rows = [
                {
                    "replica": b.name,
                    "in_rotation": "yes" if b.in_rotation else "no",
                    "in_flight": b.in_flight,
                    "fails": b.fails,
                    "passes": b.passes,
                }
                for b in sorted(backends.values(), key=lambda b: b.name)
            ]
            node.table("rotation", rows)
            node.gauge("in_rotation", sum(1 for b in backends.values() if b.in_rotation))
            await asyncio.sleep(0.5)

    @node.status
    def status() -> dict[str, object]:
        fields = ("in_rotation", "in_flight", "fails", "passes")
        return {"backends": {b.name: {f: getattr(b, f) for f in fields} for b in backends.values()}}
