"""The router: clients send every request here; it knows which shard owns which key.

For a single key (``GET`` or ``PUT /kv/{key}``) it applies the **shard function** to the
key and forwards the request to the one shard that owns it. Only that shard has the data,
so there is nowhere else to send it: if that shard is down, slow or cut off, the request
fails or waits, while requests for the other shards' keys are untouched.

For a query over every key (``GET /scan``) it **scatters** the query to all shards at
once, **gathers** their answers and merges them. The scan is as slow as the slowest
shard, and it fails if any shard fails (this router does not return partial results).

Two shard functions, switchable live (the setting ``shard_function``), as in the chapter:

- ``modulo``: ``shards[hash(key) % N]``. Even, simple, and changing N moves most keys.
- ``ring``: consistent hashing with 100 virtual nodes per shard. Changing N moves only
  the keys on the arcs the added (or removed) shard takes over (or gives back).

The hash is ``stable_hash`` (SHA-256), never Python's ``hash()``, which changes from one
run to the next. When the shards change (scaling sends the router a new address book) or
the function changes, the router counts how many of the keys it has seen now map to
another shard and says so in the event log (``keys_moved``). It does not copy any data,
so those keys are missing on their new shard until they are written again.

Each shard gets ``shard_timeout_s`` (1 s) to answer; no retries. The table ``shards``
shows, per shard, the keys the map sends there, its share of single-key requests, and
the calls in flight to it.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import time
from collections import Counter, deque
from collections.abc import Callable
from urllib.parse import quote

from sandboxes.runtime.node import CallError, Node, Reply, Request, Response

VNODES = 100  # points on the ring per shard
RATE_WINDOW_S = 5.0  # the table's requests/s and share are over this many seconds

ShardFunction = Callable[[str], str]


def stable_hash(text: str) -> int:
    """64 bits of SHA-256. Python's own hash() of a str changes from run to run."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class Ring:
    """Consistent hashing: each shard sits at VNODES points on a circle of hash values;
    a key belongs to the first shard point at or after its own position."""

    def __init__(self, shards: list[str], vnodes: int = VNODES) -> None:
        self.points: list[tuple[int, str]] = []  # sorted (position on the ring, shard)
        for shard in shards:
            for i in range(vnodes):  # each shard appears at many points
                bisect.insort(self.points, (stable_hash(f"{shard}#{i}"), shard))

    def shard_for(self, key: str) -> str:
        # The first point at or after the key's position, wrapping round at the end.
        i = bisect.bisect_left(self.points, (stable_hash(key),))
        return self.points[i % len(self.points)][1]


def modulo(shards: list[str]) -> ShardFunction:
    return lambda key: shards[stable_hash(key) % len(shards)]


def ring(shards: list[str]) -> ShardFunction:
    return Ring(shards).shard_for


FUNCTIONS = {"modulo": modulo, "ring": ring}


