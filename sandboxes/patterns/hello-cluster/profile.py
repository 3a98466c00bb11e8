"""profile: the service that knows who each user is.

``front`` asks it about the user behind every request (``GET /profile?user=k17``) and
cannot greet anyone without the answer. It takes a few milliseconds (standing in for a
database lookup) and keeps no state. It knows nothing about ``front``: when it is slow,
paused or dead, it is ``front`` that has to cope.
"""

from __future__ import annotations

import asyncio

from sandboxes.runtime.node import Node, Request, Response

NAMES = ["Ada", "Alan", "Barbara", "Edsger", "Grace", "Leslie", "Radia", "Tony"]


def setup(node: Node) -> None:
    work_s = float(node.param("profile_work_ms", 8)) / 1000  # pattern.yaml, `params`

    @node.route("/profile")
    async def profile(request: Request) -> Response:
        user = request.query.get("user", "k0")  # the traffic generator's keys: k0 … k99
        await asyncio.sleep(work_s)  # the lookup
        number = int(user[1:]) if user[1:].isdigit() else 0
        return node.json({"user": user, "name": NAMES[number % len(NAMES)]})
