"""Automatic canary analysis: it watches each version's answers at the router and moves
the router's weight, step by step, as long as green does as well as blue.

With the router's ``canary`` on, it gives green 5% of the traffic, then 25%, 50% and
100%. Each step lasts ``step_s`` seconds and must see at least ``params.min_requests``
green requests; then green (the canary) is compared with blue (the baseline) over that
step:

- green's error rate may exceed blue's by at most ``params.max_error_increase_pct``
  points: the service's error budget (a 99% success objective leaves 1%);
- green's p99 may exceed blue's by at most ``params.max_p99_increase_ms``.

Either breach rolls back (weight 0) at once. Too few requests: the step goes on until
there are enough, since fewer prove nothing. How many would prove something, it says all
the time (``requests_needed``): the requests each version must serve before a rise of
``max_error_increase_pct`` points over blue's error rate of the last 20 s can be told from
chance (at 95% confidence, 4 times in 5). If it cannot reach the router, it changes
nothing: the router keeps the weight it has, and the canary waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

from sandboxes.runtime.node import CallError, Node

ROUTER = "router"
STEPS = (5, 25, 50, 100)
BASELINE_S = 20  # blue's error rate for requests_needed: over the last 20 s
Z_CONFIDENCE, Z_POWER = 1.96, 0.84  # 95% two-sided; a real rise seen 80% of the time


def requests_needed(baseline_pct: float, rise_pct: float) -> int:
    """Requests per version to tell an error rate of ``baseline_pct`` from one ``rise_pct``
    points higher: the two-proportion sample size, n = (z_a + z_b)² (p1 q1 + p2 q2) / d²."""
    p1 = min(max(baseline_pct / 100, 0.0), 1.0)
    p2 = p1 + rise_pct / 100
    if p2 > 1.0:  # blue already fails (nearly) everything: no rise left to see
        p1, p2 = 1.0 - rise_pct / 100, 1.0
    spread = p1 * (1 - p1) + p2 * (1 - p2)
    return math.ceil((Z_CONFIDENCE + Z_POWER) ** 2 * spread / (p2 - p1) ** 2)


def setup(node: Node) -> None:
    min_requests = int(node.param("min_requests", 50))
    max_error_increase = float(node.param("max_error_increase_pct", 1.0))
    max_p99_increase = float(node.param("max_p99_increase_ms", 100))
    node.setting("step_s", 30, minimum=2, maximum=120)

    run: dict[str, Any] = {"id": 0, "step": 0, "started": 0.0, "step_started": 0.0}
    rows: list[dict[str, Any]] = []  # the steps of this run, for the table
    baseline: dict[str, float] = {"error_pct": 0.0, "p99_ms": 0.0}  # blue, last seen

    def verdict(value: str) -> None:
        node.set_state("verdict", value)

    async def set_weight(weight: int, why: str) -> bool:
        try:
            reply = await node.call(
                ROUTER, "/weight", method="POST", timeout=1,
                json={"run": run["id"], "weight": weight, "why": why},
            )  # fmt: skip
        except CallError:
            return False
        return reply.status == 200

    async def start_step(index: int) -> None:
        weight = STEPS[index]
        if await set_weight(weight, f"step {index + 1} of {len(STEPS)}"):
            run["step"], run["step_started"] = index, time.time()
            node.event("step", weight=weight, step_s=node.config["step_s"])
            verdict("watching")

    def judge(green: dict[str, Any], blue: dict[str, Any]) -> str | None:
        """Why green must be rolled back, or None."""
        if blue["requests"]:  # at 100%, blue has none: compare with the last baseline
            baseline.update(error_pct=blue["error_pct"], p99_ms=blue["p99_ms"])
        if green["error_pct"] > baseline["error_pct"] + max_error_increase:
            return (
                f"canary errors {green['error_pct']:.1f}% vs baseline {baseline['error_pct']:.1f}%"
            )
        if green["p99_ms"] > baseline["p99_ms"] + max_p99_increase:
            return f"canary p99 {green['p99_ms']:.0f} ms vs baseline {baseline['p99_ms']:.0f} ms"
        return None

    def record(weight: int, green: dict[str, Any], blue: dict[str, Any], result: str) -> None:
        row = {
            "step": f"{weight}%",
            "green_requests": green["requests"],
            "green_errors": f"{green['error_pct']:.1f}%",
            "blue_errors": f"{blue['error_pct']:.1f}%" if blue["requests"] else "-",
            "green_p99": f"{green['p99_ms']:.0f} ms",
            "blue_p99": f"{blue['p99_ms']:.0f} ms" if blue["requests"] else "-",
            "verdict": result,
        }
        rows[:] = [r for r in rows if r["step"] != row["step"]] + [row]
        node.table("steps", rows)

    async def analyse(stats: dict[str, Any]) -> None:
        """One look at the current step: wait, go on, or roll back."""
        green, blue = stats["green"], stats["blue"]
        weight = STEPS[run["step"]]
        waited = time.time() - run["step_started"]
        node.gauge("canary_requests", green["requests"])
        node.gauge("canary_error_pct", green["error_pct"])
        node.gauge("baseline_error_pct", blue["error_pct"])
        if waited < node.config["step_s"]:
            record(weight, green, blue, "watching")
            return
        if green["requests"] < min_requests:
            record(weight, green, blue, "too few requests")
            if run.get("warned") != run["step"]:
                run["warned"] = run["step"]
                node.event("too_few", weight=weight, requests=green["requests"],
                           needed=min_requests, waited_s=round(waited))  # fmt: skip
                verdict("waiting-for-requests")
            return
        reason = judge(green, blue)
        after_s = round(time.time() - run["started"], 1)
        if reason:
            record(weight, green, blue, "rolled back")
            if await set_weight(0, "rollback"):
                node.event("rollback", weight=weight, reason=reason, after_s=after_s)
                node.gauge("rollbacks", 1)
                verdict("rolled-back")
                run["done"] = True
            return
        record(weight, green, blue, "passed")
        node.event("passed", weight=weight, errors_pct=green["error_pct"],
                   baseline_pct=blue["error_pct"], p99_ms=green["p99_ms"])  # fmt: skip
        if run["step"] + 1 < len(STEPS):
            await start_step(run["step"] + 1)
        else:
            node.event("promoted", after_s=after_s)
            verdict("promoted")
            run["done"] = True

    @node.task
    async def watch() -> None:
        await asyncio.sleep(0.5)  # once the runtime has said "started", which resets states
        verdict("idle")
        for gauge in ("rollbacks", "canary_requests", "canary_error_pct", "baseline_error_pct"):
            node.gauge(gauge, 0)
        node.table("steps", rows)  # empty until a canary starts
        cut_off = False
        tick = 0
        while True:
            await asyncio.sleep(0.5)
            tick += 1
            if tick % 2 == 0:  # once a second: how many requests would prove a rise
                with contextlib.suppress(CallError, ValueError, KeyError):
                    since = f"{time.time() - BASELINE_S:.3f}"
                    reply = await node.call(ROUTER, "/stats", params={"since": since}, timeout=1)
                    blue = reply.json()["blue"]
                    if blue["requests"]:
                        needed = requests_needed(blue["error_pct"], max_error_increase)
                        node.gauge("requests_needed", needed)
            since = run["step_started"] or time.time()
            try:
                reply = await node.call(
                    ROUTER, "/stats", params={"since": f"{since:.3f}"}, timeout=1
                )
                stats = reply.json() if reply.status == 200 else None
            except CallError as exc:
                stats, reason = None, exc.reason
            else:
                reason = f"status {reply.status}"
            if stats is None:
                if not cut_off and run["id"] and not run.get("done"):
                    node.event("holding", reason=reason, weight=STEPS[run["step"]])
                    verdict("holding")
                cut_off = True
                continue
            if cut_off and run["id"] and not run.get("done"):
                verdict("watching")
            cut_off = False
            if not stats["canary"]:
                if run["id"]:  # the canary was switched off: forget the run
                    run.update(id=0, step=0, started=0.0, step_started=0.0, done=False)
                    rows.clear()
                    node.table("steps", rows)
                    node.gauge("rollbacks", 0)
                    verdict("idle")
                continue
            if stats["run"] != run["id"]:  # switched on: a new run begins
                run.update(
                    id=stats["run"], started=time.time(), step_started=0.0, done=False, warned=None
                )
                rows.clear()
                node.gauge("rollbacks", 0)
                await start_step(0)
                continue
            if run.get("done"):
                continue
            if not run["step_started"]:  # the first step's weight did not reach the router
                await start_step(0)
            else:
                await analyse(stats)
