"""front: the service users talk to. Every answer needs two other machines.

For each ``GET /`` it asks ``profile`` who the user is, then asks ``greeting`` how to
greet them, one call after the other, and answers only when both have answered::

    def handle(request):
        user = call(profile, "/profile", timeout=1 s)    # 1st machine
        text = call(greeting, "/greeting", timeout=1 s)  # 2nd machine
        return text

All the interest is in what can happen to a call on the way:

- The other side answers with an error (a 500 or 503): ``front`` fails at once (502).
- Nobody is listening (the process died, on a machine that is still up): the connection
  is refused at once (502).
- No answer comes at all (the node is paused, overloaded, gone with its machine or cut
  off, or the request or the reply was lost): ``front`` cannot tell which, so it waits
  out its timeout and gives up (504), without knowing whether the work was done.

There are no retries and no fallbacks (chapters 5 and 8 add them): a request succeeds
only if both calls do, so ``front`` is less available than either of the services it
needs. It reports, as two gauges, how many calls are waiting on each of them right now:
when one stalls, that number climbs to requests per second times the timeout.
"""

from __future__ import annotations

from sandboxes.runtime.node import CallError, Node, Reply, Request, Response

# The gauge (pattern.yaml, `observe`) that counts the calls waiting on each dependency.
IN_FLIGHT_GAUGE = {"profile": "profile_in_flight", "greeting": "greeting_in_flight"}


class Failed(Exception):
    """A call that gave front nothing it can use; ``status`` is front's own answer."""

    def __init__(self, peer: str, status: int, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.status = status


def setup(node: Node) -> None:
    # How long to wait for each call: a live setting, starting from pattern.yaml's params.
    node.setting(
        "call_timeout_s", float(node.param("call_timeout_s", 1.0)), minimum=0.1, maximum=2.0
    )

    waiting = dict.fromkeys(IN_FLIGHT_GAUGE, 0)  # calls sent and not answered yet
    for peer, gauge in IN_FLIGHT_GAUGE.items():
        node.gauge(gauge, waiting[peer])

    async def ask(peer: str, path: str, params: dict[str, str]) -> Reply:
        """One call, as the user's request sees it: an answer, or a reason for none."""
        waiting[peer] += 1
        node.gauge(IN_FLIGHT_GAUGE[peer], waiting[peer])
        try:
            reply = await node.call(
                peer, path, params=params, timeout=node.config["call_timeout_s"]
            )
        except CallError as exc:  # no answer: timeout, connect, disconnected, partitioned…
            raise Failed(peer, 504 if exc.reason == "timeout" else 502, exc.reason) from None
        finally:
            waiting[peer] -= 1
            node.gauge(IN_FLIGHT_GAUGE[peer], waiting[peer])
        if reply.status >= 400:  # an answer, but an error
            raise Failed(peer, 502, f"answered {reply.status}")
        return reply

    @node.route("/")
    async def hello(request: Request) -> Response:
        user = request.query.get("key", "k0")  # the traffic generator names a user per request
        try:
            profile = (await ask("profile", "/profile", {"user": user})).json()
            greeting = (await ask("greeting", "/greeting", {"name": profile["name"]})).json()
        except Failed as failed:  # either call failed: so does the whole request
            return node.json({"error": str(failed)}, status=failed.status)
        return node.json({"user": user, "text": greeting["text"]})
