"""The sidecar: a proxy beside the app, adding what the app lacks.

Clients only ever see the sidecar. For every ``GET /`` it calls the app with a timeout and
relays the answer. The idea, in the chapter's terms::

    for attempt in (1, 2) if retries else (1,):
        answer = call the app, waiting at most timeout_s
        if there is an answer and it is not a 5xx: return it
    return the last failure: the app's 5xx, or 504 (it timed out), or 502 (no connection)

Two live settings: ``timeout_s`` (how long to wait for the app; 1 s) and ``retries``
(whether to send a failed GET a second time; off). A GET is idempotent, so sending it
twice is safe: that is the only reason this sidecar may retry at all.

Two things it does not do, on purpose, because the sandbox is about them:

- It ignores its caller's deadline. The traffic generator gives up after 1.5 s: with the
  1-second timeout, a retry after a timeout would end at 2 s, too late for anyone.
- It does not notice when its caller hangs up: it finishes the attempts it started, and
  counts the answers that nobody was waiting for any more (``abandoned``).

Once a second it reports, as gauges: the calls it made to the app (``attempts_per_s``),
how many of them were retries (``retries_per_s``), the requests a retry turned into a
success (``rescued_per_s``), the calls that timed out (``timeouts_per_s``) and the answers
that came too late for the caller (``abandoned_per_s``). Its built-in ``in_flight`` gauge is
the number of calls to the app waiting for an answer right now. When ``unreachable_after``
calls in a row get no answer at all, the event log says so, and again when the app answers.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from sandboxes.runtime.node import CallError, Node, Request, Response

# What it counts, each reported once a second as a gauge (pattern.yaml, `observe`).
GAUGES = ("attempts_per_s", "retries_per_s", "rescued_per_s", "timeouts_per_s", "abandoned_per_s")


def setup(node: Node) -> None:
    node.setting("timeout_s", float(node.param("sidecar_timeout_s", 1.0)), minimum=0.1, maximum=5)
    node.setting("retries", False)
    unreachable_after = int(node.param("unreachable_after", 10))

    counts: Counter[str] = Counter()  # since the last report
    waiting = 0  # calls to the app without an answer yet
    silent_calls = 0  # calls in a row that got no answer at all
    node.gauge("in_flight", waiting)

    async def call_app(request: Request) -> Response:
        """One attempt: the app's answer, relayed, or the sidecar's own 502 or 504."""
        nonlocal waiting, silent_calls
        counts["attempts_per_s"] += 1
        waiting += 1
        node.gauge("in_flight", waiting)
        try:
            timeout = node.config["timeout_s"]
            reply = await node.call("app", "/", params=request.query, timeout=timeout)
        except CallError as exc:
            if exc.reason == "timeout":
                counts["timeouts_per_s"] += 1
            silent_calls += 1
            if silent_calls == unreachable_after:
                node.event("app_unreachable", target="app", calls=silent_calls, reason=exc.reason)
            status = 504 if exc.reason == "timeout" else 502
            return node.json({"error": f"no answer from the app: {exc.reason}"}, status=status)
        finally:
            waiting -= 1
            node.gauge("in_flight", waiting)
        if silent_calls >= unreachable_after:
            node.event("app_reachable", target="app", calls=silent_calls)
        silent_calls = 0
        return node.relay(reply)

    @node.route("/")
    async def forward(request: Request) -> Response:
        attempts = 2 if node.config["retries"] else 1
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                counts["retries_per_s"] += 1
            response = await call_app(request)
            if response.status < 500:  # an answer that is not a failure: done
                if attempt > 1:
                    counts["rescued_per_s"] += 1
                break
        if request.transport is None or request.transport.is_closing():
            counts["abandoned_per_s"] += 1  # the caller hung up before we were done
        return response

    @node.task
    async def report() -> None:
        while True:  # zeros at first, then the counts of each second
            for name in GAUGES:
                node.gauge(name, counts[name])
            counts.clear()
            await asyncio.sleep(1.0)