def _instance_number(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def setup(node: Node) -> None:
    timeout_s = float(node.param("shard_timeout_s", 1.0))  # each shard's time to answer

    seen: set[str] = set()  # every key a request has named: what resharding would move
    recent: deque[tuple[float, str]] = deque()  # (when, shard) of recent single-key requests
    in_flight: Counter[str] = Counter()  # calls sent to each shard and not answered yet

    # The shard map: the shards in order (shard-1, shard-2, …) and the function over them.
    shards: list[str] = []
    shard_for: ShardFunction | None = None

    def build_map(change: str) -> None:
        """(Re)build the shard map; announce how many known keys now belong elsewhere."""
        nonlocal shards, shard_for
        old_for = shard_for
        shards = sorted((p.name for p in node.peers_with_role("shard")), key=_instance_number)
        function = node.config["shard_function"]
        shard_for = FUNCTIONS[function](shards) if shards else None
        if old_for is None or shard_for is None or not seen:
            return
        moved_to = Counter(shard_for(key) for key in seen if old_for(key) != shard_for(key))
        moved = sum(moved_to.values())
        node.event(
            "keys_moved",
            moved=moved,
            total=len(seen),
            pct=round(100 * moved / len(seen)),
            function=function,
            shards=len(shards),
            change=change,
            to=", ".join(f"{shard} {n}" for shard, n in sorted(moved_to.items())) or "none",
        )

    def function_changed(new: str, previous: str) -> None:
        build_map(f"{previous} → {new}, {len(shards)} shards")

    # A change is announced by the runtime's own `config` event, and by `keys_moved`.
    node.setting("shard_function", "modulo", choices=list(FUNCTIONS), on_change=function_changed)
    build_map("start")

    @node.on_peers
    def follow_shards() -> None:
        """Scaling changed the address book: a shard was added or removed."""
        names = sorted((p.name for p in node.peers_with_role("shard")), key=_instance_number)
        if names != shards:
            before = len(shards)
            build_map(f"{before} → {len(names)} shards, {node.config['shard_function']}")

    async def call_shard(shard: str, method: str, path: str, route: str, body: object) -> Reply:
        in_flight[shard] += 1
        try:
            return await node.call(
                shard, path, method=method, json=body, timeout=timeout_s, route=route
            )
        finally:
            in_flight[shard] -= 1

    # ---- one key: one shard ----

    async def forward(request: Request) -> Response:
        key = request.match_info["key"]
        if shard_for is None:
            return node.json({"error": "no shards"}, status=503)
        shard = shard_for(key)
        seen.add(key)
        recent.append((time.monotonic(), shard))
        body = await request.json() if request.can_read_body else None
        path = f"/kv/{quote(key, safe='')}"
        try:
            reply = await call_shard(shard, request.method, path, "/kv/{key}", body)
        except CallError as exc:  # no answer: only this shard has the key, so no retry
            status = 504 if exc.reason == "timeout" else 502
            return node.json({"error": exc.reason, "shard": shard}, status=status)
        return node.relay(reply, headers={"X-Distlab-Served-By": shard})

    node.route("/kv/{key}")(forward)
    node.route("/kv/{key}", method="PUT")(forward)

    # ---- every key: scatter to all shards, gather, merge ----

    @node.route("/scan")
    async def scan(request: Request) -> Response:
        async def ask(shard: str) -> tuple[str, int, str]:
            """One shard's part: (shard, how many keys it holds, what went wrong if anything)."""
            try:
                reply = await call_shard(shard, "GET", "/scan", "/scan", None)
            except CallError as exc:
                return shard, 0, exc.reason
            if reply.status != 200:
                return shard, 0, f"status {reply.status}"
            return shard, reply.json()["keys"], ""

        parts = await asyncio.gather(*(ask(shard) for shard in shards))  # scatter
        failed = {shard: problem for shard, _, problem in parts if problem}
        if failed or not parts:  # one missing part spoils the whole answer
            status = 504 if "timeout" in failed.values() else 502
            return node.json({"error": "not every shard answered", "failed": failed}, status=status)
        counts = {shard: keys for shard, keys, _ in parts}  # gather, and merge
        return node.json({"keys": sum(counts.values()), "shards": counts})

    # ---- what the lab shows: the shard table ----

    @node.task
    async def report() -> None:
        while True:
            too_old = time.monotonic() - RATE_WINDOW_S
            while recent and recent[0][0] < too_old:
                recent.popleft()
            requests = Counter(shard for _, shard in recent)
            total = sum(requests.values())
            owned = Counter(shard_for(key) for key in seen) if shard_for else Counter()
            node.table(
                "shards",
                [
                    {
                        "shard": shard,
                        "keys": owned[shard],
                        "rps": round(requests[shard] / RATE_WINDOW_S, 1),
                        "share_pct": round(100 * requests[shard] / total) if total else 0,
                        "in_flight": in_flight[shard],
                    }
                    for shard in shards
                ],
            )
            await asyncio.sleep(1.0)

    @node.status
    def status() -> dict[str, object]:
        return {
            "shard_function": node.config["shard_function"],
            "shards": list(shards),
            "keys_seen": len(seen),
            "in_flight": {shard: in_flight[shard] for shard in shards},
        }
